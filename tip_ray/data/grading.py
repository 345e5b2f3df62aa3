"""Answer checking and accuracy statistics.

Graders are ``(response, answer) -> bool`` functions, registered by name in ``GRADERS``:

- ``math``: mathematical equivalence through math-verify (``grade_math``);
- ``exact``: the last ``Answer: ...`` line, compared as a stripped string (``grade_exact``).

A grader that fails (math-verify raising or timing out, a gold answer it cannot parse) counts the
sample as incorrect; ``CHECKERS`` holds the same graders returning a ``Verdict`` that says so, and
``grade_all`` grades a list and counts the failures (``Grades.errors``: what an evaluation
reports as ``grader_errors``, so that a broken grader is not read as a weak model).

Metrics take per-prompt lists of per-sample correctness: ``pass_at_1``/``mean_at_k`` (mean over
prompts of the mean over samples), ``pass_at_k`` (the unbiased estimator for one prompt) and
``mean_pass_at_k`` (its mean over prompts), and ``accuracy_with_ci`` (Wilson score interval).

math-verify (and sympy under it) is imported on the first ``grade_math`` call only.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any

Grader = Callable[[str, str], bool]


@dataclass(frozen=True)
class Verdict:
    """One graded sample: whether it is correct, and why grading failed when it did (``error``:
    a short reason such as ``"timeout"``, ``"gold unparsable"`` or ``"ValueError: ..."``; None
    when the grader ran). A failed grading is never correct."""

    correct: bool
    error: str | None = None


Checker = Callable[[str, str], Verdict]

DEFAULT_TIMEOUT_S = 5
"""Seconds math-verify may spend parsing one string and comparing one pair (main thread only)."""

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    r"""The stripped content of the last top-level ``\boxed{...}`` or ``\fbox{...}`` in ``text``
    (nested braces matched), or None when there is none or the last one is never closed (a
    truncated response).

    math-verify exposes no string-level extractor (``math_verify.parse`` returns normalized sympy
    objects), hence this small brace matcher.
    """
    last: str | None = None
    position = 0
    while (match := _BOX_OPEN.search(text, position)) is not None:
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            return None
        last = text[match.end() : end - 1].strip()
        position = end
    return last


def grade_math(response: str, answer: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> bool:
    r"""Whether ``response`` states an answer mathematically equivalent to ``answer``
    (``check_math(...).correct``: a grading failure counts as incorrect)."""
    return check_math(response, answer, timeout_s).correct


def check_math(response: str, answer: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> Verdict:
    r"""Whether ``response`` states an answer mathematically equivalent to ``answer``, and whether
    grading failed.

    The gold is parsed by ``math_verify.parse`` from ``\boxed{answer}`` (or from ``answer`` as it is
    when it already holds a ``\boxed``); the prediction is parsed from the whole response, ``\fbox``
    read as ``\boxed``. math-verify prefers the last boxed answer, reads boxes close together
    (``\boxed{1}, \boxed{2}``) as one multi-part answer, and without any box falls back to the last
    plain expression. Every (gold, prediction) pair of parses is compared by ``math_verify.verify``;
    one that matches makes the sample correct. A response with nothing to parse is incorrect, not
    an error. Errors (``Verdict.error``, the sample then incorrect): the gold answer parses to
    nothing, or math-verify raises or times out while parsing either side, or while comparing
    and no other pair matched.

    Timeouts: math-verify bounds each parse and each comparison with ``signal.alarm``, which works
    only in a process's main thread (elsewhere math-verify raises). In the main thread ``timeout_s``
    is passed on; in any other thread math-verify's timeouts are turned off (``None``) so grading
    still works, but unbounded: a pathological answer (``\boxed{10^{10^{10^{10}}}}``) then runs for
    minutes. Ray actor methods run off the main thread (plain, threaded and async actors alike, as of
    Ray 2.x); the driver and plain Ray tasks run on it. Grade in the driver or in a Ray task (or a
    process pool) where a stuck comparison must not stall the caller.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = _parse_gold(answer, timeout)
    except (Exception, TimeoutException) as exc:
        return Verdict(False, f"gold: {_reason(exc)}")
    if not gold:
        return Verdict(False, "gold unparsable")
    try:
        # math-verify's extraction anchors on \boxed only; \fbox is the same box.
        prediction = parse(response.replace("\\fbox{", "\\boxed{"), parsing_timeout=timeout,  # type: ignore[arg-type]
                           raise_on_error=True)
    except (Exception, TimeoutException) as exc:
        return Verdict(False, _reason(exc))
    failure = None
    # Pair by pair (what verify does inside), so that a failing pair is seen and does not hide a match.
    for g in gold:
        for p in prediction:
            try:
                if verify(g, p, timeout_seconds=timeout, raise_on_error=True):
                    return Verdict(True)
            except (Exception, TimeoutException) as exc:
                failure = failure or _reason(exc)
    return Verdict(False, failure)


