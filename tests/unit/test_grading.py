"""Grading: boxed extraction, math-verify equivalence, exact answers, the registry, pass@k and Wilson CIs.

The math cases assert what math-verify 0.9 actually decides, including its known limits.
"""

from __future__ import annotations

import math
import threading

import pytest

from tip_ray.data.grading import (
    CHECKERS,
    GRADERS,
    Verdict,
    accuracy_with_ci,
    check_exact,
    check_math,
    extract_boxed,
    get_checker,
    get_grader,
    grade_all,
    grade_exact,
    grade_math,
    mean_at_k,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
)

# --- extract_boxed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{10}$.", "10"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, then \boxed{\dfrac{3}{4}} at last", r"\dfrac{3}{4}"),
        (r"\fbox{ 7 }", "7"),
        (r"\boxed {x}", "x"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\boxed{1}}", r"\boxed{1}"),  # the last top-level box
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{1} and a truncated \boxed{2", None),
        (r"\boxed", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# --- grade_math -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"The answer is $\boxed{0.5}$.", r"\frac{1}{2}"),
        (r"Therefore $\boxed{\dfrac{3}{4}}$", "3/4"),
        (r"\boxed{0.75}", "3/4"),
        (r"\boxed{10}", "10"),
        (r"\boxed{x=2}", "2"),  # math-verify reads an assignment's right-hand side
        (r"The final answer is $x = 2$.", "2"),
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}"),
        (r"\boxed{3\sqrt{3}}", r"\sqrt{27}"),
        (r"\boxed{[2, 5)}", "[2,5)"),
        (r"\boxed{(-\infty, 3) \cup (5, \infty)}", r"(-\infty,3)\cup(5,\infty)"),
        (r"\boxed{2, 1}", "1,2"),  # a set of solutions, in any order
        (r"\boxed{\text{(C)}}", "C"),
        (r"\boxed{\$18.90}", "18.90"),
        (r"\boxed{18.90}", r"\$18.90"),
        (r"\fbox{7}", "7"),
        (r"so \boxed{7} ... checking again, \boxed{7}", "7"),
        ("I think it is 10.", "10"),  # no box: math-verify falls back to the last expression
        (r"\boxed{90^\circ}", "90"),
    ],
)
def test_grade_math_accepts_equivalent_answers(response, answer):
    assert grade_math(response, answer)


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"\boxed{11}", "10"),
        (r"\boxed{(2, 5)}", "[2,5)"),  # open vs half-open interval
        ("I have no idea.", "10"),  # nothing to extract
        (r"\boxed{", "10"),
        (r"\boxed{5}", ""),  # an empty gold never matches
        ("", "10"),
        # math-verify's own limits, pinned so a change in behaviour is noticed:
        (r"\boxed{1}, then \boxed{2}", "2"),  # nearby boxes are read as one answer {1, 2}
        (r"\boxed{70\%}", "70"),  # a percent sign is not dropped
    ],
)
def test_grade_math_rejects(response, answer):
    assert not grade_math(response, answer)


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("}}}{{{\\frac{\\boxed{", "10"),
        ("\x00\xff\\frac{{{", "\\boxed{}"),
        ("\\boxed{\\frac{1}{0}}", "1"),
        ("\\boxed{1}", "}{"),
        ("\\" * 1000, "\\sqrt{"),
        ("\\boxed{\\begin{pmatrix} 1 & 2 \\end{pmatrix}}", "\\begin{pmatrix"),
    ],
)
def test_grade_math_on_garbage_returns_false_without_raising(response, answer):
    assert grade_math(response, answer) is False


def test_grade_math_times_out_on_a_pathological_answer_in_the_main_thread():
    assert threading.current_thread() is threading.main_thread()
    assert grade_math(r"\boxed{10^{10^{10^{10}}}}", "10", timeout_s=1) is False


def test_grade_math_works_from_another_thread():
    results: list[object] = []

    def work() -> None:
        try:
            results.append(
                [
                    grade_math(r"\boxed{0.5}", r"\frac12"),
                    grade_math(r"\boxed{3}", "4"),
                    grade_exact("Answer: 3", "3"),
                ]
            )
        except BaseException as err:  # pragma: no cover - reported below
            results.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert results == [[True, False, True]]


# --- grading failures are counted, not read as wrong answers ---------------------------------


def test_check_math_says_why_a_grading_failed():
    assert check_math(r"\boxed{0.5}", r"\frac12") == Verdict(True)
    assert check_math(r"\boxed{3}", "4") == Verdict(False)  # a wrong answer is not an error
    assert check_math("no answer at all", "4") == Verdict(False)  # nothing to parse: not an error either
    assert check_math(r"\boxed{10^{10^{10^{10}}}}", "10", timeout_s=1) == Verdict(False, "timeout")
    assert check_math(r"\boxed{3}", "") == Verdict(False, "gold unparsable")


