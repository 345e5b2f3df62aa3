"""Typed, frozen records that travel between the pools, and the sampling settings every engine takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tip_ray.tip.signal import TeacherSignal


class SignalHandle(Protocol):
    """A teacher signal [B, L-1, K] kept where it is (``tip_ray.runtime.stored_signal.StoredSignal``:
    the teacher's results in Ray's object store), on its way to a learner actor, which reads it
    (``fetch``) before its worker sees the batch; ``take`` as ``TeacherSignal.take``."""

    def take(self, index: torch.Tensor, positions: int) -> SignalHandle: ...

    def fetch(self) -> TeacherSignal: ...


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: ``temperature`` 0 is greedy; ``n`` samples per prompt; ``logprobs``: also
    return each sampled token's log-prob (else ``Generation.logprobs`` is empty)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class Generation:
    """One response: ids, the sampled tokens' log-probs, and ``stop`` or ``length``.

    ``trainable`` [len(token_ids)]: which tokens the student wrote (None: all of them). A
    multi-turn response (``tip_ray.driver.multiturn``) interleaves the student's turns with tokens
    it did not write (tool results, user follow-ups, the template's turn markers): False there."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    trainable: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.trainable is not None and len(self.trainable) != len(self.token_ids):
            raise ValueError(f"trainable has {len(self.trainable)} flags for {len(self.token_ids)} tokens")


@dataclass(frozen=True)
class RolloutBatch:
    """Student samples: the prompts' ids, one ``Generation`` per sample (its ``prompt_index``
    into ``prompt_ids``, token ids, sampled-token log-probs, finish reason) and the policy
    version of the weights that sampled them."""

    prompt_ids: tuple[tuple[int, ...], ...]
    generations: tuple[Generation, ...]
    policy_version: int

    def to_sequences(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt + response per sample: input_ids, attention_mask [N, L] and the
        loss mask [N, L-1] (True where a position predicts a response token the student wrote:
        ``Generation.trainable``)."""
        rows = [list(self.prompt_ids[g.prompt_index]) + list(g.token_ids) for g in self.generations]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for i, (row, g) in enumerate(zip(rows, self.generations)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            prompt_len = len(self.prompt_ids[g.prompt_index])
            loss_mask[i, prompt_len - 1 : len(row) - 1] = True if g.trainable is None else torch.tensor(g.trainable)
        return input_ids, attention, loss_mask


@dataclass(frozen=True)
class TrainBatch:
    """Sequences for one learner rank: prompt + response, right-padded.

    ``input_ids``/``attention_mask`` [B, L]; ``loss_mask`` [B, L-1] is True where position t
    predicts a response token ``input_ids[:, t+1]``; ``teacher`` is aligned with those L-1
    positions ([B, L-1, K]; on its way to a learner actor, a ``SignalHandle`` to it, which the
    actor reads before its worker sees the batch). ``policy_version`` is the weight version that
    sampled the responses.
    ``advantages``: float32 [B], each sequence's task-reward advantage (``loss.reward``), or None
    when the reward term is off.
    ``group`` long [B] (or None): each sequence's teacher, as an index into the run's teachers
    (several teachers, routed by prompt: the learner reports its metrics per group).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    teacher: TeacherSignal | SignalHandle
    policy_version: int = 0
    advantages: torch.Tensor | None = None
    group: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, length = self.input_ids.shape
        if tuple(self.attention_mask.shape) != (b, length):
            raise ValueError(f"attention_mask must be [B, L] = {(b, length)}, got {tuple(self.attention_mask.shape)}")
        if tuple(self.loss_mask.shape) != (b, length - 1) or self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool [B, L-1] = {(b, length - 1)}, got "
                             f"{self.loss_mask.dtype} {tuple(self.loss_mask.shape)}")
        if self.advantages is not None and (tuple(self.advantages.shape) != (b,)
                                            or not self.advantages.dtype.is_floating_point):
            raise ValueError(f"advantages must be float [B] = [{b}], got {self.advantages.dtype} "
                             f"{tuple(self.advantages.shape)}")
        if self.group is not None and tuple(self.group.shape) != (b,):
            raise ValueError(f"group must be [B] = [{b}], got {tuple(self.group.shape)}")

    @property
    def size(self) -> int:
        """Number of sequences."""
        return int(self.input_ids.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        """The token each position predicts [B, L-1]; -100 off the loss mask."""
        return self.input_ids[:, 1:].masked_fill(~self.loss_mask, -100)

    def rows(self, start: int, stop: int) -> TrainBatch:
        """The sequences [start, stop) as a batch of their own."""
        return self.take(torch.arange(start, min(stop, self.size)))

    def take(self, index: torch.Tensor) -> TrainBatch:
        """The sequences ``index`` [N] (in that order) as a batch of their own, cut to the longest
        of them: columns that are padding in every chosen row are dropped."""
        width = max(int(self.attention_mask[index].sum(-1).max()) if index.numel() else 1, 2)
        return TrainBatch(
            self.input_ids[index, :width], self.attention_mask[index, :width], self.loss_mask[index, : width - 1],
            self.teacher.take(index, width - 1), self.policy_version,
            advantages=None if self.advantages is None else self.advantages[index],
            group=None if self.group is None else self.group[index],
        )

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per sequence [B] (the attention mask's row sums)."""
        return self.attention_mask.sum(-1)
