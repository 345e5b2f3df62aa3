"""The memory-lean distillation loss (TIP_SPEC section 6).

Full-vocabulary logits, not the backbone, set a distillation learner's peak memory. This path
never holds them with gradient:

1. ``token_stats_from_hidden`` (``tip_ray.tip.lean_stats``): the lm_head runs on the valid hidden states chunk by chunk
   without gradient, each chunk of rows streamed over blocks of ``vocab_chunk`` vocabulary ids
   (an online log-sum-exp, as in fused cross-entropy kernels), and only the per-token
   statistics (a few floats per token) are kept;
2. selection picks the kept tokens (over the global batch, if the caller gathers statistics);
3. ``kept_token_loss``: the lm_head and the loss run on the kept hidden states alone, one chunk
   at a time; each chunk's gradient with respect to its logits is turned into gradients of the
   hidden states and the lm_head at once, so no chunk's logits outlive the chunk. With a top-K
   signal that gradient is derived from the loss on the K + 2 bucket masses and written over the
   chunk's logits, so the chunk holds one [chunk_rows, V] float32 tensor.

When every valid token is kept (the rule ``all``) stage 1 is not needed first: with
``with_stats`` the loss computes the statistics from each chunk's logits before they become its
gradient (``stats_from_logit_rows``), one lm_head pass per token instead of two.

With per-sequence ``advantages`` (task rewards, ``tip_ray.tip.advantages``) ``kept_token_losses`` adds
the on-policy policy gradient -A_i log p(y_t) at every response token of sequence i: log p(y_t) is
the sampled id's bucket less the log-sum-exp of the buckets, so the term rides on the same chunks
(its rows join the kept ones) with no other [chunk_rows, V] tensor.

Working memory is O(chunk_rows * vocab_chunk) for the statistics and O(chunk_rows * V) for the
kept-token loss (one such tensor with a top-K signal, several in full mode), whatever the number
of tokens, plus the lm_head's gradient. The loss's chunks hold min(chunk_rows, kept rows) rows.

Precision: statistics are computed from float32 logits (float64 stays float64) even when the
backbone and the lm_head are bf16: the lm_head is upcast ``HEAD_BLOCK_ROWS`` vocabulary rows at a
time, never whole. The loss's lm_head (and bias) gradient is accumulated over chunks in float32
and cast to the weight's dtype once, when handed to autograd: bf16 sums over hundreds of chunks
would lose the small late contributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tip_ray.tip.lean_stats import (
    DEFAULT_LEAN_CHUNK_ROWS,
    DEFAULT_LEAN_VOCAB_CHUNK,
    HEAD_BLOCK_ROWS,
    _check_block_finite,
    _check_chunk,
    _check_head,
    compact_buckets,
    full_stats_from_log_probs,
    stats_from_logit_rows,
    token_stats_from_hidden,
)
from tip_ray.tip.losses import check_loss_options, loss_denominator, token_losses_for_rows
from tip_ray.tip.select import Direction, Scope, token_weights
from tip_ray.tip.signal import TeacherSignal
from tip_ray.tip.stats import DEFAULT_TA_K, TokenStats, validate_student_inputs, work_dtype
from tip_ray.tip.support import first_occurrences, full_teacher_log, ids_at

__all__ = ["DEFAULT_LEAN_CHUNK_ROWS", "DEFAULT_LEAN_VOCAB_CHUNK", "HEAD_BLOCK_ROWS", "KeptTokenLosses",
           "LeanLossOutput", "fused_stats_exact", "kept_token_loss", "kept_token_losses", "lean_distill_loss",
           "stats_from_logit_rows", "token_stats_from_hidden"]


def _with_policy_gradient(
    distill: torch.Tensor, logits: torch.Tensor, sampled_place: torch.Tensor, pg_coefs: torch.Tensor | None,
    distinct: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the chunk's objective: ``distill`` + sum_i c_i * -log p(y_i), log p(y_i) [N] detached or None)
    from ``logits`` [N, S] (the full vocabulary, or the bucket log-masses with ``distinct`` [N, S]
    marking the entries that count once in the normaliser) and ``pg_coefs`` c [N]."""
    if pg_coefs is None:
        return distill, None
    normaliser = logits if distinct is None else logits.masked_fill(~distinct, float("-inf"))
    logp = logits.gather(-1, sampled_place.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(normaliser, -1)
    return distill - (pg_coefs.to(logp.dtype) * logp).sum(), logp.detach()


def _autograd_chunk_grad(
    logits: torch.Tensor, response_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor, weights: torch.Tensor, kind: str, beta: float,
    pg_coefs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(sum_i w_i loss_i, log p(y_i) [N] or None, the gradient of sum_i w_i loss_i - c_i log p(y_i)
    with respect to ``logits`` [N, V]; c = ``pg_coefs`` [N] or no such term) by autograd through
    the loss over the whole vocabulary: several [N, V] temporaries. Used where the bucketed form
    does not apply (full mode)."""
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(True)
        per_token = token_losses_for_rows(logits, response_ids, topk_ids, topk_logprobs, sampled_logprobs,
                                          kind, beta)
        chunk_loss = (per_token * weights.to(per_token.dtype)).sum()
        objective, logp = _with_policy_gradient(chunk_loss, logits, response_ids.long(), pg_coefs)
        (grad_logits,) = torch.autograd.grad(objective, logits)
    return chunk_loss.detach(), logp, grad_logits


def _full_chunk_grad(
    logits: torch.Tensor, response_ids: torch.Tensor, topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor, weights: torch.Tensor, kind: str, beta: float,
    pg_coefs: torch.Tensor | None = None, sink: _StatsSink | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``_autograd_chunk_grad`` for a full-distribution signal (ids [N, V] or None: dense) and the
    losses ``rkl`` and ``fkl``, in closed form in the storage of ``logits`` [N, V] (overwritten;
    float32 or float64) beside two more [N, V] tensors (the student's probabilities and the
    teacher's log-probs; three with the teacher's probabilities for fkl), against several more
    under autograd.

    With s = log p the student's log-softmax and t the teacher's renormalised log-probs:
    rkl = sum_j p_j (s_j - t_j), d rkl / d l_k = p_k (s_k - t_k - rkl); fkl = sum_j q_j (t_j - s_j),
    d fkl / d l_k = p_k sum_j q_j - q_k (q = e^t); the policy-gradient term -c log p(y) adds
    c (p_k - [k = y]). Where ``kl_over`` would drop a slot (p_j = 0 in rkl, q_j = 0 in fkl) the
    term is 0 here as well: p_j > 0 for finite logits, and q_j = 0 makes q_j (t_j - s_j) and q_j 0.

    With ``sink`` (the rule `all`) the rows' statistics are appended to it from the same
    log-probs, probabilities and teacher (``full_stats_from_log_probs``) before they become the
    gradient: no second log-softmax, teacher renormalisation or vocabulary scan for them."""
    teacher = full_teacher_log(topk_ids, topk_logprobs, logits.shape[-1], logits.dtype)
    if sink is not None:  # as the statistics pass: NaN and +inf raise the row max, -inf lowers the min
        _check_block_finite(logits.amax(-1), logits.amin(-1))
    s = logits.sub_(torch.logsumexp(logits, -1, keepdim=True))  # the student's log-probs, in place
    ids = response_ids.long().unsqueeze(-1)
    logp = s.gather(-1, ids).squeeze(-1) if pg_coefs is not None else None
    p = s.exp()
    if sink is not None:
        sink.chunks.append(full_stats_from_log_probs(s, p, teacher, response_ids, sampled_logprobs, ta_k=sink.ta_k,
                                                     vocab_chunk=sink.vocab_chunk))
    w = weights.to(s.dtype).unsqueeze(-1)
    if kind == "rkl":
        diff = s.sub_(teacher)  # s - t, in place
        per_token = torch.linalg.vecdot(p, diff)
        grad = diff.sub_(per_token.unsqueeze(-1)).mul_(p).mul_(w)
    else:
        q = teacher.exp()
        # q (t - s), 0 where q = 0 (t = -inf): kl_over's 0 log 0 = 0.
        per_token = torch.linalg.vecdot(q, teacher.sub_(s).masked_fill_(q == 0, 0.0))
        grad = torch.mul(p, q.sum(-1, keepdim=True), out=s).sub_(q).mul_(w)
    if pg_coefs is not None:
        c = pg_coefs.to(s.dtype).unsqueeze(-1)
        grad.add_(p.mul_(c)).scatter_add_(-1, ids, -c)
    return (per_token * weights.to(per_token.dtype)).sum().detach(), logp, grad


def _bucketed_chunk_grad(
    logits: torch.Tensor, response_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor, weights: torch.Tensor, kind: str, beta: float,
    pg_coefs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(sum_i w_i loss_i, log p(y_i) [N] or None, the gradient of sum_i w_i loss_i - c_i log p(y_i)
    with respect to ``logits`` [N, V]; c = ``pg_coefs`` [N] or no such term) for a top-K signal,
    in the storage of ``logits`` (overwritten; float32 or float64), with no other [N, V] tensor.

    A top-K loss reads the student only through the log-mass of its buckets (each teacher id, the
    sampled id, the tail holding every other id): x_b = log sum_{j in b} exp(l_j). The loss is
    computed by autograd on those [N, K + 2] bucket values (``compact_buckets``, the compact
    vocabulary the statistics use too, through the same ``token_losses_for_rows``), and its
    gradient g_b is carried back to the logits by dx_b/dl_j = exp(l_j - x_b) for j in b: g_b itself for a single-id bucket, and
    g_tail exp(l_j - x_tail) for each tail id. The tail's terms are formed in place. The policy
    gradient term reads log p(y) = x_{b(y)} - log sum_b x_b over the buckets (a teacher id listed
    twice counted once, an absent slot not at all) and goes back to the logits the same way.
    """
    k = topk_ids.shape[-1]
    t_ids, ids = topk_ids.long(), response_ids.long().unsqueeze(-1)
    read = logits.gather(-1, torch.cat([t_ids, ids], dim=-1))
    # The support ids leave the tail: exp(-inf) = 0 below, so they hold no tail term.
    logits.scatter_(-1, t_ids, float("-inf")).scatter_(-1, ids, float("-inf"))
    tail_max = logits.amax(-1, keepdim=True)
    tail_terms = logits.sub_(tail_max).exp_()  # exp(l_j - tail_max) for tail ids, 0 on the support
    tail_sum = tail_terms.sum(-1)
    buckets, sampled_place, topk_places = compact_buckets(read, tail_max.squeeze(-1) + tail_sum.log(),
                                                          response_ids.long(), t_ids, topk_logprobs)
    with torch.enable_grad():
        buckets = buckets.detach().requires_grad_(True)
        per_token = token_losses_for_rows(buckets, sampled_place, topk_places, topk_logprobs, sampled_logprobs,
                                          kind, beta)
        chunk_loss = (per_token * weights.to(per_token.dtype)).sum()
        distinct = None
        if pg_coefs is not None:
            distinct = torch.cat([first_occurrences(t_ids), torch.ones_like(t_ids[:, :2], dtype=torch.bool)], -1)
        objective, logp = _with_policy_gradient(chunk_loss, buckets, sampled_place, pg_coefs, distinct)
        (grad_buckets,) = torch.autograd.grad(objective, buckets)
    is_new = sampled_place == k
    grad_logits = tail_terms.mul_((grad_buckets[:, k + 1] / tail_sum).unsqueeze(-1))
    # scatter_add: a teacher id listed twice receives both slots' gradients, as under autograd.
    grad_logits.scatter_add_(-1, t_ids, grad_buckets[:, :k])
    grad_logits.scatter_add_(-1, ids, torch.where(is_new, grad_buckets[:, k], 0.0).unsqueeze(-1))
    return chunk_loss.detach(), logp, grad_logits


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum_i w_i * loss_i - c_i * log p(y_i) over rows, with the gradient computed chunk by chunk
    in forward (``pg_coefs`` c None: no policy-gradient term).

    Each chunk's logits are made in the head's dtype (as the model's own lm_head would) and
    differentiated in float32; the lm_head/bias gradient sums over chunks in float32 (float64
    stays), the hidden-state gradient is written once per row in the hidden states' dtype. With a
    top-K signal the chunk's gradient with respect to its logits is formed in the logits' own
    storage (``_bucketed_chunk_grad``): one float32 [chunk_rows, V] tensor per chunk; with a full
    distribution and the loss rkl or fkl, in closed form (``_full_chunk_grad``).

    Outputs: the objective (with gradient), sum_i w_i * loss_i alone, and log p(y_i) [rows] (empty
    without the term); the last two carry no gradient. With a ``_StatsSink`` each chunk's
    statistics (``stats_from_logit_rows``) are appended to it from the chunk's logits before they
    become its gradient: the rows' statistics without a second lm_head pass (in the closed form,
    from its own log-probs: ``_full_chunk_grad``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, response_ids, topk_ids, topk_logprobs, sampled_logprobs,
                token_weights_, pg_coefs, kind, beta, chunk_rows, sink):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = work_dtype(weight.dtype)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (bias is not None and need_b) else None
        total = torch.zeros((), dtype=work_dtype(hidden.dtype), device=hidden.device)
        distill = torch.zeros_like(total)
        logps = []
        # The bucketed gradient needs at least one id outside the support (K teacher ids + the
        # sampled one); full mode takes the closed form (rkl, fkl) or autograd (the other losses),
        # and so do top-K signals over vocabularies that small.
        bucketed = topk_ids is not None and topk_ids.shape[-1] + 1 < weight.shape[0]
        closed_form = not bucketed and topk_logprobs.shape[-1] == weight.shape[0] and kind in ("rkl", "fkl")
        chunk_grad = _bucketed_chunk_grad if bucketed else _full_chunk_grad if closed_form else _autograd_chunk_grad
        for i in range(0, hidden.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            h = hidden[rows]
            coefs = pg_coefs[rows] if pg_coefs is not None else None
            logits = F.linear(h, weight, bias).to(acc)
            chunk = (logits, response_ids[rows], ids_at(topk_ids, rows), topk_logprobs[rows], sampled_logprobs[rows],
                     token_weights_[rows], kind, beta, coefs)
            if sink is not None and closed_form:  # the statistics from the closed form's own log-probs
                chunk_loss, logp, grad_logits = _full_chunk_grad(*chunk, sink=sink)
            else:
                if sink is not None:
                    sink.chunks.append(stats_from_logit_rows(*chunk[:5], ta_k=sink.ta_k, vocab_chunk=sink.vocab_chunk))
                chunk_loss, logp, grad_logits = chunk_grad(*chunk)
            del chunk
            del logits
            distill += chunk_loss.to(total.dtype)
            total += chunk_loss.to(total.dtype)
            if logp is not None:
                total -= (coefs.to(logp.dtype) * logp).sum().to(total.dtype)
                logps.append(logp.to(total.dtype))
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                # Only the chunk is upcast: [V, c] x [c, H] straight into the float32 sum.
                grad_weight.addmm_(grad_logits.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del grad_logits
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.consumed = False
        logp_rows = torch.cat(logps) if logps else total.new_zeros(0)
        ctx.mark_non_differentiable(distill, logp_rows)
        return total, distill, logp_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_distill, _grad_logp):
        if ctx.consumed:
            raise RuntimeError("the lean TIP loss supports one backward pass per forward (no retain_graph reuse)")
        ctx.consumed = True
        # Scaled in place and handed over in the input's dtype: autograd adopts the buffers as
        # .grad, so at most one cast copy of an lm_head-sized tensor is made (none in float32).
        grads = [g.mul_(grad_output.to(g.dtype)).to(dtype) if present else None
                 for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None, None, None)


@dataclass
class _StatsSink:
    """Where ``_ChunkedHeadLoss`` leaves each chunk's statistics (``ta_k``, ``vocab_chunk`` as in
    ``token_stats_from_hidden``): the dicts of ``stats_from_logit_rows``, in row order."""

    ta_k: int
    vocab_chunk: int
    chunks: list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class KeptTokenLosses:
    """``loss``: the scalar to differentiate, distillation + ``reward_coef`` * policy gradient;
    ``distill`` and ``reward`` (the policy-gradient term before its coefficient): its two parts,
    detached scalars (``reward`` 0 without advantages); ``stats``: with ``with_stats``, the
    statistics [B, T] of every valid position, else None."""

    loss: torch.Tensor
    distill: torch.Tensor
    reward: torch.Tensor
    stats: TokenStats | None = None


def kept_token_losses(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: TeacherSignal,
    response_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    kind: str = "rkl",
    beta: float = 0.5,
    normalization: str = "kept",
    denominator: float | torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_LEAN_CHUNK_ROWS,
    advantages: torch.Tensor | None = None,
    reward_coef: float = 1.0,
    reward_denominator: float | torch.Tensor | None = None,
    with_stats: bool = False,
    ta_k: int = DEFAULT_TA_K,
    vocab_chunk: int = DEFAULT_LEAN_VOCAB_CHUNK,
) -> KeptTokenLosses:
    """The distillation loss over the positions with non-zero ``weights`` [B, T], plus, with
    ``advantages`` [B] (one per sequence), the policy-gradient term of task rewards.

    Distillation: sum_t w_t loss_t / ``denominator`` (default from ``normalization`` and the local
    ``weights``/``mask``, as in ``reduce_token_loss``). Reward term: ``reward_coef`` *
    sum_{b, t in mask} -A_b log p(y_{b,t}) / ``reward_denominator`` (default: the local ``mask``
    count; a data-parallel learner passes the global batch's response tokens, so the term is a
    token-level mean over the global batch). It covers every valid token of a sequence with
    A_b != 0, kept or not: those rows join the kept ones in the chunks, and no other [chunk_rows, V]
    tensor appears. Gradient flows into ``hidden`` [B, T, H], ``lm_head_weight`` [V, H] and
    ``lm_head_bias``; only ``chunk_rows`` rows of logits exist at a time. Equals
    ``distill_loss_from_logits`` + ``reward_coef`` * ``policy_gradient_loss_from_logits`` on
    ``hidden @ W.T + b``.

    ``with_stats`` (every valid position kept, as under the rule ``all``): also the statistics of
    ``token_stats_from_hidden(..., ta_k=ta_k, chunk_rows=chunk_rows, vocab_chunk=vocab_chunk)``,
    taken from the loss's own chunk logits (one lm_head pass instead of two). Only where those
    logits are what the statistics pass would compute: the head and ``hidden`` float32 (or
    float64); a bf16 head's statistics are taken from logits of the upcast head instead.
    """
    check_loss_options(kind, beta, normalization)
    _check_chunk(chunk_rows)
    batch, length, vocab = _check_head(hidden, lm_head_weight, lm_head_bias)
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    if tuple(weights.shape) != (batch, length):
        raise ValueError(f"weights must be [B, T] = {(batch, length)}, got {tuple(weights.shape)}")
    if bool((weights[~mask] != 0).any()):
        raise ValueError("weights are non-zero at positions outside the mask (prompt or padding)")
    checked = teacher.checked_rows(batch, length, vocab, mask)
    sink = None
    if with_stats:
        _check_chunk(vocab_chunk, "vocab_chunk")
        if not fused_stats_exact(hidden.dtype, lm_head_weight.dtype,
                                 None if lm_head_bias is None else lm_head_bias.dtype):
            raise ValueError("with_stats needs float32 or float64 hidden states and lm_head (the statistics are "
                             f"taken from float32 logits); got {hidden.dtype} and {lm_head_weight.dtype}")
        if bool((weights[mask] == 0).any()):
            raise ValueError("with_stats needs a non-zero weight at every valid position (the rule `all`): the "
                             "statistics come from the rows the loss runs on")
        sink = _StatsSink(ta_k, vocab_chunk, [])
    real = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    kept = weights != 0
    den = loss_denominator(weights, mask, normalization) if denominator is None else denominator
    den = torch.as_tensor(den, dtype=real, device=hidden.device)
    distill_on = bool(kept.any()) and float(den) > 0
    zero = torch.zeros((), dtype=real, device=hidden.device)
    rows, pg_coefs = kept if distill_on else torch.zeros_like(kept), None
    token_adv, reward_den = None, None
    if advantages is not None:
        if tuple(advantages.shape) != (batch,) or not advantages.dtype.is_floating_point:
            raise ValueError(f"advantages must be float [B] = [{batch}], got {advantages.dtype} "
                             f"{tuple(advantages.shape)}")
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("advantages hold NaN or inf")
        token_adv = torch.where(mask, advantages.to(device=hidden.device, dtype=real).unsqueeze(-1), 0.0)
        reward_den = torch.as_tensor(mask.sum() if reward_denominator is None else reward_denominator, dtype=real,
                                     device=hidden.device)
        if float(reward_den) > 0:
            rows = rows | (token_adv != 0)
    if sink is not None and not torch.equal(rows, mask):
        raise ValueError(f"with_stats needs the loss to run on every valid position; the denominator is {float(den)}")
    # The rows checked above are the loss's own when it runs on every valid position (the rule
    # `all`); otherwise they are let go before the loss's rows are taken.
    teacher_rows = checked if torch.equal(rows, mask) else None
    del checked
    work = work_dtype(torch.promote_types(hidden.dtype, lm_head_weight.dtype))

    def joined_stats() -> TokenStats | None:
        return None if sink is None else TokenStats.from_chunks(sink.chunks, response_ids, mask, vocab, work)

    if not bool(rows.any()):
        # Nothing to learn from: a zero that still joins the graph, so backward() works.
        return KeptTokenLosses(hidden.sum() * 0.0 + lm_head_weight.sum() * 0.0, zero, zero, joined_stats())
    # The objective is divided by ``scale`` once; the reward rows' coefficients are scaled to match.
    scale = den if distill_on else torch.ones((), dtype=real, device=hidden.device)
    row_weights = weights[rows] if distill_on else torch.zeros_like(weights[rows])
    if token_adv is not None and float(reward_den) > 0:
        pg_coefs = token_adv[rows] * (reward_coef * scale / reward_den)
    if teacher_rows is None:
        teacher_rows = teacher.rows(rows)
    total, distill, logp = _ChunkedHeadLoss.apply(
        hidden[rows], lm_head_weight, lm_head_bias, response_ids[rows], *teacher_rows, row_weights, pg_coefs,
        kind, beta, chunk_rows, sink,
    )
    reward = zero
    if pg_coefs is not None:
        reward = -(token_adv[rows].to(logp.dtype) * logp).sum().to(real) / reward_den
    return KeptTokenLosses(total / scale, (distill / scale).detach() if distill_on else zero, reward.detach(),
                           joined_stats())


def fused_stats_exact(hidden_dtype: torch.dtype, head_dtype: torch.dtype, bias_dtype: torch.dtype | None = None) -> bool:
    """Whether the kept-token loss's chunk logits are the logits the statistics pass computes
    (``kept_token_losses(..., with_stats=True)`` applies): hidden states, head and bias all in one
    float32 or float64 dtype, so neither side upcasts."""
    dtypes = {hidden_dtype, head_dtype} | ({bias_dtype} if bias_dtype is not None else set())
    return len(dtypes) == 1 and hidden_dtype in (torch.float32, torch.float64)


def kept_token_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: TeacherSignal,
    response_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    kind: str = "rkl",
    beta: float = 0.5,
    normalization: str = "kept",
    denominator: float | torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_LEAN_CHUNK_ROWS,
) -> torch.Tensor:
    """The distillation loss over the positions with non-zero ``weights`` [B, T], a scalar.

    Gradient flows into ``hidden`` [B, T, H], ``lm_head_weight`` [V, H] and ``lm_head_bias``.
    Equals ``distill_loss_from_logits`` on ``hidden @ W.T + b`` with the same weights, but
    only ``chunk_rows`` rows of logits exist at a time. ``denominator`` as in
    ``reduce_token_loss`` (default from ``normalization`` and the local ``weights``/``mask``).
    ``kept_token_losses`` adds the task-reward term.
    """
    return kept_token_losses(hidden, lm_head_weight, teacher, response_ids, weights, mask,
                             lm_head_bias=lm_head_bias, kind=kind, beta=beta, normalization=normalization,
                             denominator=denominator, chunk_rows=chunk_rows).loss


@dataclass(frozen=True)
class LeanLossOutput:
    """The loss (scalar, with gradient), the statistics, the rule's weights [B, T] and counts."""

    loss: torch.Tensor
    stats: TokenStats
    weights: torch.Tensor
    num_kept: int
    num_valid: int


def lean_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: TeacherSignal,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    rule: str = "soft_or",
    ratio: float | None = None,
    loss: str = "rkl",
    beta: float = 0.5,
    normalization: str = "kept",
    lm_head_bias: torch.Tensor | None = None,
    ta_k: int = DEFAULT_TA_K,
    chunk_rows: int = DEFAULT_LEAN_CHUNK_ROWS,
    generator: torch.Generator | None = None,
    direction: Direction = "top",
    scope: Scope = "batch",
    **rule_params: object,
) -> LeanLossOutput:
    """Statistics -> selection -> kept-token loss for one process's batch.

    ``hidden`` [B, T, H] final hidden states aligned so that position t predicts
    ``response_ids[:, t]``; ``lm_head_weight`` [V, H]; ``teacher`` and ``mask`` [B, T].
    Selection uses ``rule``/``ratio``/``direction``/``scope`` and ``rule_params`` as in
    ``select_tokens``. A data-parallel learner calls the three stages itself, to select over
    the global batch.
    """
    check_loss_options(loss, beta, normalization)
    stats = token_stats_from_hidden(
        hidden, lm_head_weight, teacher, response_ids, mask, lm_head_bias=lm_head_bias, ta_k=ta_k,
        chunk_rows=chunk_rows,
    )
    weights = token_weights(stats, rule, ratio, None, generator, direction=direction, scope=scope, **rule_params)
    value = kept_token_loss(
        hidden, lm_head_weight, teacher, response_ids, weights.to(work_dtype(hidden.dtype)), mask,
        lm_head_bias=lm_head_bias,
        kind=loss, beta=beta, normalization=normalization, chunk_rows=chunk_rows,
    )
    return LeanLossOutput(value, stats, weights, int((weights != 0).sum()), stats.num_valid)
