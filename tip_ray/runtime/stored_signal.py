"""A teacher pool's signal handed to the learner ranks where it already is: Ray's object store.

The teacher actors' results are written to the object store when they return (a full
distribution over a real vocabulary: hundreds of MB a step). Sending each learner rank its rows
of the joined signal wrote them into the object store a second time, after the driver had copied
them out of the batch (1.1 s of a 10 s step on the SmolLM2 pair with the whole distribution,
docs/benchmarks.md section 8, session 15). A ``StoredSignal`` is the refs of those results and which
of their rows a batch holds: the driver sends it in the ``TrainBatch`` (a few hundred bytes), and
the learner actor reads its rows in place (``fetch``) before its worker sees the batch.

On several nodes each learner node pulls the whole result of every teacher shard its ranks'
rows come from (once per node), where the copied path pulled each rank's rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from tip_ray.runtime.pools import check_row_cover, join_signals
from tip_ray.tip.signal import TeacherSignal


@dataclass(frozen=True)
class StoredPart:
    """The rows of one teacher shard's result that a batch holds: ``ref``, the object ref of the
    shard's ``TeacherSignal`` [b, W, K]; ``shard_rows`` long [n], rows of that result;
    ``batch_rows`` long [n], where they go in the batch."""

    ref: Any
    shard_rows: torch.Tensor
    batch_rows: torch.Tensor


@dataclass(frozen=True)
class StoredSignal:
    """A signal [``size``, ``positions``, K] whose rows are ``parts`` of teacher results in Ray's
    object store (together they hold every row once); positions past a shard's width hold the
    padding placeholder of a teacher over ``vocab_size`` ids (as ``join_signals``). Nothing is
    read until ``fetch``."""

    parts: tuple[StoredPart, ...]
    size: int
    positions: int
    vocab_size: int

    @classmethod
    def of_shards(cls, shards: Sequence[tuple[Sequence[int], Any]], size: int, positions: int,
                  vocab_size: int) -> StoredSignal:
        """The signal [size, positions, K] that a pool call's ``shards`` make: per shard, the
        batch rows it scored (in the order of its result's rows) and the ref of its result."""
        check_row_cover([rows for rows, _ in shards], size)
        parts = tuple(StoredPart(ref, torch.arange(len(rows)), torch.tensor(list(rows), dtype=torch.long))
                      for rows, ref in shards)
        return cls(parts, size, positions, vocab_size)

    def take(self, index: torch.Tensor, positions: int) -> StoredSignal:
        """The rows ``index`` [N] (distinct, in that order) and the first ``positions`` positions,
        as ``TeacherSignal.take``; nothing is read."""
        index = index.to(torch.long)
        if positions > self.positions or (index.numel() and int(index.max()) >= self.size):
            raise ValueError(f"rows {index.tolist()} x {positions} positions are not in a stored signal of "
                             f"{self.size} rows x {self.positions} positions")
        place = torch.full((self.size,), -1, dtype=torch.long)
        place[index] = torch.arange(index.numel())
        parts = []
        for part in self.parts:
            new = place[part.batch_rows]
            kept = new >= 0
            if bool(kept.any()):
                parts.append(StoredPart(part.ref, part.shard_rows[kept], new[kept]))
        return StoredSignal(tuple(parts), int(index.numel()), positions, self.vocab_size)

    def fetch(self) -> TeacherSignal:
        """The signal itself [size, positions, K], on the CPU: each shard's result read in place
        from the object store (read-only, as every received signal). Rows that one shard holds
        in order are a view of its result; rows from several shards, or out of order, are joined
        into new tensors."""
        pieces = []
        for part, result in zip(self.parts, ray.get([p.ref for p in self.parts])):
            width = min(int(result.topk_logprobs.shape[1]), self.positions)
            pieces.append((part.batch_rows.tolist(), result.take(part.shard_rows, width)))
        return join_signals(pieces, self.size, self.positions + 1, self.vocab_size)
