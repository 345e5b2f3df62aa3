"""Multi-turn samples: the student's turns interleaved with recorded follow-ups, replayed.

``MultiTurnRollouts`` wraps the rollout port (``tip_ray.driver.ports.Rollouts``): ``launch``
starts the first turn of a prompt batch as a single-turn run would (same prompts, same seeds:
``rollout.max_turns=1`` samples are unchanged); ``collect`` waits for it and then, turn after
turn, appends each sample's next follow-up (``PromptExample.followups``, from
``data.followups_field``) and samples the student again, one sample per conversation. The rollout
actors never see a conversation: every turn is a plain token prompt.

A sample's response is the student's turns with the follow-up tokens between them; its
``Generation.trainable`` marks the student's own tokens (its stop token included), so
``RolloutBatch.to_sequences`` trains on those only, while the teacher scores the whole sequence.
The follow-up tokens are the chat template's exact text delta (``tip_ray.data.conversation.
followup_delta``): the student's sampled ids are kept as they are, never re-tokenized.

A sample ends (the follow-ups left are dropped) when it has ``rollout.max_turns`` turns, when the
row has no follow-up left, when a turn stops at ``rollout.max_new_tokens`` (``length``: the turn
is not closed) or on a stop token the template does not end turns with, and when the next turn
might not fit: the next prompt plus ``rollout.max_new_tokens`` must fit ``rollout.max_model_len``
and the teachers' ``max_model_len - 1`` (the shortest, with several), so a whole sample always fits.

Seeds: the first turn samples with the prompt's stream seed (``sample_seeds``); turn t >= 2 of the
j-th sample of a prompt with ``turn_seed(seed, t, j)``, so a resumed run replays the same samples.
In ``trainer.mode=overlap`` the first turn may come from weights one version older than the later
ones; the batch carries the oldest version (its staleness).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tip_ray.data.conversation import Message, TurnNotClosed, followup_delta
from tip_ray.types import Generation, RolloutBatch, SamplingSettings

ENDINGS = ("max_turns", "no_followup", "length", "not_closed", "budget")


def turn_seed(seed: int, turn: int, sample: int) -> int:
    """The 31-bit seed of turn ``turn`` (2, 3, ...) of the ``sample``-th sample of a prompt whose
    stream seed is ``seed``: a function of the three only."""
    digest = hashlib.blake2b(f"{seed}/turn{turn}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


@dataclass
class _Sample:
    """One conversation being sampled: the tokens so far and who wrote them."""

    prompt_index: int
    sample: int  # its place among its prompt's samples
    seed: int
    example: Any  # the PromptExample
    prompt_ids: list[int]
    prompt_text: str
    messages: list[Message]
    token_ids: list[int] = field(default_factory=list)
    trainable: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"
    turns: int = 0
    ended: str | None = None

    def add(self, g: Generation) -> None:
        self.token_ids += g.token_ids
        self.trainable += [True] * len(g.token_ids)
        self.logprobs += g.logprobs
        self.finish_reason = g.finish_reason
        self.turns += 1

    def generation(self) -> Generation:
        logprobs = self.logprobs if len(self.logprobs) == len(self.token_ids) else []
        return Generation(self.prompt_index, list(self.token_ids), logprobs, self.finish_reason, tuple(self.trainable))


@dataclass(frozen=True)
class MultiTurnLaunch:
    """A started multi-turn batch: its examples, their stream seeds and the first turn's launch."""

    examples: tuple[Any, ...]
    seeds: tuple[int, ...]
    first: Any


