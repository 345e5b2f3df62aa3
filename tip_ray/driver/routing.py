"""Several teachers in the driver: each sequence scored by its own prompt's teacher.

A prompt's teacher is fixed when the prompts are loaded (``PromptExample.route``,
``tip_ray.data.routing``); every sample of the prompt goes to it. ``score_routed`` sends each
teacher its rows (all teacher pools launched first, then collected: they score at once) and
joins their signals back into one [B, L-1, K] in batch order, K the largest teacher's top-K
(a teacher with fewer fills the rest with absent slots, ``TeacherSignal.padded_to``), so
selection and the loss read each sequence's own teacher's signal unchanged. ``RoutedTeachers`` does the same for the teachers'
own generations (their accuracy on the held-out prompts), ``teacher_metrics`` names the
learner's per-teacher metrics ``teacher/<name>/...`` and ``RoutedHeldOut`` splits an
evaluation's metrics by teacher (``eval/teacher/<name>/...``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tip_ray.driver.ports import Teacher
from tip_ray.eval.held_out import HeldOutEval
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, SamplingSettings


def route_rows(routes: Sequence[str], names: Sequence[str]) -> dict[str, list[int]]:
    """The rows of each teacher: ``routes`` [B] (a teacher name per row) as ``{name: rows}``, in
    the order of ``names``, teachers without a row left out; ``ValueError`` for a route that is
    not in ``names``."""
    unknown = sorted(set(routes) - set(names))
    if unknown:
        raise ValueError(f"rows are routed to teachers {unknown}, which are not among the run's teachers {list(names)}")
    rows: dict[str, list[int]] = {name: [] for name in names}
    for i, name in enumerate(routes):
        rows[name].append(i)
    return {name: r for name, r in rows.items() if r}


def join_by_rows(parts: Sequence[tuple[str, Sequence[int], TeacherSignal]], total: int) -> TeacherSignal:
    """The teachers' signals as one [total, T, K] in batch order: part ``(name, rows, signal)``
    holds rows ``rows`` as ``signal`` [len(rows), T, K_i]; K is the largest K_i, a part with fewer
    padded by absent slots (``TeacherSignal.padded_to``: each row still reads as its own K_i
    signal). Every row of ``range(total)`` must come from exactly one part, and every part must
    have the same T and dtypes (``ValueError`` naming the teachers otherwise)."""
    if not parts:
        raise ValueError("no teacher signals to join")
    covered = sorted(i for _, rows, _ in parts for i in rows)
    if covered != list(range(total)):
        raise ValueError(f"the teachers' rows {covered} do not cover each of range({total}) exactly once")
    # Dense signals stay dense when every teacher sent one; beside a top-K one they get their ids.
    if not all(signal.dense for _, _, signal in parts):
        parts = [(name, rows, signal.with_ids()) for name, rows, signal in parts]
    first_name, _, first = parts[0]
    shape = (int(first.topk_logprobs.shape[1]), max(signal.k for _, _, signal in parts))
    kinds = (None if first.dense else first.topk_ids.dtype, first.topk_logprobs.dtype, first.sampled_logprobs.dtype)
    ids = None if first.dense else torch.empty((total, *shape), dtype=kinds[0])
    logprobs = torch.empty((total, *shape), dtype=kinds[1])
    sampled = torch.empty((total, shape[0]), dtype=kinds[2])
    for name, rows, signal in parts:
        if tuple(signal.topk_logprobs.shape[:2]) != (len(rows), shape[0]):
            raise ValueError(f"teacher {name!r} sent a signal of shape {tuple(signal.topk_logprobs.shape)} for {len(rows)} "
                             f"rows; teacher {first_name!r} sent [rows, T, K] = [.., {shape[0]}, {first.k}]: every "
                             "teacher must score the same positions")
        if (None if signal.dense else signal.topk_ids.dtype, signal.topk_logprobs.dtype,
                signal.sampled_logprobs.dtype) != kinds:
            raise ValueError(f"teacher {name!r} sent values of another dtype than teacher {first_name!r}: give every "
                             "teacher the same values_dtype")
        index = torch.as_tensor(list(rows), dtype=torch.long)
        signal = signal.padded_to(shape[1])
        if ids is not None:
            ids[index] = signal.topk_ids
        logprobs[index] = signal.topk_logprobs
        sampled[index] = signal.sampled_logprobs
    return TeacherSignal(ids, logprobs, sampled)


def score_routed(teachers: Mapping[str, Teacher], routes: Sequence[str], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, first_position: torch.Tensor | None = None) -> TeacherSignal:
    """The signal [B, L-1, K] of ``input_ids``/``attention_mask`` [B, L], row i scored by teacher
    ``routes[i]`` (``first_position`` [B] as ``Teacher.score`` takes it): every teacher's rows
    are launched before any is collected, then joined in batch order (``join_by_rows``)."""
    if len(routes) != input_ids.shape[0]:
        raise ValueError(f"{len(routes)} routes for {input_ids.shape[0]} sequences")
    launched: list[tuple[str, list[int], Any]] = []
    for name, rows in route_rows(routes, list(teachers)).items():
        index = torch.tensor(rows, dtype=torch.long)
        first = None if first_position is None else first_position[index]
        launched.append((name, rows, teachers[name].launch_score(input_ids[index], attention_mask[index], first)))
    parts = [(name, rows, teachers[name].collect_score(call)) for name, rows, call in launched]
    return join_by_rows(parts, int(input_ids.shape[0]))


class RoutedTeachers:
    """The teachers as one generation engine for prompts routed ``routes`` [N] (a teacher name
    per prompt, in the order ``generate`` gets them): what the teachers' accuracy is measured with."""

    def __init__(self, teachers: Mapping[str, Teacher], routes: Sequence[str]) -> None:
        self.teachers, self.routes = teachers, list(routes)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Generation]:
        """Each prompt's samples from its own teacher, ``prompt_index`` into ``prompts``, in prompt order."""
        if len(prompts) != len(self.routes):
            raise ValueError(f"{len(prompts)} prompts for {len(self.routes)} routes")
        out: list[Generation] = []
        for name, rows in route_rows(self.routes, list(self.teachers)).items():
            generations = self.teachers[name].generate([prompts[i] for i in rows], sampling)
            out += [replace(g, prompt_index=rows[g.prompt_index]) for g in generations]
        return sorted(out, key=lambda g: g.prompt_index)