def test_a_comparison_that_raises_is_an_error_unless_another_pair_matches(monkeypatch):
    import math_verify

    real = math_verify.verify

    def flaky(gold, target, **kwargs):
        if isinstance(target, str):  # math-verify's string form of each parse
            raise RuntimeError("comparison broke\nsecond line")
        return real(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "verify", flaky)
    assert check_math(r"\boxed{7}", "7") == Verdict(True)  # the sympy pair still matches
    verdict = check_math(r"\boxed{8}", "7")
    assert verdict == Verdict(False, "RuntimeError: comparison broke")
    assert grade_math(r"\boxed{8}", "7") is False


def test_grade_all_counts_failures_and_skips_ungraded_samples():
    grades = grade_all([r"\boxed{2}", r"\boxed{3}", "whatever", r"\boxed{10^{10^{10^{10}}}}", r"\boxed{1}"],
                       ["2", "2", None, "10", ""], "math")
    assert grades.correct == (True, False, None, False, False)
    assert grades.errors == 2 and grades.reasons == {"timeout": 1, "gold unparsable": 1}
    exact = grade_all(["Answer: 3", "Answer: 4"], ["3", "3"], "exact")
    assert (exact.correct, exact.errors, exact.reasons) == ((True, False), 0, {})
    with pytest.raises(ValueError, match="2 responses for 1 answers"):
        grade_all(["a", "b"], ["a"], "exact")


# --- grade_exact ------------------------------------------------------------------------------


def test_grade_exact_uses_the_last_answer_line():
    assert grade_exact("Answer: 3\nwait, no.\nAnswer: 5", "5")
    assert not grade_exact("Answer: 5\nhmm\nAnswer: 3", "5")


def test_grade_exact_whitespace_and_missing_line():
    assert grade_exact("reasoning...\nAnswer:    42  \n", " 42 ")
    assert grade_exact("Answer:\n7", "7")  # \s* spans the line break
    assert not grade_exact("The answer is 42", "42")
    assert not grade_exact("Answer: 420", "42")
    assert not grade_exact("", "42")


def test_grade_exact_custom_patterns():
    assert grade_exact("#### 18", "18", pattern=r"####\s*(\S+)")
    assert grade_exact("result=ok", "result=ok", pattern=r"result=\w+")  # no group: the whole match


# --- registry ---------------------------------------------------------------------------------


def test_registry():
    assert GRADERS == {"math": grade_math, "exact": grade_exact}
    assert get_grader("math") is grade_math and get_grader("exact") is grade_exact
    assert CHECKERS == {"math": check_math, "exact": check_exact} and get_checker("math") is check_math
    with pytest.raises(ValueError, match=r"unknown grader 'maths'"):
        get_checker("maths")
    with pytest.raises(ValueError, match=r"unknown grader 'maths'.*\['exact', 'math'\]"):
        get_grader("maths")


# --- metrics ----------------------------------------------------------------------------------


def test_pass_at_1_and_mean_at_k():
    correct = [[True, False, True, True], [False, False, False, False], [True, True, False, False]]
    assert pass_at_1(correct) == pytest.approx((3 / 4 + 0 + 2 / 4) / 3)
    assert mean_at_k(correct) == pass_at_1(correct)
    assert mean_at_k(correct, k=2) == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert pass_at_1([[True], [False]]) == 0.5
    with pytest.raises(ValueError, match="mean@5 needs 5 samples per prompt"):
        mean_at_k(correct, k=5)
    with pytest.raises(ValueError, match="prompt 1 has no samples"):
        pass_at_1([[True], []])
    with pytest.raises(ValueError, match="no prompts"):
        pass_at_1([])


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 0, 1, 0.0),
        (10, 3, 1, 0.3),
        (10, 10, 5, 1.0),
        (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)/C(10,5) = 21/252
        (4, 1, 4, 1.0),  # n - c < k
        (16, 1, 8, 0.5),  # C(15,8)/C(16,8) = 8/16
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_product_form_and_bad_arguments():
    n, c = 200, 37
    for k in (1, 10, 100):
        product = 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(product, rel=1e-9)
    for args in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_mean_pass_at_k():
    correct = [[True, False, False, False], [False] * 4]
    assert mean_pass_at_k(correct, 2) == pytest.approx((pass_at_k(4, 1, 2) + 0.0) / 2) == pytest.approx(0.25)


def test_wilson_interval_matches_a_hand_computed_value():
    # 8 of 10 at 95%: z = 1.959964, center = (0.8 + z^2/20) / (1 + z^2/10) = 0.7167,
    # half = z * sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.2266 -> [0.4902, 0.9433]
    mean, low, high = accuracy_with_ci([True] * 8 + [False] * 2)
    assert mean == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_edges_and_bad_input():
    mean, low, high = accuracy_with_ci([False] * 20)
    assert (mean, low) == (0.0, 0.0) and 0.0 < high < 0.2
    mean, low, high = accuracy_with_ci([True] * 20, confidence=0.99)
    assert (mean, high) == (1.0, 1.0) and low < accuracy_with_ci([True] * 20, confidence=0.9)[1]
    with pytest.raises(ValueError, match="no items"):
        accuracy_with_ci([])
    with pytest.raises(ValueError, match="confidence"):
        accuracy_with_ci([True], confidence=1.0)
