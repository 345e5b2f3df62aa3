"""The teacher's per-position signal and the checks every consumer relies on.

The teacher scores each response position t of a student rollout and sends, per position,
the log-probabilities of its top-K tokens plus the log-probability of the token the student
actually sampled (TIP_SPEC section 3). K equal to the vocabulary size is the exact `full` mode.

Teachers with different top-K share one [B, T, K] signal (``padded_to``): a row scored with
K_i < K tokens fills its last K - K_i slots with *absent* slots, which repeat the row's first id
with log-prob -inf (``ABSENT_LOGPROB``). An absent slot is no outcome: every consumer
(``tip_ray.tip.support``, the statistics, the losses) reads the row as its own K_i signal.
Only top-K signals hold absent slots (K < V); a full-distribution signal never does.

A full distribution travels *dense* (``topk_ids`` None): ``topk_logprobs`` [B, T, V] holds the
log-prob of every id, in id order (the column is the id). It is the same outcome set as a K = V
signal with ids, at half the payload, with no sort in the teacher and no scatter in the learner.
Row-level functions (``tip_ray.tip.support``, the statistics, the losses) take its ``topk_ids``
as None too.

A signal pickles its tensors as byte arrays (``__reduce__``), which pickle protocol 5 hands over
out of band: through Ray's object store a signal is written once and read in place, not copied
into and out of a pickle stream (hundreds of MB a step for a full distribution). A signal that
arrived that way is read-only (it lives in the object store's shared memory): its consumers
read it, and anything they write is a new tensor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

# A log-probability above this is not a log-probability (someone passed logits).
_LOGPROB_SLACK = 1e-3
# The log-prob of an absent slot (a row scored with fewer than K tokens).
ABSENT_LOGPROB = float("-inf")


@dataclass(frozen=True)
class TeacherSignal:
    """Teacher log-probs for every response position.

    Shapes: ``topk_ids`` int [B, T, K] or None (dense: K = V and the column is the id),
    ``topk_logprobs`` float [B, T, K], ``sampled_logprobs`` float [B, T] (the teacher's log-prob
    of the student's sampled token).
    Positions outside the response mask may hold anything finite (absent slots aside); they are
    never read. A slot j > 0 whose id repeats slot 0's and whose log-prob is -inf is absent (see
    the module doc).
    """

    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor
    sampled_logprobs: torch.Tensor

    def __reduce__(self):
        return _rebuild_signal, tuple(_as_bytes(t) for t in (self.topk_ids, self.topk_logprobs,
                                                             self.sampled_logprobs))

    @property
    def k(self) -> int:
        """Number of teacher tokens sent per position."""
        return int(self.topk_logprobs.shape[-1])

    @property
    def dense(self) -> bool:
        """True for a dense full distribution (no ids: the column of ``topk_logprobs`` is the id)."""
        return self.topk_ids is None

    def is_full(self, vocab_size: int) -> bool:
        """True when the signal carries the teacher's whole distribution (K == V)."""
        return self.k == vocab_size

    def rows(self, mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(ids [N, K] or None when dense, log-probs [N, K], sampled log-probs [N]) at the N
        positions where ``mask`` [B, T] (bool, or an index into B) selects, on the signal's device."""
        ids = None if self.topk_ids is None else self.topk_ids[mask]
        return ids, self.topk_logprobs[mask], self.sampled_logprobs[mask]

    def take(self, index: torch.Tensor, positions: int) -> TeacherSignal:
        """The rows ``index`` [N] (long, in that order) and their first ``positions`` positions:
        [N, positions, K]. A view of this signal's storage when ``index`` is an ascending run of
        consecutive rows (a learner rank's share of a batch: nothing copied), else a copy."""
        index = index.to(torch.long)
        start = int(index[0]) if index.numel() else 0
        if index.numel() and torch.equal(index, torch.arange(start, start + index.numel(), device=index.device)):
            rows: torch.Tensor | slice = slice(start, start + index.numel())
        else:
            rows = index
        ids = None if self.topk_ids is None else self.topk_ids[rows, :positions]
        return TeacherSignal(ids, self.topk_logprobs[rows, :positions], self.sampled_logprobs[rows, :positions])

    def with_ids(self) -> TeacherSignal:
        """This signal with explicit ids: a dense one gets ids 0..V-1 in id order at every position
        (int32; for joining it with top-K signals), any other is returned as it is."""
        if self.topk_ids is not None:
            return self
        ids = torch.arange(self.k, dtype=torch.int32, device=self.topk_logprobs.device)
        return TeacherSignal(ids.expand(self.topk_logprobs.shape).contiguous(), self.topk_logprobs,
                             self.sampled_logprobs)

    def absent_slots(self) -> torch.Tensor:
        """Bool [B, T, K], on the signal's device: True at the absent slots (j > 0, the id of slot
        0, log-prob -inf) that pad a row scored with fewer than K tokens (none in a dense signal)."""
        if self.topk_ids is None:
            return torch.zeros(self.topk_logprobs.shape, dtype=torch.bool, device=self.topk_logprobs.device)
        absent = (self.topk_logprobs == ABSENT_LOGPROB) & (self.topk_ids == self.topk_ids[..., :1])
        absent[..., 0] = False
        return absent

    def finite_at(self, mask: torch.Tensor) -> bool:
        """Whether every log-prob at the positions where ``mask`` [B, T] is True is finite, absent
        slots aside."""
        if not bool(torch.isfinite(self.sampled_logprobs[mask]).all()):
            return False
        if self.topk_ids is None:
            # Per-row max and min (NaN propagates to both): no [N, V] boolean tensor.
            rows = self.topk_logprobs[mask]
            return bool(torch.isfinite(rows.amax(-1)).all()) and bool(torch.isfinite(rows.amin(-1)).all())
        lps = self.topk_logprobs.masked_fill(self.absent_slots(), 0.0)
        return bool(torch.isfinite(lps[mask]).all())

    def padded_to(self, k: int) -> TeacherSignal:
        """This signal [B, T, K] widened to [B, T, k] (k >= K) by absent slots (the module doc); the
        same tensors when k == K."""
        if k < self.k:
            raise ValueError(f"cannot pad a signal of K = {self.k} to {k} slots")
        if k == self.k:
            return self
        if self.topk_ids is None:
            raise ValueError(f"a dense full-distribution signal (K = {self.k}) cannot be padded to {k} slots")
        extra = k - self.k
        ids = torch.cat([self.topk_ids, self.topk_ids[..., :1].expand(*self.topk_ids.shape[:-1], extra)], -1)
        lps = torch.cat([self.topk_logprobs, self.topk_logprobs.new_full((*self.topk_logprobs.shape[:-1], extra),
                                                                          ABSENT_LOGPROB)], -1)
        return TeacherSignal(ids, lps, self.sampled_logprobs)

    def bucket_entropy(self) -> torch.Tensor:
        """The entropy (nats) of the teacher's top-K plus one tail bucket holding the rest of its
        mass, [B, T] in float32 (float64 stays), on the signal's device: a lower bound of the
        teacher's entropy (merging outcomes never raises entropy), exact when K = V. Beside the
        student's entropy it tells whether the teacher itself is uncertain on the student's samples."""
        logp = self.topk_logprobs.to(torch.promote_types(self.topk_logprobs.dtype, torch.float32))
        p = logp.exp()
        tail = (1.0 - p.sum(-1)).clamp(min=0.0)
        inside = -(p * logp).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0
        return inside - torch.where(tail > 0, tail * tail.clamp(min=torch.finfo(tail.dtype).tiny).log(), 0.0)

    @classmethod
    def from_logits(
        cls,
        teacher_logits: torch.Tensor,
        response_ids: torch.Tensor,
        k: int | None = None,
        values_dtype: torch.dtype | None = None,
    ) -> TeacherSignal:
        """Build the signal from full teacher logits [B, T, V] (temperature 1).

        ``k=None`` keeps the whole distribution, dense (full mode); ``k = V`` keeps it with ids in
        descending log-prob (ties to the lower id); otherwise the top-k tokens.
        ``response_ids`` [B, T] are the student's sampled tokens; ids outside [0, V) (padding)
        get a sampled log-prob of 0.
        """
        if teacher_logits.dim() != 3:
            raise ValueError(f"teacher_logits must be [B, T, V], got shape {tuple(teacher_logits.shape)}")
        vocab = teacher_logits.shape[-1]
        logprobs = torch.log_softmax(teacher_logits.float() if teacher_logits.dtype in (torch.float16, torch.bfloat16) else teacher_logits, dim=-1)
        if k is None:
            values, ids = logprobs, None
        elif k == vocab:
            values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
        else:
            if not 0 < k <= vocab:
                raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
            values, ids = torch.topk(logprobs, k, dim=-1)
        safe_ids = response_ids.clamp(0, vocab - 1)
        sampled = logprobs.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)
        sampled = torch.where((response_ids >= 0) & (response_ids < vocab), sampled, torch.zeros_like(sampled))
        dtype = values_dtype or values.dtype
        return cls(topk_ids=None if ids is None else ids.to(torch.int32), topk_logprobs=values.to(dtype),
                   sampled_logprobs=sampled.to(dtype))

    def validate(self, batch: int, length: int, vocab_size: int, mask: torch.Tensor | None = None) -> None:
        """Raise ValueError naming the field if shapes, ids or values are unusable.

        Checks shapes against [batch, length, K], K <= vocab_size (K = vocab_size when dense), ids
        in [0, vocab_size) and finite log-probs <= 0 at the positions where ``mask`` [B, T] is
        True (all if None), absent slots aside (top-K signals only: a full one, K = vocab_size,
        holds none), and at most a probability mass of 1 per position.
        """
        sel = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool,
                                                       device=self.topk_logprobs.device)
        self.checked_rows(batch, length, vocab_size, sel)

    def checked_rows(self, batch: int, length: int, vocab_size: int, mask: torch.Tensor,
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``validate(batch, length, vocab_size, mask)``, then ``rows(mask)``: the N rows it
        checked (ids [N, K] or None, log-probs [N, K], sampled log-probs [N]), taken out of the
        [B, T, K] tensors once (a full distribution's rows are hundreds of MB)."""
        ids, lps, samp = self.topk_ids, self.topk_logprobs, self.sampled_logprobs
        if lps.dim() != 3:
            raise ValueError(f"teacher.topk_logprobs must be [B, T, K], got shape {tuple(lps.shape)}")
        if ids is not None and tuple(lps.shape) != tuple(ids.shape):
            raise ValueError(
                f"teacher.topk_logprobs shape {tuple(lps.shape)} differs from teacher.topk_ids shape {tuple(ids.shape)}"
            )
        if tuple(lps.shape[:2]) != (batch, length):
            raise ValueError(
                f"teacher signal covers [B, T] = {tuple(lps.shape[:2])} but the student has {(batch, length)}"
            )
        if tuple(samp.shape) != (batch, length):
            raise ValueError(f"teacher.sampled_logprobs must be [B, T] = {(batch, length)}, got {tuple(samp.shape)}")
        if ids is not None and (ids.dtype.is_floating_point or ids.dtype == torch.bool):
            raise ValueError(f"teacher.topk_ids must be an integer tensor, got {ids.dtype}")
        if not lps.dtype.is_floating_point or not samp.dtype.is_floating_point:
            raise ValueError("teacher.topk_logprobs and teacher.sampled_logprobs must be floating point")
        if self.k < 1 or self.k > vocab_size:
            raise ValueError(f"teacher top-K = {self.k} must be in [1, vocab_size = {vocab_size}]")
        if ids is None and self.k != vocab_size:
            raise ValueError(f"a dense teacher signal holds every id of the vocabulary: {self.k} log-probs per "
                             f"position for a student of {vocab_size} ids")
        rows = self.rows(mask)
        if rows[1].shape[0] == 0:
            return rows
        v_ids, v_lps, v_samp = rows
        if ids is None:
            self._validate_values(v_lps, v_samp, None)
            return rows
        absent = self.absent_slots()[mask]
        if self.k == vocab_size and bool(absent.any()):
            raise ValueError("teacher.topk_logprobs holds absent slots (-inf) in a full-distribution signal "
                             "(K = vocab_size): only top-K signals may be padded")
        if bool(((v_ids < 0) | (v_ids >= vocab_size)).any()):
            bad = v_ids[(v_ids < 0) | (v_ids >= vocab_size)][0].item()
            raise ValueError(f"teacher.topk_ids holds id {bad}, outside the vocabulary [0, {vocab_size})")
        self._validate_values(v_lps.masked_fill(absent, 0.0), v_samp, absent)
        return rows

    @staticmethod
    def _validate_values(v_lps: torch.Tensor, v_samp: torch.Tensor, absent: torch.Tensor | None) -> None:
        """The value checks of ``validate`` on the selected rows: log-probs [N, K] (absent slots
        zeroed, ``absent`` [N, K]; None for a dense signal) and sampled log-probs [N]. Checked from
        per-row reductions (max and min, which NaN propagates to): no [N, K] boolean tensors, which
        for a dense row are [N, V]."""
        high, low = v_lps.amax(-1), v_lps.amin(-1)
        for name, values, top in (("teacher.topk_logprobs", torch.stack([high, low]), high),
                                  ("teacher.sampled_logprobs", v_samp, v_samp)):
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{name} holds NaN or inf at a response position")
            if bool((top > _LOGPROB_SLACK).any()):
                raise ValueError(
                    f"{name} holds values > 0 (max {top.max().item():.4g}): these are not log-probabilities"
                    " (logits passed by mistake?)"
                )
        if absent is None:
            # A dense row's mass by log-sum-exp, in float32: no float64 copy of [N, V].
            mass = torch.logsumexp(v_lps.to(torch.promote_types(v_lps.dtype, torch.float32)), -1).exp()
        else:
            mass = v_lps.double().exp().masked_fill(absent, 0.0).sum(-1)
        if bool((mass > 1.0 + 1e-2).any()):
            raise ValueError(
                f"teacher.topk_logprobs sum to a probability mass of {mass.max().item():.4g} > 1 at a position:"
                " duplicated ids or values that are not log-probabilities"
            )


def _as_bytes(tensor: torch.Tensor | None) -> tuple[np.ndarray, str, tuple[int, ...]] | None:
    """A tensor as (its bytes as a uint8 array, dtype name, shape), on the CPU: the form pickle
    protocol 5 passes out of band. No copy for a contiguous CPU tensor without gradient."""
    if tensor is None:
        return None
    flat = tensor.detach().cpu().contiguous()
    return flat.reshape(-1).view(torch.uint8).numpy(), str(flat.dtype).removeprefix("torch."), tuple(flat.shape)


def _from_bytes(packed: tuple[np.ndarray, str, tuple[int, ...]] | None) -> torch.Tensor | None:
    if packed is None:
        return None
    data, dtype, shape = packed
    with warnings.catch_warnings():
        # An array read in place from the object store is not writable: so is the tensor (module doc).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data).view(getattr(torch, dtype)).view(shape)


def _rebuild_signal(ids, logprobs, sampled) -> TeacherSignal:
    return TeacherSignal(_from_bytes(ids), _from_bytes(logprobs), _from_bytes(sampled))