def teacher_metrics(names: Sequence[str], routes: Sequence[str],
                    groups: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """A step's per-teacher lines: ``teacher/<name>/sequences`` (rows routed to it, ``routes`` [B])
    for every teacher, and the learner's metrics of its group ``groups[i]`` (``names[i]``'s
    sequences: kept fraction, mean and kept-token reverse KL, quadrant shares, ...) as
    ``teacher/<name>/<key>``."""
    out: dict[str, float] = {f"teacher/{name}/sequences": sum(r == name for r in routes) for name in names}
    for index, values in groups.items():
        out.update({f"teacher/{names[index]}/{key}": value for key, value in values.items()})
    return out


@dataclass(frozen=True)
class RoutedHeldOut(HeldOutEval):
    """A held-out evaluation whose prompts are routed: ``routes`` names each sample's teacher (in
    sample order); ``metrics`` adds the same metrics over each teacher's prompts alone, under
    ``<prefix>teacher/<name>/`` (accuracy, graded, response length, rkl, teacher agreement)."""

    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.routes) != len(self.generations):
            raise ValueError(f"{len(self.routes)} routes for {len(self.generations)} samples")

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """``HeldOutEval.metrics`` and the same per teacher (``grader_errors`` only overall)."""
        out = super().metrics(prefix)
        lengths = torch.tensor([len(g.token_ids) for g in self.generations], dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        for name, rows in route_rows(self.routes, list(dict.fromkeys(self.routes))).items():
            tokens = torch.cat([torch.arange(int(starts[i]), int(starts[i] + lengths[i])) for i in rows])

            def part(values: torch.Tensor | None, tokens: torch.Tensor = tokens) -> torch.Tensor | None:
                return None if values is None else values[tokens]

            mine = HeldOutEval(tuple(self.generations[i] for i in rows), tuple(self.correct[i] for i in rows),
                               part(self.rkl), part(self.agreement))
            out.update({k: v for k, v in mine.metrics(f"{prefix}teacher/{name}/").items()
                        if not k.endswith("grader_errors")})
        return out


def routed(samples: HeldOutEval, routes: Sequence[str]) -> RoutedHeldOut:
    """``samples`` with ``routes`` (a teacher name per prompt of the evaluated dataset, which each
    sample's ``prompt_index`` points into): its metrics split by teacher."""
    fields = {f: getattr(samples, f) for f in ("generations", "correct", "rkl", "agreement", "grader_errors")}
    return RoutedHeldOut(**fields, routes=tuple(routes[g.prompt_index] for g in samples.generations))
