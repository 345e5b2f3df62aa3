"""The memory-lean distillation loss (TIP_SPEC section 6).

Full-vocabulary logits, not the backbone, set a distillation learner's peak memory. This path
never holds them with gradient:

1. ``token_stats_from_hidden``: the lm_head runs on the valid hidden states chunk by chunk
   without gradient, each chunk of rows streamed over blocks of ``vocab_chunk`` vocabulary ids
   (an online log-sum-exp, as in fused cross-entropy kernels), and only the per-token
   statistics (a few floats per token) are kept;
2. selection picks the kept tokens (over the global batch, if the caller gathers statistics);
3. ``kept_token_loss``: the lm_head and the loss run on the kept hidden states alone, one chunk
   at a time; each chunk's gradient with respect to its logits is turned into gradients of the
   hidden states and the lm_head at once, so no chunk's logits outlive the chunk. With a top-K
   signal that gradient is derived from the loss on the K + 2 bucket masses and written over the
   chunk's logits, so the chunk holds one [chunk_rows, V] float32 tensor.

Working memory is O(chunk_rows * vocab_chunk) for the statistics and O(chunk_rows * V) for the
kept-token loss (one such tensor with a top-K signal, several in full mode), whatever the number
of tokens, plus the lm_head's gradient. The loss's chunks
hold min(chunk_rows, kept rows) rows, so its peak, which sets the whole path's, falls with the
retention ratio once fewer than ``chunk_rows`` rows are kept.

Precision: statistics are computed from float32 logits (float64 stays float64) even when the
backbone and the lm_head are bf16: the lm_head is upcast ``HEAD_BLOCK_ROWS`` vocabulary rows at a
time, never whole. The loss's lm_head (and bias) gradient is accumulated over chunks in float32
and cast to the weight's dtype once, when handed to autograd: bf16 sums over hundreds of chunks
would lose the small late contributions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tip_ray.tip.losses import check_loss_options, loss_denominator, token_losses_for_rows
from tip_ray.tip.select import Direction, Scope, token_weights
from tip_ray.tip.signal import TeacherSignal
from tip_ray.tip.stats import (
    DEFAULT_TA_K,
    TokenStats,
    row_stats,
    stats_for_rows,
    validate_student_inputs,
    work_dtype,
)
from tip_ray.tip.support import (
    aligned_distributions,
    generalized_jsd_over,
    kl_over,
    stable_topk_ids,
    teacher_logprob_lookup,
)

DEFAULT_LEAN_CHUNK_ROWS = 512
# Vocabulary entries per block of the statistics pass: its temporaries are [chunk_rows x
# DEFAULT_LEAN_VOCAB_CHUNK] (32 MiB each in float32 at 512 rows) instead of [chunk_rows x V].
DEFAULT_LEAN_VOCAB_CHUNK = 16384
# Vocabulary rows of a low-precision lm_head upcast at a time for the statistics' logits: a
# [HEAD_BLOCK_ROWS, H] float32 copy (84 MB at H = 2560) instead of the whole head's.
HEAD_BLOCK_ROWS = 8192


def _check_head(hidden: torch.Tensor, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None) -> tuple[int, int, int]:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = {hidden.shape[-1]} (hidden size), got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(f"lm_head_bias must be [V] = [{lm_head_weight.shape[0]}], got {tuple(lm_head_bias.shape)}")
    return hidden.shape[0], hidden.shape[1], lm_head_weight.shape[0]


def _check_chunk(chunk_rows: int, name: str = "chunk_rows") -> None:
    if chunk_rows < 1:
        raise ValueError(f"{name} must be >= 1, got {chunk_rows}")


def _head_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """Logits ``rows @ weight.T + bias`` [N, V] in ``dtype`` for rows [N, H], weight [V, H], bias [V],
    on the rows' device. Operands in another dtype are upcast block by block (``HEAD_BLOCK_ROWS``
    vocabulary rows of the weight at a time): products of bf16 values are exact in float32, so
    this equals the float32 product of the upcast head without ever holding that copy."""
    if rows.dtype == dtype and weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        return F.linear(rows, weight, bias)
    rows = rows.to(dtype)
    vocab = weight.shape[0]
    out = torch.empty(rows.shape[0], vocab, dtype=dtype, device=rows.device)
    for start in range(0, vocab, HEAD_BLOCK_ROWS):
        stop = min(start + HEAD_BLOCK_ROWS, vocab)
        out[:, start:stop] = F.linear(rows, weight[start:stop].to(dtype),
                                      None if bias is None else bias[start:stop].to(dtype))
    return out


@torch.no_grad()
def token_stats_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: TeacherSignal,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    ta_k: int = DEFAULT_TA_K,
    chunk_rows: int = DEFAULT_LEAN_CHUNK_ROWS,
    vocab_chunk: int = DEFAULT_LEAN_VOCAB_CHUNK,
) -> TokenStats:
    """Token statistics from final hidden states [B, T, H] and the lm_head ([V, H], bias [V]).

    Same result as ``compute_token_stats`` on the logits ``hidden @ W.T + b`` taken in float32
    (float64 if either operand is), computed ``chunk_rows`` valid positions at a time, without
    gradient, on the device of ``hidden`` (every argument must be on it). A bf16 head is upcast
    in blocks (``_head_logits``), never copied whole. Returns statistics [B, T] in that dtype.

    ``vocab_chunk`` < V streams each block of rows over ``vocab_chunk`` vocabulary entries at a
    time (``_streamed_stats_for_rows``): the working memory is O(chunk_rows x vocab_chunk) plus
    O(rows x K) for the teacher signal, never a [chunk_rows, V] tensor (except the teacher's own
    dense distribution in full mode, K = V). ``vocab_chunk`` >= V computes each block's full
    logits and hands them to ``stats_for_rows``, the kernel of ``compute_token_stats``.
    """
    batch, length, vocab = _check_head(hidden, lm_head_weight, lm_head_bias)
    _check_chunk(chunk_rows)
    _check_chunk(vocab_chunk, "vocab_chunk")
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    teacher.validate(batch, length, vocab, mask)
    rows = hidden[mask]
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("hidden states hold NaN or inf at a response position")
    ids, t_ids, t_lp, t_samp = (
        response_ids[mask], teacher.topk_ids[mask], teacher.topk_logprobs[mask], teacher.sampled_logprobs[mask]
    )
    work = work_dtype(torch.promote_types(hidden.dtype, lm_head_weight.dtype))
    chunks = []
    for i in range(0, rows.shape[0], chunk_rows):
        part = (ids[i : i + chunk_rows], t_ids[i : i + chunk_rows], t_lp[i : i + chunk_rows],
                t_samp[i : i + chunk_rows], ta_k)
        if vocab_chunk >= vocab:
            logits = _head_logits(rows[i : i + chunk_rows], lm_head_weight, lm_head_bias, work)
            chunks.append(stats_for_rows(logits, *part))
            del logits
        else:
            chunks.append(_streamed_stats_for_rows(rows[i : i + chunk_rows], lm_head_weight, lm_head_bias, work,
                                                   vocab_chunk, *part))
    return TokenStats.from_chunks(chunks, response_ids, mask, vocab, work)


def _vocab_blocks(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  vocab_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits [N, stop - start]) for consecutive vocabulary blocks of ``vocab_chunk``
    ids, on the rows' device, in ``dtype``. Their finiteness is the caller's to check
    (``_check_block_finite``)."""
    vocab = weight.shape[0]
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        logits = _head_logits(rows, weight[start:stop], None if bias is None else bias[start:stop], dtype)
        yield start, logits
        del logits  # before the next block is made, not after


