"""The embedded reasoning tasks: arithmetic with a step-by-step scratchpad and an answer line.

Two families, generated deterministically from a seed:
- ``add``: a + b, digits added right to left with the carry written out;
- ``mul``: a * d for a single digit d, the same column by column.

A response looks like (for 4821+3976)::

    1+6+0=7
    2+7+0=9
    8+9+0=17
    4+3+1=8
    Answer: 8797

Every step is local, so a small transformer can learn it; the carries make it long enough that
a small student makes mistakes a larger teacher does not. Grading is exact on the answer line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ANSWER_PREFIX = "Answer: "
FAMILIES = ("add", "mul")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: ``family`` is ``add`` or ``mul``; ``b`` is a digit for ``mul``."""

    family: str
    a: int
    b: int

    @property
    def uid(self) -> str:
        """A stable id, also the key that keeps train and test disjoint."""
        return f"{self.family}:{self.a}:{self.b}"

    @property
    def prompt(self) -> str:
        """The user's question."""
        op = "+" if self.family == "add" else "*"
        return f"{self.a}{op}{self.b}="

    @property
    def answer(self) -> str:
        """The exact answer as a string."""
        return str(self.a + self.b if self.family == "add" else self.a * self.b)

    def solution(self) -> str:
        """The scratchpad solution ending with the answer line (no end-of-turn token)."""
        lines = []
        carry = 0
        digits_a = [int(c) for c in reversed(str(self.a))]
        if self.family == "add":
            digits_b = [int(c) for c in reversed(str(self.b))]
            width = max(len(digits_a), len(digits_b))
            digits_a += [0] * (width - len(digits_a))
            digits_b += [0] * (width - len(digits_b))
            for x, y in zip(digits_a, digits_b):
                total = x + y + carry
                lines.append(f"{x}+{y}+{carry}={total}")
                carry = total // 10
        else:
            for x in digits_a:
                total = x * self.b + carry
                lines.append(f"{x}*{self.b}+{carry}={total}")
                carry = total // 10
        lines.append(f"{ANSWER_PREFIX}{self.answer}")
        return "\n".join(lines)


@dataclass(frozen=True)
class TaskSpec:
    """Which problems a split draws: digit counts per family and the mixture."""

    families: tuple[str, ...] = FAMILIES
    min_digits: int = 2
    max_digits: int = 5

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"task families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")


def _draw(rng: random.Random, spec: TaskSpec) -> Problem:
    family = rng.choice(spec.families)
    digits_a = rng.randint(spec.min_digits, spec.max_digits)
    a = rng.randint(10 ** (digits_a - 1), 10**digits_a - 1)
    if family == "add":
        digits_b = rng.randint(spec.min_digits, spec.max_digits)
        b = rng.randint(10 ** (digits_b - 1), 10**digits_b - 1)
    else:
        b = rng.randint(2, 9)
    return Problem(family, a, b)


def make_splits(seed: int, num_train: int, num_test: int, spec: TaskSpec = TaskSpec()) -> tuple[list[Problem], list[Problem]]:
    """Deterministic, disjoint train and test problem lists (test drawn first)."""
    rng = random.Random(seed)
    test: dict[str, Problem] = {}
    while len(test) < num_test:
        problem = _draw(rng, spec)
        test.setdefault(problem.uid, problem)
    train: dict[str, Problem] = {}
    while len(train) < num_train:
        problem = _draw(rng, spec)
        if problem.uid not in test:
            train.setdefault(problem.uid, problem)
    return list(train.values()), list(test.values())


def sample_problems(rng: random.Random, count: int, spec: TaskSpec, exclude: set[str]) -> list[Problem]:
    """``count`` fresh problems (for SFT batches), none of whose uids is in ``exclude``."""
    out = []
    while len(out) < count:
        problem = _draw(rng, spec)
        if problem.uid not in exclude:
            out.append(problem)
    return out


def write_jsonl(problems: list[Problem], path: Path) -> None:
    """Write problems as prompt datasets read them: id, prompt, answer, family (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for p in problems:
            f.write(json.dumps({"id": p.uid, "prompt": p.prompt, "answer": p.answer, "family": p.family}) + "\n")
    tmp.replace(path)
