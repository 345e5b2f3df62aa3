"""Student and teacher distributions aligned on a common support (TIP_SPEC section 3).

Every divergence in tip_ray is computed between two vectors of log-probabilities over the same
outcomes. In ``full`` mode the outcomes are the vocabulary. In ``topk`` mode they are the
teacher's top-K ids, the sampled token and one tail bucket holding all the remaining mass of
each side, so the estimate is a divergence between two true distributions: never negative, and
never larger than the exact value (merging outcomes cannot increase a divergence).

All functions work on flat rows: N positions, vocabulary V, teacher width K.
"""

from __future__ import annotations

import math

import torch

# Floor for a tail bucket's mass: a teacher whose top-K covers all its mass (up to rounding)
# would otherwise give the student's tail an infinite penalty.
TAIL_FLOOR = 1e-10
_LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


def _masked_logsumexp(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(values.masked_fill(~valid, float("-inf")), dim=-1, keepdim=True)


def full_teacher_log(topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor, vocab: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The teacher's whole distribution [N, V] in ``dtype``, renormalised, from a full signal's rows:
    ``topk_logprobs`` [N, V] with their ids ``topk_ids`` [N, V] (scattered into id order), or
    dense (``topk_ids`` None: already in id order), on the rows' device."""
    t_lp = topk_logprobs.to(dtype)
    if topk_ids is not None:
        t_lp = t_lp.new_full((t_lp.shape[0], vocab), float("-inf")).scatter_(-1, topk_ids.long(), t_lp)
    return t_lp - torch.logsumexp(t_lp, dim=-1, keepdim=True)


def aligned_distributions(
    student_logp: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    full: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (student_log, teacher_log, valid), each [N, S], on a common support.

    ``student_logp`` [N, V] are the student's log-softmax values (gradient flows through them);
    ``response_ids`` [N]; ``topk_ids``/``topk_logprobs`` [N, K]; ``sampled_logprobs`` [N].
    Full mode: S = V, the teacher scattered to the vocabulary (``topk_ids`` None: a dense signal,
    already in id order) and renormalised.
    Top-K mode: S = K + 2 (teacher ids, the sampled id unless already among them, the tail); a
    teacher slot with log-prob -inf is absent (it pads a row scored with fewer than K tokens and
    repeats an id already listed, ``tip_ray.tip.signal``), so the row reads as its own shorter signal.
    Invalid slots hold -inf on both sides and must be skipped by the caller.
    """
    dtype = student_logp.dtype
    t_lp = topk_logprobs.to(dtype)
    if full:
        teacher = full_teacher_log(topk_ids, topk_logprobs, student_logp.shape[-1], dtype)
        valid = torch.ones_like(student_logp, dtype=torch.bool)
        return student_logp, teacher, valid

    if topk_ids is None:
        raise ValueError("a dense teacher signal is a full distribution: call with full=True")
    t_ids = topk_ids.long()
    n, k = t_ids.shape
    ids = response_ids.long().unsqueeze(-1)
    sampled_is_new = ~(t_ids == ids).any(-1, keepdim=True)
    slot_ids = torch.cat([t_ids, ids], dim=-1)
    slot_valid = torch.cat([t_lp != float("-inf"), sampled_is_new], dim=-1)

    # Student: exact mass on the support, and the exact mass outside it as the tail.
    s_support = student_logp.gather(-1, slot_ids)
    in_support = torch.zeros_like(student_logp, dtype=torch.bool).scatter_(-1, slot_ids, True)
    s_tail = torch.logsumexp(student_logp.masked_fill(in_support, float("-inf")), dim=-1, keepdim=True)
    s_tail = s_tail.clamp(min=_LOG_TAIL_FLOOR)

    # Teacher: the mass it did not send goes to the tail.
    t_support = torch.cat([t_lp, sampled_logprobs.to(dtype).unsqueeze(-1)], dim=-1)
    t_mass = t_support.exp().masked_fill(~slot_valid, 0.0).sum(-1, keepdim=True)
    t_tail = torch.log((1.0 - t_mass).clamp(min=TAIL_FLOOR))

    valid = torch.cat([slot_valid, torch.ones(n, 1, dtype=torch.bool, device=t_ids.device)], dim=-1)
    student = torch.cat([s_support, s_tail], dim=-1)
    teacher = torch.cat([t_support, t_tail], dim=-1)
    student = (student - _masked_logsumexp(student, valid)).masked_fill(~valid, float("-inf"))
    teacher = (teacher - _masked_logsumexp(teacher, valid)).masked_fill(~valid, float("-inf"))
    return student, teacher, valid


def ids_at(topk_ids: torch.Tensor | None, index) -> torch.Tensor | None:
    """``topk_ids[index]``, or None for a dense signal's ids (None)."""
    return None if topk_ids is None else topk_ids[index]


def kl_over(p_log: torch.Tensor, q_log: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row [N] from log-probs [N, S] over the valid slots; 0 log 0 = 0."""
    zero = p_log.new_zeros(())
    # Slots where p is exactly 0 contribute nothing; sanitising first keeps NaNs out of gradients.
    usable = valid & torch.isfinite(p_log)
    p_safe = torch.where(usable, p_log, zero)
    q_safe = torch.where(usable, q_log, zero)
    return torch.where(usable, p_safe.exp() * (p_safe - q_safe), zero).sum(-1)


def generalized_jsd_over(
    student_log: torch.Tensor, teacher_log: torch.Tensor, valid: torch.Tensor, beta: float
) -> torch.Tensor:
    """Generalized JSD per row [N] in TRL's GKD convention.

    M = beta * P_T + (1 - beta) * P_S; JSD = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M).
    beta = 0 is forward KL(P_T || P_S), beta = 1 reverse KL(P_S || P_T).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_over(teacher_log, student_log, valid)
    if beta == 1.0:
        return kl_over(student_log, teacher_log, valid)
    # Invalid slots are zeroed first: a logsumexp over two -inf has a NaN gradient.
    zero = student_log.new_zeros(())
    student_log = torch.where(valid, student_log, zero)
    teacher_log = torch.where(valid, teacher_log, zero)
    mix = torch.logsumexp(
        torch.stack([student_log + math.log(1.0 - beta), teacher_log + math.log(beta)]), dim=0
    )
    return beta * kl_over(teacher_log, mix, valid) + (1.0 - beta) * kl_over(student_log, mix, valid)


def full_divergences(student_log: torch.Tensor, teacher_log: torch.Tensor, student_probs: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(P_S || P_T), KL(P_T || P_S), JSD(0.5) in nats), each [N], between two whole distributions
    given as log-probs [N, V] (or one block of their vocabulary: the terms of each id, summed), on
    their device. The same values as ``kl_over`` and ``generalized_jsd_over`` over every slot, for
    a finite ``student_log`` (a teacher id at -inf: reverse KL inf, no term elsewhere), without
    their masks: four [N, V] tensors and ten passes over them instead of several dozen.

    With d = s - t (s, t: the log-probs), p = e^s, q = e^t, g = log(2p / (p + q)) = ln 2 + log sigmoid(d):
    rkl = sum p d, fkl = -sum q d, and JSD = 1/2 sum p g + 1/2 sum q (g - d), since
    log(2q / (p + q)) = g - d. Each term is formed per id, so nothing large cancels in the sums.
    ``student_probs``: exp(``student_log``) when the caller has it (not written)."""
    p = student_log.exp() if student_probs is None else student_probs
    diff = student_log - teacher_log
    rkl = torch.linalg.vecdot(p, diff)
    q = teacher_log.exp()
    # A teacher id at -inf has q = 0 and d = +inf: its terms are 0 (0 log 0 = 0), not 0 x inf.
    # Clamping the infinite differences to the largest float keeps them 0 and changes no finite
    # one; log sigmoid of it is 0, as of +inf.
    diff.clamp_(max=torch.finfo(diff.dtype).max)
    fkl = -torch.linalg.vecdot(q, diff)
    g = torch.nn.functional.logsigmoid(diff).add_(math.log(2.0))
    jsd = 0.5 * (torch.linalg.vecdot(p, g) + torch.linalg.vecdot(q, g.sub_(diff)))
    return rkl, fkl, jsd


def teacher_logprob_lookup(
    query_ids: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
) -> torch.Tensor:
    """Teacher log-probs [N, Q] of arbitrary ids [N, Q] from a top-K signal; -inf where unknown.

    Known ids are the teacher's top-K and the sampled token (``response_ids`` [N]). Values are
    the teacher's own, not renormalised.
    """
    dtype = topk_logprobs.dtype
    hits = query_ids.unsqueeze(-1) == topk_ids.long().unsqueeze(-2)  # [N, Q, K]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=query_ids.device)
    from_topk = torch.where(hits, topk_logprobs.unsqueeze(-2), neg_inf).amax(-1)
    is_sampled = query_ids == response_ids.long().unsqueeze(-1)
    from_sampled = torch.where(is_sampled, sampled_logprobs.to(dtype).unsqueeze(-1), neg_inf)
    return torch.maximum(from_topk, from_sampled)


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """bool [N, K]: True at the first slot of each distinct id of a row of ``ids`` [N, K]."""
    ordered, order = ids.sort(dim=-1, stable=True)
    repeat = torch.cat([torch.zeros_like(ordered[:, :1], dtype=torch.bool), ordered[:, 1:] == ordered[:, :-1]], -1)
    return ~torch.zeros_like(repeat).scatter_(-1, order, repeat)


def stable_topk_ids(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [..., k] of the k largest values per row [..., V], ties at the k-th place broken towards
    lower ids, in id order, on the values' device.

    ``torch.topk`` leaves the order of ties unspecified (and it differs between devices);
    bf16 logits tie often, so the choice must not depend on it. A tie straddles the k-th place
    exactly when the k-th and (k+1)-th largest values are equal: only those rows take the exact
    tie-break (which needs [rows, V] work); the others sort ``topk``'s ids.
    """
    width = values.shape[-1]
    if k == width:
        return torch.arange(width, device=values.device).expand(values.shape).clone()
    top = torch.topk(values, k + 1, dim=-1)
    ids = top.indices[..., :k].sort(dim=-1).values
    tied = top.values[..., k] == top.values[..., k - 1]
    if bool(tied.any()):
        ids[tied] = _tie_broken_topk_ids(values[tied], k)
    return ids


def _tie_broken_topk_ids(values: torch.Tensor, k: int) -> torch.Tensor:
    """``stable_topk_ids`` of rows [N, V] by a running count of the ties at the k-th value."""
    kth = torch.topk(values, k, dim=-1).values[..., -1:]
    above = values > kth
    tied = values == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=-1) <= room))
    return chosen.nonzero()[:, -1].reshape(values.shape[0], k)
