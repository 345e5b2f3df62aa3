"""The layout every teacher backend's signal shares: entry order and padding positions.

Backends differ in how ties at the top-K boundary fall and in what they compute at padding,
so both are fixed here: entries in descending log-prob, ties to the lower id; positions whose
target token is padding hold the same placeholder (a uniform distribution) whatever the backend.
"""

from __future__ import annotations

import math

import torch


def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, L-1]: position t is scored (its target, token t+1, is not padding).

    ``attention_mask`` [B, L] must be right-padded (ones, then zeros); ``ValueError`` otherwise.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("the teacher scores right-padded sequences: attention_mask rows must be ones then zeros")
    return mask[:, 1:]


def first_scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row of ``loss_mask`` [B, L-1] (bool): the first position the loss reads, [B] long (L-1
    for a row it never reads). The teacher need not score the positions before it (the prompt)."""
    if loss_mask.dim() != 2 or loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool [B, L-1], got {loss_mask.dtype} {tuple(loss_mask.shape)}")
    positions = loss_mask.shape[1]
    index = torch.arange(positions, device=loss_mask.device).expand_as(loss_mask)
    return torch.where(loss_mask, index, positions).amin(dim=1) if positions else torch.zeros(
        loss_mask.shape[0], dtype=torch.long, device=loss_mask.device)


def needed_mask(attention_mask: torch.Tensor, first_position: torch.Tensor | None) -> torch.Tensor:
    """Bool [B, L-1]: the positions to score, ``target_mask`` less those before
    ``first_position`` [B] (None: every position with a target)."""
    scored = target_mask(attention_mask)
    if first_position is None:
        return scored
    if tuple(first_position.shape) != (attention_mask.shape[0],):
        raise ValueError(f"first_position must be [B] = [{attention_mask.shape[0]}], got {tuple(first_position.shape)}")
    index = torch.arange(scored.shape[1], device=scored.device)
    return scored & (index >= first_position.to(scored.device).unsqueeze(-1))


def order_by_logprob(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries [..., K] sorted by descending log-prob, ties towards the lower id (ids unique per row)."""
    # Ties go to the lower id through a stable sort of entries in id order; rows already in id
    # order (the hf backend's top-K, a full distribution) skip the sort into it.
    if not bool((ids[..., 1:] > ids[..., :-1]).all()):
        by_id = ids.argsort(dim=-1, stable=True)
        ids, logprobs = ids.gather(-1, by_id), logprobs.gather(-1, by_id)
    order = logprobs.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), logprobs.gather(-1, order)


def padding_logprob(vocab_size: int) -> float:
    """The log-prob of every entry at a padding position: -log V, so that the K listed ids and the
    tail bucket (the other V - K ids) form the uniform distribution over the vocabulary whatever
    K is (the one rule for padding: every backend's and the teacher pool's joined shards). A
    signal joined with a larger teacher's (``tip_ray.driver.routing.join_by_rows``) keeps its
    absent slots (-inf, ``TeacherSignal.padded_to``) at padding positions too: they are no
    outcome, so the listed ids and the tail stay uniform."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return -math.log(vocab_size)


def fill_padding(
    ids: torch.Tensor | None, logprobs: torch.Tensor, sampled: torch.Tensor, scored: torch.Tensor, vocab_size: int
) -> None:
    """In place: at positions where ``scored`` [B, T] is False, ids [B, T, K] become 0..K-1 (None:
    a dense signal's, which are its columns already) and every log-prob (``logprobs`` [B, T, K],
    ``sampled`` [B, T]) ``padding_logprob(vocab_size)``."""
    pad = ~scored
    if ids is not None:
        ids[pad] = torch.arange(ids.shape[-1], dtype=ids.dtype, device=ids.device)
    uniform = padding_logprob(vocab_size)
    logprobs[pad] = uniform
    sampled[pad] = uniform