class MultiTurnRollouts:
    """Multi-turn sampling over ``runtime.rollout`` (the port, looked up at every call).

    ``tokenizer``: the student's (chat template, decoding); ``rollout``: the ``RolloutConfig``
    (``max_turns``, sampling, ``max_model_len``); ``max_sequence``: the longest sequence the
    teacher scores (its ``max_model_len - 1``); ``chat_template_kwargs`` as the prompts had.
    """

    def __init__(self, runtime: Any, tokenizer: Any, rollout: Any, max_sequence: int,
                 chat_template_kwargs: dict[str, Any] | None = None) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.cfg = rollout
        self.max_turns = rollout.max_turns
        self.limit = min(rollout.max_model_len, max_sequence)
        self.kwargs = dict(chat_template_kwargs or {})
        self.later_turns = SamplingSettings(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                            top_p=rollout.top_p, n=1, logprobs=rollout.logprobs)
        self.last: dict[str, float] = {}

    def launch(self, examples: Sequence[Any], seeds: Sequence[int]) -> MultiTurnLaunch:
        """Start the first turn of ``examples`` (``PromptExample`` [N]) with ``seeds`` [N]; no wait."""
        first = self.runtime.rollout.launch([e.prompt_ids for e in examples], list(seeds))
        return MultiTurnLaunch(tuple(examples), tuple(seeds), first)

    def collect(self, launch: MultiTurnLaunch) -> RolloutBatch:
        """Wait for the first turn, then sample the later turns (blocking); one ``Generation`` per
        sample in the first turn's order, ``prompt_index`` into the launched examples, with the
        student's tokens marked ``trainable``. ``metrics()`` then describes the batch."""
        first = self.runtime.rollout.collect(launch.first)
        versions = [first.policy_version]
        samples: list[_Sample] = []
        counts: dict[int, int] = {}
        for g in first.generations:
            example = launch.examples[g.prompt_index]
            j = counts[g.prompt_index] = counts.get(g.prompt_index, -1) + 1
            sample = _Sample(g.prompt_index, j, launch.seeds[g.prompt_index], example, list(example.prompt_ids),
                             example.prompt_text, list(example.messages or ()))
            sample.add(g)
            samples.append(sample)
        for turn in range(2, self.max_turns + 1):
            live = [s for s in samples if s.ended is None and self._continue(s)]
            if not live:
                break
            pending = self.runtime.rollout.launch([s.prompt_ids + s.token_ids for s in live],
                                                  [turn_seed(s.seed, turn, s.sample) for s in live], self.later_turns)
            batch = self.runtime.rollout.collect(pending)
            versions.append(batch.policy_version)
            if len(batch.generations) != len(live):
                raise RuntimeError(f"turn {turn}: the rollout pool returned {len(batch.generations)} samples for "
                                   f"{len(live)} conversations (one each)")
            for g in batch.generations:
                live[g.prompt_index].add(g)
        for s in samples:
            if s.ended is None:
                self._continue(s)
        self.last = self._metrics(samples)
        return RolloutBatch(first.prompt_ids, tuple(s.generation() for s in samples), min(versions))

    def metrics(self) -> dict[str, float]:
        """The last collected batch: mean turns per sample, the response tokens the student wrote
        (trained) and those it did not (masked), and how many samples ended for each reason."""
        return dict(self.last)

    def _continue(self, s: _Sample) -> bool:
        """Append the next follow-up to ``s`` and return True, or mark why it ends and return False."""
        if s.turns >= self.max_turns:
            s.ended = "max_turns"
        elif s.turns > len(s.example.followups):
            s.ended = "no_followup"
        elif s.finish_reason != "stop" or not s.token_ids:
            s.ended = "length"
        if s.ended is not None:
            return False
        turn_ids = s.token_ids[len(s.trainable) - _last_run(s.trainable):]
        content = self.tokenizer.decode(turn_ids[:-1], skip_special_tokens=False)
        stop_text = self.tokenizer.decode(turn_ids[-1:], skip_special_tokens=False)
        where = f"prompt {s.example.uid!r} (row {s.example.index}), after student turn {s.turns}"
        try:
            delta = followup_delta(self.tokenizer, s.messages, s.prompt_text, content, stop_text,
                                   s.example.followups[s.turns - 1], s.example.tools, self.kwargs, where)
        except TurnNotClosed:
            s.ended = "not_closed"
            return False
        if len(s.prompt_ids) + len(s.token_ids) + len(delta.ids) + self.cfg.max_new_tokens > self.limit:
            s.ended = "budget"
            return False
        s.token_ids += delta.ids
        s.trainable += [False] * len(delta.ids)
        s.logprobs += [math.nan] * len(delta.ids)
        s.prompt_text, s.messages = delta.text, delta.messages
        return True

    @staticmethod
    def _metrics(samples: list[_Sample]) -> dict[str, float]:
        trained = sum(sum(s.trainable) for s in samples)
        masked = sum(len(s.trainable) for s in samples) - trained
        out = {"multiturn/turns_mean": sum(s.turns for s in samples) / max(1, len(samples)),
               "multiturn/trainable_tokens": trained, "multiturn/masked_tokens": masked}
        for reason in ENDINGS:
            out[f"multiturn/ended_{reason}"] = sum(s.ended == reason for s in samples)
        return out


def _last_run(flags: list[bool]) -> int:
    """The length of the run of True at the end of ``flags``."""
    n = 0
    for flag in reversed(flags):
        if not flag:
            break
        n += 1
    return n


def multiturn_rollouts(cfg: Any, tokenizer: Any, runtime: Any) -> MultiTurnRollouts | None:
    """The multi-turn wrapper of a run's rollout port (``cfg``: the ``TrainConfig``), or None when
    ``rollout.max_turns`` is 1 (one response per prompt, sampled by the port itself). With several
    teachers a sample must fit the shortest ``max_model_len`` of them: any may score it."""
    from tip_ray.config import teacher_configs

    if cfg.rollout.max_turns <= 1:
        return None
    shortest = min(t.max_model_len for t in teacher_configs(cfg).values())
    return MultiTurnRollouts(runtime, tokenizer, cfg.rollout, shortest - 1, cfg.data.chat_template_kwargs)
