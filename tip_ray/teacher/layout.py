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


def order_by_logprob(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries [..., K] sorted by descending log-prob, ties towards the lower id (ids unique per row)."""
    by_id = ids.argsort(dim=-1, stable=True)
    ids, logprobs = ids.gather(-1, by_id), logprobs.gather(-1, by_id)
    order = logprobs.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), logprobs.gather(-1, order)


def fill_padding(
    ids: torch.Tensor, logprobs: torch.Tensor, sampled: torch.Tensor, scored: torch.Tensor, vocab_size: int
) -> None:
    """In place: at positions where ``scored`` [B, T] is False, ids [B, T, K] become 0..K-1 and
    every log-prob (``logprobs`` [B, T, K], ``sampled`` [B, T]) -log(vocab_size)."""
    pad = ~scored
    k = ids.shape[-1]
    ids[pad] = torch.arange(k, dtype=ids.dtype, device=ids.device)
    uniform = -math.log(vocab_size)
    logprobs[pad] = uniform
    sampled[pad] = uniform
