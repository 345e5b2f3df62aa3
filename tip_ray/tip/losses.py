"""Distillation losses per token and their reduction over the kept set (TIP_SPEC section 5).

Objectives (``kind``):
- ``rkl``: KL(P_S || P_T), exact in full mode, top-K + tail bucket otherwise (the default);
- ``fkl``: KL(P_T || P_S) on the same support;
- ``jsd``: generalized JSD(beta), TRL's GKD convention (beta=0 forward KL, beta=1 reverse KL);
- ``k1``: sampled-token estimator log P_S(y) - log P_T(y); its value is k1 and its gradient the
  policy-gradient one, (log P_S(y) - log P_T(y)) * grad log P_S(y), which is unbiased for the
  gradient of the reverse KL on the student's own samples;
- ``k3``: sampled-token estimator r - 1 - log r with r = P_T(y) / P_S(y), differentiated
  directly (verl's ``low_var_kl``).

``distill_loss_from_logits`` is the plain path that holds full [B, T, V] logits with gradient;
the memory-lean path in ``tip_ray.tip.lean`` computes the same loss without them.
"""

from __future__ import annotations

import torch

from tip_ray.tip.signal import TeacherSignal
from tip_ray.tip.stats import validate_student_inputs, work_dtype
from tip_ray.tip.support import aligned_distributions, generalized_jsd_over, kl_over

LOSS_KINDS: tuple[str, ...] = ("rkl", "fkl", "jsd", "k1", "k3")
NORMALIZATIONS: tuple[str, ...] = ("kept", "valid")


def check_loss_options(kind: str, beta: float, normalization: str) -> None:
    """Raise ValueError naming the option when a loss setting is not one we implement."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}; known losses: {', '.join(LOSS_KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")


def token_losses_for_rows(
    logits: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    kind: str = "rkl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position loss [N] with gradient for N rows: logits [N, V], ids [N], teacher rows ([N, K]
    ids, None for a dense signal; [N, K] log-probs; [N])."""
    logp = torch.log_softmax(logits.to(work_dtype(logits.dtype)), dim=-1)
    if kind in ("k1", "k3"):
        student = logp.gather(-1, response_ids.long().unsqueeze(-1)).squeeze(-1)
        teacher = sampled_logprobs.to(logp.dtype)
        if kind == "k1":
            advantage = (student - teacher).detach()
            surrogate = advantage * student
            return surrogate - surrogate.detach() + advantage
        log_ratio = teacher - student
        return torch.exp(log_ratio) - log_ratio - 1.0
    full = topk_ids is None or topk_ids.shape[-1] == logits.shape[-1]
    s_log, t_log, valid = aligned_distributions(logp, response_ids, topk_ids, topk_logprobs, sampled_logprobs, full)
    if kind == "rkl":
        return kl_over(s_log, t_log, valid)
    if kind == "fkl":
        return kl_over(t_log, s_log, valid)
    if kind == "jsd":
        return generalized_jsd_over(s_log, t_log, valid, beta)
    raise ValueError(f"unknown loss {kind!r}; known losses: {', '.join(LOSS_KINDS)}")


def loss_denominator(weights: torch.Tensor, mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """The reduction's divisor: the sum of kept weights (``kept``) or the valid count (``valid``)."""
    if normalization == "kept":
        return weights.sum()
    if normalization == "valid":
        return mask.sum().to(weights.dtype)
    raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")


def reduce_token_loss(
    per_token: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    normalization: str = "kept",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(weights * per_token) / denominator, a scalar; 0 (with a graph) when nothing is kept.

    Shapes [B, T] (or any, all equal). ``denominator`` overrides the local one, e.g. the
    global kept count of a data-parallel step, so that shards sum to the global token mean.
    """
    den = loss_denominator(weights, mask, normalization) if denominator is None else denominator
    den = torch.as_tensor(den, dtype=per_token.dtype, device=per_token.device)
    total = (per_token * weights.to(per_token.dtype)).sum()
    return total / den if float(den) > 0 else total * 0.0


def distill_loss_from_logits(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    teacher: TeacherSignal,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    kind: str = "rkl",
    beta: float = 0.5,
    normalization: str = "kept",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain loss from full student logits [B, T, V] (with gradient) over weighted tokens.

    ``weights`` [B, T] from ``token_weights`` (default: every valid token). Materialises the
    full-vocabulary log-softmax for every valid position: the reference the lean path must match.
    """
    check_loss_options(kind, beta, normalization)
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    batch, length, vocab = student_logits.shape
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    teacher_rows = teacher.checked_rows(batch, length, vocab, mask)
    if weights is None:
        weights = mask.to(work_dtype(student_logits.dtype))
    per_valid = token_losses_for_rows(student_logits[mask], response_ids[mask], *teacher_rows, kind, beta)
    return reduce_token_loss(per_valid, weights[mask], mask, normalization, denominator)


def policy_gradient_loss_from_logits(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The task-reward term from full student logits [B, T, V] (with gradient): the on-policy
    policy gradient sum_{b, t in mask} -A_b log P_S(y_{b,t}) / ``denominator`` (default: the
    ``mask`` [B, T] count), ``advantages`` [B] one per sequence. The plain reference of the term
    ``tip_ray.tip.lean.kept_token_losses`` adds."""
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    batch, length, vocab = student_logits.shape
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    if tuple(advantages.shape) != (batch,):
        raise ValueError(f"advantages must be [B] = [{batch}], got {tuple(advantages.shape)}")
    logp = torch.log_softmax(student_logits[mask].to(work_dtype(student_logits.dtype)), dim=-1)
    sampled = logp.gather(-1, response_ids[mask].long().unsqueeze(-1)).squeeze(-1)
    per_token_adv = advantages.to(logp.dtype).unsqueeze(-1).expand(batch, length)[mask]
    den = mask.sum() if denominator is None else denominator
    den = torch.as_tensor(den, dtype=logp.dtype, device=logp.device)
    total = -(per_token_adv * sampled).sum()
    return total / den if float(den) > 0 else total * 0.0