def _check_block_finite(block_max: torch.Tensor, block_a: torch.Tensor) -> None:
    """Raise if a block's logits held NaN or inf (as ``stats_for_rows`` does), from two [N]
    reductions of the block instead of a pass over it: NaN and +inf make the row max non-finite,
    and -inf makes exp(l - m) (l - m) = 0 x -inf NaN. Called before the block reaches a top-k."""
    if not (bool(torch.isfinite(block_max).all()) and bool(torch.isfinite(block_a).all())):
        raise ValueError("student logits hold NaN or inf at a response position")


def _gather_in_block(values: torch.Tensor, ids: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` [N, G] with the entries of ``ids`` [N, G] that fall in the block ``values`` [N, W]
    (vocabulary ids start .. start + W - 1) replaced by their values."""
    local = ids - start
    inside = (local >= 0) & (local < values.shape[-1])
    return torch.where(inside, values.gather(-1, local.clamp(0, values.shape[-1] - 1)), out)


def _streamed_stats_for_rows(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    vocab_chunk: int,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    ta_k: int,
) -> dict[str, torch.Tensor]:
    """``stats_for_rows`` of the logits ``rows @ weight.T + bias`` without ever holding them whole.

    rows [N, H], weight [V, H], bias [V]; teacher [N, K], [N, K], [N]; ids [N]; statistics in
    ``dtype``, on the rows' device. One pass over vocabulary blocks of ``vocab_chunk`` ids keeps,
    per row: an online log-sum-exp (running max m, Z = sum exp(l - m)), the entropy's
    A = sum exp(l - m) (l - m) (both rescaled when m grows), the logits at the ids the statistics
    read (the teacher's top-K or, in full mode, its top-``ta_k``, and the sampled token), the
    mass outside the teacher's support (top-K mode's tail bucket) and the running stable top-k
    of the student. Log-probs are then l - m - ln Z, and the statistics are formed from these by
    the same functions as ``stats_for_rows``. Full mode (K = V) needs every log-prob of both
    sides for its exact divergences: it recomputes each block in a second pass.
    """
    n, vocab = rows.shape[0], weight.shape[0]
    full = topk_ids.shape[-1] == vocab
    k = min(ta_k, vocab)
    ids = response_ids.long()
    t_ids = topk_ids.long()
    teacher_log = None
    if full:
        # The teacher's whole distribution arrived as [N, V]: densified per block of rows, as
        # aligned_distributions does, so that its top-k and lookups are plain gathers.
        _, teacher_log, _ = aligned_distributions(
            torch.zeros(n, vocab, dtype=dtype, device=rows.device), ids, t_ids, topk_logprobs,
            sampled_logprobs, True)
        t_top_ids = stable_topk_ids(teacher_log, k)
        read_ids = torch.cat([t_top_ids, ids.unsqueeze(-1)], dim=-1)
    else:
        read_ids = torch.cat([t_ids, ids.unsqueeze(-1)], dim=-1)

    # A few more candidates than k: the final ranking is by log-prob, where logits a rounding
    # apart can tie and the tie then goes to the lower id, as in stats_for_rows.
    n_cand = min(2 * k, vocab)
    m = z = a = tail = None
    cand_vals = cand_ids = None
    read = torch.zeros(read_ids.shape, dtype=dtype, device=rows.device)
    for start, logits in _vocab_blocks(rows, weight, bias, dtype, vocab_chunk):
        width = logits.shape[-1]
        block_max = logits.amax(-1)
        new_m = block_max if m is None else torch.maximum(m, block_max)
        shifted = logits - new_m.unsqueeze(-1)
        e = shifted.exp()
        block_z, block_a = e.sum(-1), (e * shifted).sum(-1)
        _check_block_finite(block_max, block_a)
        if not full:
            local = read_ids - start
            support = torch.zeros(n, width + 1, dtype=torch.bool, device=rows.device).scatter_(
                -1, torch.where((local >= 0) & (local < width), local, width), True)[:, :width]
            block_tail = e.masked_fill(support, 0.0).sum(-1)
            del support
        del shifted, e
        if m is None:
            z, a = block_z, block_a
            tail = None if full else block_tail
        else:
            # Rescale the running sums from max m to new_m: exp(l - new_m) = exp(m - new_m) exp(l - m).
            step = m - new_m
            scale = step.exp()
            a = scale * (a + step * z) + block_a
            z = scale * z + block_z
            if not full:
                tail = scale * tail + block_tail
        m = new_m
        read = _gather_in_block(logits, read_ids, start, read)

        # Running top-n_cand by logit, ties to the lower id; candidates stay in id order, so the
        # concatenation below is in id order too (earlier blocks hold lower ids).
        local_top = stable_topk_ids(logits, min(n_cand, width))
        vals, top_ids = logits.gather(-1, local_top), local_top + start
        if cand_vals is not None:
            vals, top_ids = torch.cat([cand_vals, vals], dim=-1), torch.cat([cand_ids, top_ids], dim=-1)
        keep = stable_topk_ids(vals, min(n_cand, vals.shape[-1]))
        cand_vals, cand_ids = vals.gather(-1, keep), top_ids.gather(-1, keep)
        del logits

    log_z = z.log()
    read_lp = (read - m.unsqueeze(-1)) - log_z.unsqueeze(-1)
    cand_lp = (cand_vals - m.unsqueeze(-1)) - log_z.unsqueeze(-1)
    pick = stable_topk_ids(cand_lp, k)
    s_top_ids, s_top_lp = cand_ids.gather(-1, pick), cand_lp.gather(-1, pick)
    entropy = log_z - a / z
    s_sampled = read_lp[:, -1]
    sampled_lr = s_sampled - sampled_logprobs.to(dtype)

    if full:
        rkl = torch.zeros(n, dtype=dtype, device=rows.device)
        fkl, jsd = torch.zeros_like(rkl), torch.zeros_like(rkl)
        # Every divergence is a sum over the vocabulary: summed block by block.
        for start, logits in _vocab_blocks(rows, weight, bias, dtype, vocab_chunk):
            s_log = (logits - m.unsqueeze(-1)) - log_z.unsqueeze(-1)
            t_log = teacher_log[:, start : start + logits.shape[-1]]
            valid = torch.ones_like(s_log, dtype=torch.bool)
            rkl += kl_over(s_log, t_log, valid)
            fkl += kl_over(t_log, s_log, valid)
            jsd += generalized_jsd_over(s_log, t_log, valid, 0.5)
            del logits, s_log, valid
        rkl, fkl = rkl.clamp(min=0), fkl.clamp(min=0)
        jsd = (jsd / math.log(2)).clamp(0, 1)

        def lookup(query: torch.Tensor) -> torch.Tensor:
            return teacher_log.gather(-1, query)

        s_at_t_top = read_lp[:, :k]
    else:
        s_log, t_log, valid = _aligned_from_parts(read_lp, (tail.log() - log_z), ids, t_ids, topk_logprobs,
                                                  sampled_logprobs)
        rkl = kl_over(s_log, t_log, valid).clamp(min=0)
        fkl = kl_over(t_log, s_log, valid).clamp(min=0)
        jsd = (generalized_jsd_over(s_log, t_log, valid, 0.5) / math.log(2)).clamp(0, 1)
        t_lp = topk_logprobs.to(dtype)

        def lookup(query: torch.Tensor) -> torch.Tensor:
            return teacher_logprob_lookup(query, response_ids, topk_ids, t_lp, sampled_logprobs)

        t_top_pos = stable_topk_ids(t_lp, min(k, t_lp.shape[-1]))
        t_top_ids = t_ids.gather(-1, t_top_pos)
        s_at_t_top = read_lp[:, :-1].gather(-1, t_top_pos)

    return row_stats(entropy, vocab, rkl, fkl, jsd, sampled_lr, k, s_top_ids, s_top_lp, t_top_ids, s_at_t_top,
                     lookup)


def _aligned_from_parts(
    read_lp: torch.Tensor,
    tail_log: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aligned_distributions`` (top-K mode) from the student's log-probs at the teacher's ids
    and the sampled id (``read_lp`` [N, K + 1]) and its log-mass outside them (``tail_log`` [N]).

    The same function defines the support, bucket and renormalisation: it is handed a compact
    "vocabulary" of K + 2 entries per row (the K teacher ids, the sampled id when it is not
    among them, else -inf, and one entry holding the whole tail), whose tail is then exactly
    ``tail_log``.
    """
    n, k = topk_ids.shape
    hits = topk_ids == response_ids.unsqueeze(-1)
    is_new = ~hits.any(-1)
    compact_sampled = torch.where(is_new, k, hits.int().argmax(-1))
    neg_inf = read_lp.new_full((), float("-inf"))
    compact = torch.cat([read_lp[:, :-1], torch.where(is_new, read_lp[:, -1], neg_inf).unsqueeze(-1),
                         tail_log.unsqueeze(-1)], dim=-1)
    compact_topk = torch.arange(k, device=topk_ids.device).expand(n, k)
    return aligned_distributions(compact, compact_sampled, compact_topk, topk_logprobs, sampled_logprobs, False)


def _autograd_chunk_grad(
    logits: torch.Tensor, response_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor, weights: torch.Tensor, kind: str, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i loss_i, its gradient with respect to ``logits`` [N, V]) by autograd through the
    loss over the whole vocabulary: several [N, V] temporaries. Used where the bucketed form does
    not apply (full mode)."""
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(True)
        per_token = token_losses_for_rows(logits, response_ids, topk_ids, topk_logprobs, sampled_logprobs,
                                          kind, beta)
        chunk_loss = (per_token * weights.to(per_token.dtype)).sum()
        (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
    return chunk_loss.detach(), grad_logits


def _bucketed_chunk_grad(
    logits: torch.Tensor, response_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor, weights: torch.Tensor, kind: str, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i loss_i, its gradient with respect to ``logits`` [N, V]) for a top-K signal, in
    the storage of ``logits`` (overwritten; float32 or float64), with no other [N, V] tensor.

    A top-K loss reads the student only through the log-mass of its buckets (each teacher id, the
    sampled id, the tail holding every other id): x_b = log sum_{j in b} exp(l_j). The loss is
    computed by autograd on those [N, K + 2] bucket values (the same ``token_losses_for_rows``,
    as ``_aligned_from_parts`` does for the statistics), and its gradient g_b is carried back to
    the logits by dx_b/dl_j = exp(l_j - x_b) for j in b: g_b itself for a single-id bucket, and
    g_tail exp(l_j - x_tail) for each tail id. The tail's terms are formed in place.
    """
    n, k = topk_ids.shape
    t_ids, ids = topk_ids.long(), response_ids.long().unsqueeze(-1)
    read = logits.gather(-1, torch.cat([t_ids, ids], dim=-1))
    # The support ids leave the tail: exp(-inf) = 0 below, so they hold no tail term.
    logits.scatter_(-1, t_ids, float("-inf")).scatter_(-1, ids, float("-inf"))
    tail_max = logits.amax(-1, keepdim=True)
    tail_terms = logits.sub_(tail_max).exp_()  # exp(l_j - tail_max) for tail ids, 0 on the support
    tail_sum = tail_terms.sum(-1)
    is_new = ~(t_ids == ids).any(-1)
    hits = (t_ids == ids).int().argmax(-1)
    neg_inf = read.new_full((), float("-inf"))
    buckets = torch.cat([read[:, :k], torch.where(is_new, read[:, k], neg_inf).unsqueeze(-1),
                         (tail_max.squeeze(-1) + tail_sum.log()).unsqueeze(-1)], dim=-1)
    with torch.enable_grad():
        buckets = buckets.detach().requires_grad_(True)
        per_token = token_losses_for_rows(
            buckets, torch.where(is_new, k, hits), torch.arange(k, device=t_ids.device).expand(n, k),
            topk_logprobs, sampled_logprobs, kind, beta,
        )
        chunk_loss = (per_token * weights.to(per_token.dtype)).sum()
        (grad_buckets,) = torch.autograd.grad(chunk_loss, buckets)
    grad_logits = tail_terms.mul_((grad_buckets[:, k + 1] / tail_sum).unsqueeze(-1))
    # scatter_add: a teacher id listed twice receives both slots' gradients, as under autograd.
    grad_logits.scatter_add_(-1, t_ids, grad_buckets[:, :k])
    grad_logits.scatter_add_(-1, ids, torch.where(is_new, grad_buckets[:, k], 0.0).unsqueeze(-1))
    return chunk_loss.detach(), grad_logits


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum_i w_i * loss_i over rows, with the gradient computed chunk by chunk in forward.

    Each chunk's logits are made in the head's dtype (as the model's own lm_head would) and
    differentiated in float32; the lm_head/bias gradient sums over chunks in float32 (float64
    stays), the hidden-state gradient is written once per row in the hidden states' dtype. With a
    top-K signal the chunk's gradient with respect to its logits is formed in the logits' own
    storage (``_bucketed_chunk_grad``): one float32 [chunk_rows, V] tensor per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, response_ids, topk_ids, topk_logprobs, sampled_logprobs,
                token_weights_, kind, beta, chunk_rows):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = work_dtype(weight.dtype)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (bias is not None and need_b) else None
        total = torch.zeros((), dtype=work_dtype(hidden.dtype), device=hidden.device)
        # The bucketed gradient needs at least one id outside the support (K teacher ids + the
        # sampled one); full mode and vocabularies that small take the autograd path.
        bucketed = topk_ids.shape[-1] + 1 < weight.shape[0]
        chunk_grad = _bucketed_chunk_grad if bucketed else _autograd_chunk_grad
        for i in range(0, hidden.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            h = hidden[rows]
            chunk_loss, grad_logits = chunk_grad(
                F.linear(h, weight, bias).to(acc), response_ids[rows], topk_ids[rows], topk_logprobs[rows],
                sampled_logprobs[rows], token_weights_[rows], kind, beta,
            )
            total += chunk_loss.to(total.dtype)
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
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError("the lean TIP loss supports one backward pass per forward (no retain_graph reuse)")
        ctx.consumed = True
        # Scaled in place and handed over in the input's dtype: autograd adopts the buffers as
        # .grad, so at most one cast copy of an lm_head-sized tensor is made (none in float32).
        grads = [g.mul_(grad_output.to(g.dtype)).to(dtype) if present else None
                 for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


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
    """
    check_loss_options(kind, beta, normalization)
    _check_chunk(chunk_rows)
    batch, length, vocab = _check_head(hidden, lm_head_weight, lm_head_bias)
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    if tuple(weights.shape) != (batch, length):
        raise ValueError(f"weights must be [B, T] = {(batch, length)}, got {tuple(weights.shape)}")
    if bool((weights[~mask] != 0).any()):
        raise ValueError("weights are non-zero at positions outside the mask (prompt or padding)")
    teacher.validate(batch, length, vocab, mask)
    kept = weights != 0
    den = loss_denominator(weights, mask, normalization) if denominator is None else denominator
    den = torch.as_tensor(den, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                          device=hidden.device)
    if not bool(kept.any()) or float(den) <= 0:
        # Nothing to learn from: a zero that still joins the graph, so backward() works.
        return hidden.sum() * 0.0 + lm_head_weight.sum() * 0.0
    total = _ChunkedHeadLoss.apply(
        hidden[kept], lm_head_weight, lm_head_bias, response_ids[kept], teacher.topk_ids[kept],
        teacher.topk_logprobs[kept], teacher.sampled_logprobs[kept], weights[kept], kind, beta, chunk_rows,
    )
    return total / den


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
