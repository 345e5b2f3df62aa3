"""Per-token statistics of TIP_SPEC section 2, computed without gradient.

``compute_token_stats`` takes full student logits [B, T, V]. ``stats_for_rows`` is the row
kernel it shares with the memory-lean path, which feeds it one chunk of logits at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from tip_ray.tip.signal import TeacherSignal
from tip_ray.tip.support import (
    aligned_distributions,
    first_occurrences,
    full_divergences,
    generalized_jsd_over,
    ids_at,
    kl_over,
    stable_topk_ids,
    teacher_logprob_lookup,
)

DEFAULT_TA_K = 16
DEFAULT_CHUNK_ROWS = 1024

STAT_NAMES: tuple[str, ...] = (
    "entropy",
    "entropy_norm",
    "rkl",
    "fkl",
    "jsd",
    "sampled_lr",
    "teacher_mass_on_student_topk",
    "ta_entropy",
    "ta_fkl",
)


@dataclass(frozen=True)
class TokenStats:
    """Per-position statistics, each [B, T], zero where ``mask`` is False.

    - ``entropy``: H(P_S) in nats; ``entropy_norm``: entropy / ln V, in [0, 1].
    - ``rkl`` / ``fkl``: KL(P_S||P_T) / KL(P_T||P_S), exact in full mode, top-K + tail otherwise.
    - ``jsd``: JSD(beta=0.5) / ln 2, in [0, 1].
    - ``sampled_lr``: log P_S(y_t) - log P_T(y_t).
    - ``teacher_mass_on_student_topk``: teacher mass on the student's top-``ta_k`` ids (C).
    - ``ta_entropy``: entropy of the student's renormalised top-``ta_k`` / ln ``ta_k`` (TA-OPD H).
    - ``ta_fkl``: forward KL on the union of both top-``ta_k`` sets, renormalised (TA-OPD D).
    ``token_ids`` [B, T] are the sampled ids, ``mask`` [B, T] the valid response positions.
    """

    entropy: torch.Tensor
    entropy_norm: torch.Tensor
    rkl: torch.Tensor
    fkl: torch.Tensor
    jsd: torch.Tensor
    sampled_lr: torch.Tensor
    teacher_mass_on_student_topk: torch.Tensor
    ta_entropy: torch.Tensor
    ta_fkl: torch.Tensor
    token_ids: torch.Tensor
    mask: torch.Tensor
    vocab_size: int

    @property
    def num_valid(self) -> int:
        """Number of valid response positions."""
        return int(self.mask.sum().item())

    def flat(self) -> dict[str, torch.Tensor]:
        """Every statistic at the valid positions, row-major, as 1-D tensors [m]."""
        return {name: getattr(self, name)[self.mask] for name in STAT_NAMES}

    @classmethod
    def from_chunks(
        cls, chunks: list[dict[str, torch.Tensor]], token_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int,
        dtype: torch.dtype,
    ) -> TokenStats:
        """Join the per-chunk outputs of ``stats_for_rows`` (in row order) into [B, T] statistics."""
        flat = {
            name: torch.cat([c[name] for c in chunks]) if chunks else torch.zeros(0, dtype=dtype, device=mask.device)
            for name in STAT_NAMES
        }
        return cls.from_flat(flat, token_ids, mask, vocab_size)

    @classmethod
    def from_flat(
        cls, values: dict[str, torch.Tensor], token_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int
    ) -> TokenStats:
        """Scatter 1-D per-valid-position statistics [m] back into [B, T] tensors on the mask's
        device; every statistic must already be on it (the caller places the batch once, rather
        than this copying per statistic)."""
        out = {}
        for name in STAT_NAMES:
            if values[name].device != mask.device:
                raise ValueError(f"statistic {name} is on {values[name].device} but the mask is on {mask.device}: "
                                 "move the batch to the device the statistics are computed on")
            full = torch.zeros(mask.shape, dtype=values[name].dtype, device=mask.device)
            full[mask] = values[name]
            out[name] = full
        return cls(**out, token_ids=token_ids, mask=mask, vocab_size=vocab_size)


assert tuple(f.name for f in fields(TokenStats))[: len(STAT_NAMES)] == STAT_NAMES


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float type statistics are computed in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def stats_for_rows(
    logits: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    ta_k: int = DEFAULT_TA_K,
) -> dict[str, torch.Tensor]:
    """Statistics for N valid positions: logits [N, V], ids [N], teacher [N, K] (None: dense),
    [N, K], [N].

    Returns a dict of 1-D tensors [N] keyed by ``STAT_NAMES``. Raises if a logit is NaN/inf.
    """
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("student logits hold NaN or inf at a response position")
    vocab = logits.shape[-1]
    full = topk_ids is None or topk_ids.shape[-1] == vocab
    logp = torch.log_softmax(logits.to(work_dtype(logits.dtype)), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    sampled_lr = logp.gather(-1, response_ids.long().unsqueeze(-1)).squeeze(-1) - sampled_logprobs.to(logp.dtype)

    s_log, t_log, valid = aligned_distributions(logp, response_ids, topk_ids, topk_logprobs, sampled_logprobs, full)
    if full:  # every slot valid: the unmasked kernel
        rkl, fkl, jsd = full_divergences(s_log, t_log)
    else:
        rkl, fkl = kl_over(s_log, t_log, valid), kl_over(t_log, s_log, valid)
        jsd = generalized_jsd_over(s_log, t_log, valid, 0.5)
    rkl, fkl, jsd = rkl.clamp(min=0), fkl.clamp(min=0), (jsd / math.log(2)).clamp(0, 1)

    k = min(ta_k, vocab)
    s_top_ids = stable_topk_ids(logp, k)
    s_top_lp = logp.gather(-1, s_top_ids)
    if full:
        # t_log is the renormalised teacher over the vocabulary in full mode.
        def lookup(ids: torch.Tensor) -> torch.Tensor:
            return t_log.gather(-1, ids)

        t_top_ids = stable_topk_ids(t_log, k)
    else:
        t_lp = topk_logprobs.to(logp.dtype)

        def lookup(ids: torch.Tensor) -> torch.Tensor:
            return teacher_logprob_lookup(ids, response_ids, topk_ids, t_lp, sampled_logprobs)

        t_top_ids = topk_ids.long().gather(-1, stable_topk_ids(t_lp, min(k, t_lp.shape[-1])))

    return row_stats(entropy, vocab, rkl, fkl, jsd, sampled_lr, k, s_top_ids, s_top_lp, t_top_ids,
                     logp.gather(-1, t_top_ids), lookup)


def row_stats(
    entropy: torch.Tensor, vocab: int, rkl: torch.Tensor, fkl: torch.Tensor, jsd: torch.Tensor,
    sampled_lr: torch.Tensor, k: int, s_top_ids: torch.Tensor, s_top_lp: torch.Tensor, t_top_ids: torch.Tensor,
    s_at_t_top: torch.Tensor, lookup,
) -> dict[str, torch.Tensor]:
    """The per-token statistics [N] by name, from the divergences already computed and the k-slot
    pieces of the TA-OPD statistics: the student's top-k ids/log-probs ``s_top_ids``/``s_top_lp``
    [N, k], the teacher's top-k ids ``t_top_ids`` [N, k] with the student's log-probs there
    ``s_at_t_top``, and ``lookup`` (ids [N, j] -> the teacher's log-probs there). Shared by the
    whole-row and the vocabulary-streamed statistics passes."""
    mass_on_student_top = lookup(s_top_ids).exp().sum(-1)
    ta_entropy = _renormalised_entropy(s_top_lp) / math.log(k) if k > 1 else torch.zeros_like(entropy)
    ta_fkl = _union_forward_kl(s_top_ids, s_top_lp, t_top_ids, s_at_t_top, lookup)
    return {
        "entropy": entropy,
        "entropy_norm": entropy / math.log(vocab) if vocab > 1 else torch.zeros_like(entropy),
        "rkl": rkl,
        "fkl": fkl,
        "jsd": jsd,
        "sampled_lr": sampled_lr,
        "teacher_mass_on_student_topk": mass_on_student_top.clamp(0, 1),
        "ta_entropy": ta_entropy,
        "ta_fkl": ta_fkl,
    }


def _renormalised_entropy(top_logp: torch.Tensor) -> torch.Tensor:
    """Entropy [N] of the distribution ``top_logp`` [N, k] renormalised over its k slots."""
    logq = top_logp - torch.logsumexp(top_logp, dim=-1, keepdim=True)
    return -(logq.exp() * logq).sum(-1)


def _union_forward_kl(s_top_ids: torch.Tensor, s_top_lp: torch.Tensor, t_top_ids: torch.Tensor,
                     s_at_t_top: torch.Tensor, lookup: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """KL(P_T || P_S) [N] over (student top-k) union (teacher top-k), both renormalised on it.

    ``s_top_ids`` [N, k] with the student's log-probs ``s_top_lp`` there, ``t_top_ids`` [N, k']
    (k' <= k) with the student's log-probs ``s_at_t_top`` there; ``lookup`` maps ids [N, Q] to
    the teacher's log-probs [N, Q]. An id in ``t_top_ids`` twice (an absent slot repeats an id of
    a row scored with fewer than K tokens) counts once.
    """
    repeated = (t_top_ids.unsqueeze(-1) == s_top_ids.unsqueeze(-2)).any(-1)
    union_ids = torch.cat([s_top_ids, t_top_ids], dim=-1)
    valid = torch.cat([torch.ones_like(s_top_ids, dtype=torch.bool), ~repeated & first_occurrences(t_top_ids)],
                      dim=-1)
    s = torch.cat([s_top_lp, s_at_t_top], dim=-1).masked_fill(~valid, float("-inf"))
    t = lookup(union_ids).masked_fill(~valid, float("-inf"))
    s = s - torch.logsumexp(s, dim=-1, keepdim=True)
    t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    return kl_over(t, s, valid).clamp(min=0)


def validate_student_inputs(
    batch_shape: tuple[int, int], vocab_size: int, response_ids: torch.Tensor, mask: torch.Tensor
) -> None:
    """Raise ValueError naming the argument when response ids or the mask do not fit [B, T]."""
    if tuple(response_ids.shape) != batch_shape:
        raise ValueError(f"response_ids must be [B, T] = {batch_shape}, got {tuple(response_ids.shape)}")
    if tuple(mask.shape) != batch_shape:
        raise ValueError(f"mask must be [B, T] = {batch_shape}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if response_ids.dtype.is_floating_point:
        raise ValueError(f"response_ids must be an integer tensor, got {response_ids.dtype}")
    ids = response_ids[mask]
    if ids.numel() and bool(((ids < 0) | (ids >= vocab_size)).any()):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"response_ids holds id {bad} at a masked-in position, outside the vocabulary [0, {vocab_size})")


def compute_token_stats(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    teacher: TeacherSignal,
    mask: torch.Tensor,
    *,
    ta_k: int = DEFAULT_TA_K,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> TokenStats:
    """Statistics for every valid response position.

    ``student_logits`` [B, T, V] (position t predicts ``response_ids[:, t]``), ``response_ids``
    [B, T], ``teacher`` aligned to the same [B, T], ``mask`` [B, T] bool (False on prompt and
    padding). Rows are processed ``chunk_rows`` at a time to bound the working memory.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if ta_k < 1:
        raise ValueError(f"ta_k must be >= 1, got {ta_k}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    batch, length, vocab = student_logits.shape
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    t_ids, t_lp, t_samp = teacher.checked_rows(batch, length, vocab, mask)

    rows = student_logits[mask]
    ids = response_ids[mask]
    chunks = [
        stats_for_rows(rows[i : i + chunk_rows], ids[i : i + chunk_rows], ids_at(t_ids, slice(i, i + chunk_rows)),
                       t_lp[i : i + chunk_rows], t_samp[i : i + chunk_rows], ta_k)
        for i in range(0, rows.shape[0], chunk_rows)
    ]
    return TokenStats.from_chunks(chunks, response_ids, mask, vocab, work_dtype(student_logits.dtype))