def _reason(exc: BaseException) -> str:
    """A short reason for a grading failure: ``timeout``, or the exception's type and message."""
    from math_verify.errors import TimeoutException

    if isinstance(exc, TimeoutException):
        return "timeout"
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> tuple[Any, ...]:
    """Parsed gold answer, cached: every sample of a prompt is graded against the same answer.
    Raises what math-verify raises (a failure is not cached)."""
    from math_verify import parse

    source = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    return tuple(parse(source, parsing_timeout=timeout, raise_on_error=True))  # type: ignore[arg-type]


def grade_exact(response: str, answer: str, pattern: str = r"Answer:\s*(\S+)") -> bool:
    """Whether the LAST match of ``pattern`` in ``response`` equals ``answer`` (both stripped).

    The compared text is the pattern's first group, or the whole match when it has no group. No
    match counts as incorrect.
    """
    matches = list(re.finditer(pattern, response))
    if not matches:
        return False
    match = matches[-1]
    found = match.group(1) if match.re.groups else match.group(0)
    return found is not None and found.strip() == answer.strip()


def check_exact(response: str, answer: str) -> Verdict:
    """``grade_exact`` as a ``Verdict`` (string matching never fails)."""
    return Verdict(grade_exact(response, answer))


GRADERS: dict[str, Grader] = {"math": grade_math, "exact": grade_exact}
CHECKERS: dict[str, Checker] = {"math": check_math, "exact": check_exact}


def get_grader(name: str) -> Grader:
    """The grader registered as ``name`` in ``GRADERS``; ``ValueError`` listing the known names otherwise."""
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known graders: {sorted(GRADERS)}") from None


def get_checker(name: str) -> Checker:
    """The grader ``name`` returning a ``Verdict`` (``CHECKERS``); ``ValueError`` listing the known names otherwise."""
    try:
        return CHECKERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known graders: {sorted(CHECKERS)}") from None


@dataclass(frozen=True)
class Grades:
    """A list of samples graded together (``grade_all``).

    ``correct`` [samples]: True/False, or None where the sample had no answer (not graded).
    ``errors``: how many graded samples the grader failed on (each counted incorrect);
    ``reasons``: how many failed for each reason (``Verdict.error``).
    """

    correct: tuple[bool | None, ...]
    errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def grade_all(texts: Sequence[str], answers: Sequence[str | None], grader: str) -> Grades:
    """Grade ``texts[i]`` against ``answers[i]`` with grader ``grader`` (None answers are not
    graded) and count the grader's failures."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} responses for {len(answers)} answers")
    check = get_checker(grader)
    correct: list[bool | None] = []
    reasons: Counter[str] = Counter()
    for text, answer in zip(texts, answers):
        if answer is None:
            correct.append(None)
            continue
        verdict = check(text, answer)
        correct.append(verdict.correct)
        if verdict.error is not None:
            reasons[verdict.error] += 1
    return Grades(tuple(correct), sum(reasons.values()), dict(reasons))


# ---------------------------------------------------------------------------------------------
# Metrics


def _check_samples(correct: Sequence[Sequence[bool]]) -> None:
    if not correct:
        raise ValueError("no prompts to score")
    for index, samples in enumerate(correct):
        if not samples:
            raise ValueError(f"prompt {index} has no samples")


def mean_at_k(correct: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """mean@k: the mean over prompts of the fraction correct among each prompt's first ``k`` samples
    (all samples when ``k`` is None). ``correct`` is ``[prompts][samples]``; every prompt needs at
    least ``k`` samples."""
    _check_samples(correct)
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        short = [index for index, samples in enumerate(correct) if len(samples) < k]
        if short:
            raise ValueError(f"mean@{k} needs {k} samples per prompt; prompt {short[0]} has {len(correct[short[0]])}")
    return sum(sum(map(bool, samples[:k])) / len(samples[:k]) for samples in correct) / len(correct)


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """pass@1 estimated from all samples: the mean over prompts of the mean over samples,
    ``correct`` being ``[prompts][samples]``."""
    return mean_at_k(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one prompt with ``c`` correct among ``n`` samples:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021), computed exactly."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n={n}, got k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k over a dataset: the mean over prompts of ``pass_at_k(n_i, c_i, k)``, ``correct`` being
    ``[prompts][samples]`` with at least ``k`` samples per prompt."""
    _check_samples(correct)
    return sum(pass_at_k(len(samples), sum(map(bool, samples)), k) for samples in correct) / len(correct)


def accuracy_with_ci(correct: Sequence[bool], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the accuracy of ``correct`` (``[items]``) and its Wilson score interval at
    ``confidence``."""
    if not correct:
        raise ValueError("no items to score")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(correct)
    successes = sum(map(bool, correct))
    p = successes / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact bounds at the edges, no rounding residue
    high = 1.0 if successes == n else min(1.0, center + half)
    return p, low, high
