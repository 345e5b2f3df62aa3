"""The statistics pass of the memory-lean path (TIP_SPEC section 6): per-token statistics from
the final hidden states and the lm_head, without gradient, never holding [rows x V] logits.

``token_stats_from_hidden`` runs the lm_head on the valid hidden states ``chunk_rows`` rows at a
time, each block of rows streamed over blocks of ``vocab_chunk`` vocabulary ids (an online
log-sum-exp, as in fused cross-entropy kernels); only a few floats per token are kept. Statistics
are computed from float32 logits (float64 stays float64) even when the backbone and the lm_head
are bf16: the lm_head is upcast ``HEAD_BLOCK_ROWS`` vocabulary rows at a time, never whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    full_divergences,
    full_teacher_log,
    generalized_jsd_over,
    ids_at,
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
    O(rows x K) for the teacher signal, never a [chunk_rows, V] tensor (except in full mode, K = V,
    where the teacher's own distribution is one and the student's scanned blocks make another). ``vocab_chunk`` >= V computes each block's full
    logits and hands them to ``stats_for_rows``, the kernel of ``compute_token_stats``.
    """
    batch, length, vocab = _check_head(hidden, lm_head_weight, lm_head_bias)
    _check_chunk(chunk_rows)
    _check_chunk(vocab_chunk, "vocab_chunk")
    validate_student_inputs((batch, length), vocab, response_ids, mask)
    t_ids, t_lp, t_samp = teacher.checked_rows(batch, length, vocab, mask)
    rows = hidden[mask]
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("hidden states hold NaN or inf at a response position")
    ids = response_ids[mask]
    work = work_dtype(torch.promote_types(hidden.dtype, lm_head_weight.dtype))
    chunks = []
    for i in range(0, rows.shape[0], chunk_rows):
        part = (ids[i : i + chunk_rows], ids_at(t_ids, slice(i, i + chunk_rows)), t_lp[i : i + chunk_rows],
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
    ids of ``rows @ weight.T + bias``, on the rows' device, in ``dtype``; each block is a fresh
    tensor the consumer may overwrite. Their finiteness is the caller's to check
    (``_check_block_finite``)."""
    vocab = weight.shape[0]
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        logits = _head_logits(rows, weight[start:stop], None if bias is None else bias[start:stop], dtype)
        yield start, logits
        del logits  # before the next block is made, not after


def _copied_blocks(logits: torch.Tensor, dtype: torch.dtype, vocab_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``_vocab_blocks`` of logits already made ([N, V]): each block a fresh copy in ``dtype``, so
    ``logits`` itself is never written."""
    for start in range(0, logits.shape[-1], vocab_chunk):
        block = logits[:, start : start + vocab_chunk].to(dtype, copy=True)
        yield start, block
        del block


def _check_block_finite(*reductions: torch.Tensor) -> None:
    """Raise if a block's logits held NaN or inf (as ``stats_for_rows`` does), from [N]
    reductions of the block instead of a pass over it: NaN and +inf make the row max non-finite
    (checked before the block reaches a top-k), and -inf makes exp(l - m) (l - m) = 0 x -inf NaN."""
    if not all(bool(torch.isfinite(r).all()) for r in reductions):
        raise ValueError("student logits hold NaN or inf at a response position")


def _gather_in_block(values: torch.Tensor, ids: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` [N, G] with the entries of ``ids`` [N, G] that fall in the block ``values`` [N, W]
    (vocabulary ids start .. start + W - 1) replaced by their values."""
    local = ids - start
    inside = (local >= 0) & (local < values.shape[-1])
    return torch.where(inside, values.gather(-1, local.clamp(0, values.shape[-1] - 1)), out)


@dataclass
class _VocabularyScan:
    """What one pass over a block of rows' vocabulary keeps per row [N]: the running max ``m``,
    Z = sum exp(l - m), A = sum exp(l - m) (l - m), the mass outside the read ids (``tail``, top-K
    mode), the logits at the read ids (``read`` [N, R]) and the running top candidates by logit
    (``cand_vals``/``cand_ids``, in id order)."""

    m: torch.Tensor
    z: torch.Tensor
    a: torch.Tensor
    tail: torch.Tensor | None
    read: torch.Tensor
    cand_vals: torch.Tensor
    cand_ids: torch.Tensor
    kept: list[tuple[int, torch.Tensor, torch.Tensor]]

    def log_prob_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The kept blocks (``keep_blocks``) as (start, the student's log-probs [N, W]), made in
        place: each block holds l - m_b (m_b: the running max when it was scanned), so
        log p = (l - m_b) - (m - m_b) - ln Z. Once: the blocks are consumed."""
        log_z = self.z.log().unsqueeze(-1)
        while self.kept:
            start, shifted, m_at = self.kept.pop(0)
            yield start, shifted.sub_((self.m - m_at).unsqueeze(-1)).sub_(log_z)


def _scan_vocabulary(blocks: Iterator[tuple[int, torch.Tensor]], dtype: torch.dtype, read_ids: torch.Tensor,
                     n_cand: int, with_tail: bool, keep_blocks: bool = False) -> _VocabularyScan:
    """One pass over the vocabulary blocks of N rows' logits (``_vocab_blocks`` or
    ``_copied_blocks``: fresh [N, W] tensors in ``dtype``, overwritten here): an online
    log-sum-exp and entropy sum, the logits at ``read_ids`` [N, R], the mass outside them
    (``with_tail``) and the running top-``n_cand`` by logit, ties to the lower id. With
    ``keep_blocks`` every block is kept, shifted by its running max (``log_prob_blocks``): the
    rows' whole logits in memory instead of a second pass over them."""
    n, device = read_ids.shape[0], read_ids.device
    m = z = a = tail = None
    cand_vals = cand_ids = None
    read = torch.zeros(read_ids.shape, dtype=dtype, device=device)
    row_of = torch.arange(n, device=device).unsqueeze(-1).expand_as(read_ids)
    scratch = None  # exp(l - m) of every block in one buffer: no fresh [N, W] pages per block
    kept = []
    for start, logits in blocks:
        width = logits.shape[-1]
        block_max = logits.amax(-1)
        _check_block_finite(block_max)  # NaN or +inf, before the block reaches a top-k
        new_m = block_max if m is None else torch.maximum(m, block_max)
        read = _gather_in_block(logits, read_ids, start, read)
        # Candidates stay in id order, so the concatenation is in id order too (earlier blocks
        # hold lower ids).
        local_top = stable_topk_ids(logits, min(n_cand, width))
        vals, top_ids = logits.gather(-1, local_top), local_top + start
        if cand_vals is not None:
            vals, top_ids = torch.cat([cand_vals, vals], dim=-1), torch.cat([cand_ids, top_ids], dim=-1)
        keep = stable_topk_ids(vals, min(n_cand, vals.shape[-1]))
        cand_vals, cand_ids = vals.gather(-1, keep), top_ids.gather(-1, keep)
        # The raw logits are read: the block becomes l - new_m in place, and exp of it goes to the
        # scratch buffer, whose sum and dot product with l - new_m give Z and A without another
        # [N, W] tensor.
        shifted = logits.sub_(new_m.unsqueeze(-1))
        if scratch is None:
            scratch = torch.empty(n * width, dtype=dtype, device=device)
        e = torch.exp(shifted, out=scratch[: n * width].view(n, width))
        block_z = e.sum(-1)
        block_a = torch.bmm(e.unsqueeze(1), shifted.unsqueeze(-1)).view(n)
        _check_block_finite(block_a)  # -inf: exp(l - m) (l - m) = 0 x -inf is NaN
        if with_tail:
            # The tail is the block's mass without the read ids: zero them in e (an id read twice
            # is zeroed twice), then sum.
            local = read_ids - start
            inside = (local >= 0) & (local < width)
            e[row_of[inside], local[inside]] = 0.0
            block_tail = e.sum(-1)
        if keep_blocks:
            kept.append((start, shifted, new_m))
        del shifted, e
        if m is None:
            z, a = block_z, block_a
            tail = block_tail if with_tail else None
        else:
            # Rescale the running sums from max m to new_m: exp(l - new_m) = exp(m - new_m) exp(l - m).
            step = m - new_m
            scale = step.exp()
            a = scale * (a + step * z) + block_a
            z = scale * z + block_z
            if with_tail:
                tail = scale * tail + block_tail
        m = new_m
        del logits
    return _VocabularyScan(m, z, a, tail, read, cand_vals, cand_ids, kept)


def _full_divergences(log_prob_blocks: Iterator[tuple[int, torch.Tensor]], teacher_log: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact reverse KL, forward KL and JSD(0.5) in bits [N] between the student (its log-probs'
    vocabulary blocks, ``_VocabularyScan.log_prob_blocks``) and the dense ``teacher_log`` [N, V],
    summed block by block."""
    rkl = torch.zeros(teacher_log.shape[0], dtype=teacher_log.dtype, device=teacher_log.device)
    fkl, jsd = torch.zeros_like(rkl), torch.zeros_like(rkl)
    for start, s_log in log_prob_blocks:
        block = full_divergences(s_log, teacher_log[:, start : start + s_log.shape[-1]])
        rkl += block[0]
        fkl += block[1]
        jsd += block[2]
        del s_log, block
    return rkl.clamp(min=0), fkl.clamp(min=0), (jsd / math.log(2)).clamp(0, 1)


def full_stats_from_log_probs(
    student_log: torch.Tensor,
    student_probs: torch.Tensor,
    teacher_log: torch.Tensor,
    response_ids: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    *,
    ta_k: int = DEFAULT_TA_K,
    vocab_chunk: int = DEFAULT_LEAN_VOCAB_CHUNK,
) -> dict[str, torch.Tensor]:
    """``stats_for_rows`` of a full-distribution signal, from what the closed-form full gradient
    computes anyway: the student's log-softmax ``student_log`` [N, V] and its exp
    ``student_probs`` [N, V], the teacher's renormalised log-probs ``teacher_log`` [N, V]
    (``full_teacher_log``); ids [N], the teacher's sampled log-probs [N]. Nothing is written; the
    divergences are summed over ``vocab_chunk`` ids at a time, so their temporaries stay
    [N, vocab_chunk]. 1-D statistics [N] by name, in the inputs' dtype, on their device."""
    _check_chunk(vocab_chunk, "vocab_chunk")
    vocab, dtype = student_log.shape[-1], student_log.dtype
    k = min(ta_k, vocab)
    entropy = -torch.linalg.vecdot(student_probs, student_log)
    sampled_lr = student_log.gather(-1, response_ids.long().unsqueeze(-1)).squeeze(-1) - sampled_logprobs.to(dtype)
    s_top_ids = stable_topk_ids(student_log, k)
    t_top_ids = stable_topk_ids(teacher_log, k)
    rkl, fkl, jsd = (torch.zeros_like(entropy) for _ in range(3))
    for start in range(0, vocab, vocab_chunk):
        block = slice(start, start + vocab_chunk)
        parts = full_divergences(student_log[:, block], teacher_log[:, block], student_probs[:, block])
        rkl, fkl, jsd = rkl + parts[0], fkl + parts[1], jsd + parts[2]
        del parts
    return row_stats(entropy, vocab, rkl.clamp(min=0), fkl.clamp(min=0), (jsd / math.log(2)).clamp(0, 1),
                     sampled_lr, k, s_top_ids, student_log.gather(-1, s_top_ids), t_top_ids,
                     student_log.gather(-1, t_top_ids), lambda query: teacher_log.gather(-1, query))


def _streamed_stats_for_rows(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    vocab_chunk: int,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    ta_k: int,
) -> dict[str, torch.Tensor]:
    """``stats_for_rows`` of the logits ``rows @ weight.T + bias`` without ever holding them whole.

    rows [N, H], weight [V, H], bias [V]; teacher [N, K], [N, K], [N]; ids [N]; statistics in
    ``dtype``, on the rows' device. One pass over vocabulary blocks of ``vocab_chunk`` ids
    (``_scan_vocabulary``) keeps per row what the statistics need: log-probs are then
    l - m - ln Z, and the statistics are formed from them by the same functions as
    ``stats_for_rows``. Full mode (K = V) needs every log-prob of both sides for its exact
    divergences: it keeps the scanned blocks for them (``_full_divergences``), as many bytes as
    the teacher's own rows, instead of computing each block again.
    """
    return _stats_from_blocks(lambda: _vocab_blocks(rows, weight, bias, dtype, vocab_chunk), weight.shape[0], dtype,
                              response_ids, topk_ids, topk_logprobs, sampled_logprobs, ta_k)


@torch.no_grad()
def stats_from_logit_rows(
    logits: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    *,
    ta_k: int = DEFAULT_TA_K,
    vocab_chunk: int = DEFAULT_LEAN_VOCAB_CHUNK,
) -> dict[str, torch.Tensor]:
    """``stats_for_rows`` of logits already made, [N, V] (left unchanged), without its [N, V]
    temporaries: the same streamed pass as ``token_stats_from_hidden``, each block of
    ``vocab_chunk`` ids copied out of ``logits`` instead of computed from the lm_head
    (``vocab_chunk`` >= V: ``stats_for_rows`` on the whole rows, as there). ids [N],
    teacher [N, K], [N, K], [N]; 1-D statistics [N] keyed by ``STAT_NAMES``, in float32 (float64
    for float64 logits), on the logits' device. Raises if a logit is NaN or inf.

    This is how the kept-token loss reports the statistics of the rows it trains on
    (``kept_token_losses(..., with_stats=True)``), from the chunk logits it computes anyway."""
    _check_chunk(vocab_chunk, "vocab_chunk")
    dtype = work_dtype(logits.dtype)
    if vocab_chunk >= logits.shape[-1]:  # as token_stats_from_hidden: the whole-row kernel
        return stats_for_rows(logits.to(dtype), response_ids, topk_ids, topk_logprobs, sampled_logprobs, ta_k)
    return _stats_from_blocks(lambda: _copied_blocks(logits, dtype, vocab_chunk), logits.shape[-1], dtype,
                              response_ids, topk_ids, topk_logprobs, sampled_logprobs, ta_k)


def _stats_from_blocks(
    blocks: Callable[[], Iterator[tuple[int, torch.Tensor]]],
    vocab: int,
    dtype: torch.dtype,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    ta_k: int,
) -> dict[str, torch.Tensor]:
    """The statistics of N rows from their logits' vocabulary ``blocks`` (a factory, called once),
    in ``dtype``: ``_streamed_stats_for_rows`` and ``stats_from_logit_rows``. Full mode keeps the
    scanned blocks for its exact divergences (the teacher's [N, V] is in memory anyway)."""
    full = topk_ids is None or topk_ids.shape[-1] == vocab
    k = min(ta_k, vocab)
    ids, t_ids = response_ids.long(), None if topk_ids is None else topk_ids.long()
    if full:
        # The teacher's whole distribution arrived as [N, V]: densified per block of rows (a
        # dense signal already is), as aligned_distributions does, so that its top-k and lookups
        # are plain gathers.
        teacher_log = full_teacher_log(t_ids, topk_logprobs, vocab, dtype)
        read_ids = torch.cat([stable_topk_ids(teacher_log, k), ids.unsqueeze(-1)], dim=-1)
    else:
        read_ids = torch.cat([t_ids, ids.unsqueeze(-1)], dim=-1)
    # A few more candidates than k: the final ranking is by log-prob, where logits a rounding
    # apart can tie and the tie then goes to the lower id, as in stats_for_rows.
    scan = _scan_vocabulary(blocks(), dtype, read_ids, min(2 * k, vocab), not full, keep_blocks=full)
    log_z = scan.z.log()
    read_lp = (scan.read - scan.m.unsqueeze(-1)) - log_z.unsqueeze(-1)
    cand_lp = (scan.cand_vals - scan.m.unsqueeze(-1)) - log_z.unsqueeze(-1)
    pick = stable_topk_ids(cand_lp, k)
    s_top_ids, s_top_lp = scan.cand_ids.gather(-1, pick), cand_lp.gather(-1, pick)
    entropy = log_z - scan.a / scan.z
    sampled_lr = read_lp[:, -1] - sampled_logprobs.to(dtype)
    if full:
        rkl, fkl, jsd = _full_divergences(scan.log_prob_blocks(), teacher_log)
        t_top_ids = read_ids[:, :k]
        s_at_t_top = read_lp[:, :k]

        def lookup(query: torch.Tensor) -> torch.Tensor:
            return teacher_log.gather(-1, query)
    else:
        s_log, t_log, valid = _aligned_from_parts(read_lp, (scan.tail.log() - log_z), ids, t_ids, topk_logprobs,
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


def compact_buckets(read: torch.Tensor, tail: torch.Tensor, response_ids: torch.Tensor, topk_ids: torch.Tensor,
                    topk_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A top-K row's support as a compact "vocabulary" of K + 2 entries, for ``aligned_distributions``
    and ``token_losses_for_rows``: the values at the K teacher ids, at the sampled id when it is not
    among them (else -inf), and one entry holding the whole tail. ``read`` [N, K + 1]: the values
    (logits or log-probs) at the teacher's ids then the sampled id; ``tail`` [N]: the tail's
    (log-sum-exp) value. With the teacher's ``topk_logprobs`` [N, K], its absent slots (-inf,
    ``tip_ray.tip.signal``: they repeat an id already listed) hold -inf, so the row's compact
    vocabulary is that of its own shorter signal. Returns (compact [N, K + 2], the sampled id's
    place [N], the teacher's places [N, K]), on ``read``'s device."""
    n, k = topk_ids.shape
    hits = topk_ids == response_ids.unsqueeze(-1)
    is_new = ~hits.any(-1)
    neg_inf = read.new_full((), float("-inf"))
    listed = read[:, :k] if topk_logprobs is None else read[:, :k].masked_fill(topk_logprobs == neg_inf, neg_inf)
    compact = torch.cat([listed, torch.where(is_new, read[:, k], neg_inf).unsqueeze(-1), tail.unsqueeze(-1)],
                        dim=-1)
    return compact, torch.where(is_new, k, hits.int().argmax(-1)), torch.arange(k, device=topk_ids.device).expand(n, k)


def _aligned_from_parts(
    read_lp: torch.Tensor,
    tail_log: torch.Tensor,
    response_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    sampled_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aligned_distributions`` (top-K mode) from the student's log-probs at the teacher's ids
    and the sampled id (``read_lp`` [N, K + 1]) and its log-mass outside them (``tail_log`` [N]):
    the same function defines the support, bucket and renormalisation, handed the compact
    vocabulary of ``compact_buckets``, whose tail is then exactly ``tail_log``."""
    compact, sampled_place, topk_places = compact_buckets(read_lp, tail_log, response_ids, topk_ids, topk_logprobs)
    return aligned_distributions(compact, sampled_place, topk_places, topk_logprobs, sampled_logprobs, False)
