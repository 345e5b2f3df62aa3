"""Cross-check tip_ray.tip's token statistics and selection rules against an independent,
plain float64 reference (tests/unit/reference.py). See TIP_SPEC.md sections 2-4.

The implementation is imported at the top on purpose: a missing public API fails loudly.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tip_ray.tip import TeacherSignal, compute_token_stats, select_tokens

# Load the reference by path so that it does not depend on how pytest sets sys.path.
_REF_PATH = pathlib.Path(__file__).with_name("reference.py")
_spec = importlib.util.spec_from_file_location("tip_stats_reference", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

STATS = ref.STAT_NAMES
DIVS = ("rkl", "fkl", "jsd")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- helpers


def _np_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _make_mask(rng, B, T, drop=0.25):
    mask = rng.random((B, T)) >= drop
    mask[0, -1] = False  # a padded tail position
    if not mask.any():
        mask[0, 0] = True
    return mask


def _teacher_signal_np(t_lp_np, y, K, shuffle_rng=None):
    """Manual top-K (or full, K == V) teacher signal from teacher log-probs [B, T, V].

    Independent of TeacherSignal.from_logits. Ids are in descending-logprob order (ties
    to the lower id) unless ``shuffle_rng`` is given.
    """
    B, T, V = t_lp_np.shape
    ids = np.empty((B, T, K), dtype=np.int64)
    vals = np.empty((B, T, K), dtype=t_lp_np.dtype)
    samp = np.empty((B, T), dtype=t_lp_np.dtype)
    for b in range(B):
        for t in range(T):
            order = np.argsort(-t_lp_np[b, t], kind="stable")[:K]
            if shuffle_rng is not None:
                order = shuffle_rng.permutation(order)
            ids[b, t] = order
            vals[b, t] = t_lp_np[b, t, order]
            samp[b, t] = t_lp_np[b, t, y[b, t]]
    return ids, vals, samp


class Case:
    """Random inputs for one batch, in both the implementation's and the reference's form."""

    def __init__(
        self,
        seed,
        B,
        T,
        V,
        K,
        dtype=torch.float64,
        id_dtype=torch.int64,
        s_scale=2.0,
        t_scale=1.5,
        shuffle=False,
        mask=None,
        student_logits=None,
        teacher_logits=None,
        response_ids=None,
    ):
        rng = np.random.default_rng(seed)
        if student_logits is None:
            student_logits = rng.normal(size=(B, T, V)) * s_scale
        if teacher_logits is None:
            teacher_logits = 0.6 * student_logits + rng.normal(size=(B, T, V)) * t_scale
        self.student = torch.tensor(student_logits, dtype=dtype)
        self.teacher_logits = torch.tensor(teacher_logits, dtype=dtype)
        if response_ids is None:
            p = _np_softmax(self.student.double().numpy())
            response_ids = np.array(
                [[rng.choice(V, p=p[b, t]) for t in range(T)] for b in range(B)], dtype=np.int64
            )
        self.y_np = np.asarray(response_ids, dtype=np.int64)
        self.y = torch.from_numpy(self.y_np.copy())
        self.mask_np = _make_mask(rng, B, T) if mask is None else np.asarray(mask, dtype=bool)
        self.mask = torch.from_numpy(self.mask_np.copy())
        # teacher log-probs in the working dtype (what a teacher server would send)
        self.t_lp_full = torch.log_softmax(self.teacher_logits, dim=-1)
        ids, vals, samp = _teacher_signal_np(
            self.t_lp_full.numpy(), self.y_np, K, rng if shuffle else None
        )
        self.ids_np, self.vals_np, self.samp_np = ids, vals, samp
        self.sig = TeacherSignal(
            topk_ids=torch.from_numpy(ids).to(id_dtype),
            topk_logprobs=torch.from_numpy(vals.copy()),
            sampled_logprobs=torch.from_numpy(samp.copy()),
        )
        self.dtype = dtype
        self.V = V
        self.K = K

    def impl(self, ta_k=16, sig=None):
        return compute_token_stats(self.student, self.y, sig or self.sig, self.mask, ta_k=ta_k)

    def reference(self, ta_k=16):
        # the reference sees exactly the (possibly float32-rounded) values the impl sees
        return ref.ref_batch_stats(
            self.student.double().numpy(),
            self.y_np,
            self.ids_np,
            self.vals_np.astype(np.float64),
            self.samp_np.astype(np.float64),
            self.mask_np,
            ta_k=ta_k,
        )


def _np(x):
    return x.detach().to(torch.float64).cpu().numpy()


def _stats_np(stats):
    return {name: _np(getattr(stats, name)) for name in STATS}


def _check_against_reference(case, stats, expected, names=STATS):
    B, T = case.mask_np.shape
    for name in names:
        got = getattr(stats, name)
        assert isinstance(got, torch.Tensor), name
        assert tuple(got.shape) == (B, T), (name, tuple(got.shape))
        assert got.dtype == case.dtype, (name, got.dtype)
        g = _np(got)
        assert np.all(g[~case.mask_np] == 0.0), f"{name} not zero at masked positions"
        np.testing.assert_allclose(
            g, expected[name], err_msg=f"stat {name} (V={case.V}, K={case.K})", **TOL[case.dtype]
        )


def _full_signal(t_lp_full, y):
    """Full-mode signal (K == V): ids = arange(V), logprobs = the whole log_softmax."""
    B, T, V = t_lp_full.shape
    ids = torch.arange(V).expand(B, T, V).clone()
    samp = torch.gather(t_lp_full, -1, y.unsqueeze(-1)).squeeze(-1)
    return TeacherSignal(topk_ids=ids, topk_logprobs=t_lp_full.clone(), sampled_logprobs=samp)


# ----------------------------------------------------------- (a) hand-computed cases


def _single(student_row, teacher_row, y, K=None, ta_k=16):
    """One position (B = T = 1), float64, full mode unless K is given (ids by descending lp)."""
    s = torch.tensor([[student_row]], dtype=torch.float64)
    tl = torch.tensor([[teacher_row]], dtype=torch.float64)
    lp = torch.log_softmax(tl, dim=-1)
    V = s.shape[-1]
    yy = torch.tensor([[y]], dtype=torch.long)
    K = V if K is None else K
    ids, vals, samp = _teacher_signal_np(lp.numpy(), yy.numpy(), K)
    sig = TeacherSignal(
        topk_ids=torch.from_numpy(ids),
        topk_logprobs=torch.from_numpy(vals),
        sampled_logprobs=torch.from_numpy(samp),
    )
    mask = torch.ones(1, 1, dtype=torch.bool)
    stats = compute_token_stats(s, yy, sig, mask, ta_k=ta_k)
    got = {name: float(getattr(stats, name)[0, 0]) for name in STATS}
    want_ref = ref.ref_position_stats(s[0, 0].numpy(), y, ids[0, 0], vals[0, 0], float(samp[0, 0]), ta_k)
    return got, want_ref


def _assert_hand(got, want_ref, hand):
    for name, value in hand.items():
        assert want_ref[name] == pytest.approx(value, abs=1e-12), f"reference {name}"
        assert got[name] == pytest.approx(value, abs=1e-10), f"implementation {name}"


def test_hand_uniform_student_v3():
    # V=3. Student logits [0,0,0] -> P_S = (1/3, 1/3, 1/3); H = ln 3, h = 1.
    # Teacher logits [ln 2, 0, 0] -> P_T = (1/2, 1/4, 1/4).
    # rkl = sum 1/3 ln((1/3)/P_T) = 1/3 [ln(2/3) + 2 ln(4/3)] = 1/3 ln(32/27)
    # fkl = 1/2 ln((1/2)/(1/3)) + 2 * 1/4 ln((1/4)/(1/3)) = 1/2 ln(3/2) + 1/2 ln(3/4)
    #     = 1/2 ln(9/8)
    # sampled_lr (y = 0) = ln(1/3) - ln(1/2) = ln(2/3)
    # M = (5/12, 7/24, 7/24); jsd*ln2 = 1/2 KL(P_T||M) + 1/2 KL(P_S||M)
    #   KL(P_T||M) = 1/2 ln(6/5) + 1/2 ln(6/7);  KL(P_S||M) = 1/3 ln(4/5) + 2/3 ln(8/7)
    # ta_k = 16 -> k = 3 = V: C = 1 (teacher mass on all ids), ta_entropy = 1,
    # ta_fkl = fkl (U = everything).
    got, want = _single([0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], y=0)
    jsd = (0.5 * (0.5 * math.log(6 / 5) + 0.5 * math.log(6 / 7))
           + 0.5 * (math.log(4 / 5) / 3 + 2 * math.log(8 / 7) / 3)) / LN2
    _assert_hand(
        got,
        want,
        dict(
            entropy=math.log(3.0),
            entropy_norm=1.0,
            rkl=math.log(32 / 27) / 3,
            fkl=0.5 * math.log(9 / 8),
            sampled_lr=math.log(2 / 3),
            jsd=jsd,
            teacher_mass_on_student_topk=1.0,
            ta_entropy=1.0,
            ta_fkl=0.5 * math.log(9 / 8),
        ),
    )


@pytest.mark.parametrize("ta_k", [1, 2, 4])
def test_hand_dyadic_student_uniform_teacher_v4(ta_k):
    # V=4. Student logits ln(1,1,2,4) -> P_S = (1/8, 1/8, 1/4, 1/2).
    # H = 2*(1/8) ln 8 + 1/4 ln 4 + 1/2 ln 2 = (3/4 + 1/2 + 1/2) ln 2 = 7/4 ln 2
    # h = (7/4 ln 2) / ln 4 = 7/8
    # Teacher logits 0 -> P_T uniform 1/4.
    # rkl = ln 4 - H = 1/4 ln 2
    # fkl = 1/4 [ln 2 + ln 2 + 0 - ln 2] = 1/4 ln 2
    # sampled_lr (y = 3) = ln(1/2) - ln(1/4) = ln 2
    # ta_k = 1: student top-1 = {3}; C = 1/4; ta_entropy = 0;
    #   teacher top-1 is a 4-way tie -> lowest id 0; U = {0, 3};
    #   P_T|U = (1/2, 1/2), P_S|U = (1/8, 1/2)/(5/8) = (1/5, 4/5)
    #   ta_fkl = 1/2 ln(5/2) + 1/2 ln(5/8) = 1/2 ln(25/16) = ln(5/4)
    # ta_k = 2: student top-2 = {3, 2}; C = 1/2;
    #   top-2 renormalised (2/3, 1/3): H = ln 3 - 2/3 ln 2, / ln 2;
    #   teacher top-2 (tie) = {0, 1}; U = all -> ta_fkl = fkl = 1/4 ln 2
    # ta_k = 4: k = V; C = 1; ta_entropy = h = 7/8; ta_fkl = fkl.
    got, want = _single([0.0, 0.0, math.log(2.0), math.log(4.0)], [0.0] * 4, y=3, ta_k=ta_k)
    hand = dict(
        entropy=1.75 * LN2,
        entropy_norm=7 / 8,
        rkl=0.25 * LN2,
        fkl=0.25 * LN2,
        sampled_lr=LN2,
    )
    hand.update(
        {
            1: dict(teacher_mass_on_student_topk=0.25, ta_entropy=0.0, ta_fkl=math.log(5 / 4)),
            2: dict(
                teacher_mass_on_student_topk=0.5,
                ta_entropy=(math.log(3.0) - 2 / 3 * LN2) / LN2,
                ta_fkl=0.25 * LN2,
            ),
            4: dict(teacher_mass_on_student_topk=1.0, ta_entropy=7 / 8, ta_fkl=0.25 * LN2),
        }[ta_k]
    )
    _assert_hand(got, want, hand)


def test_hand_topk_tail_bucket_v4():
    # V=4, K=1 (top-K mode). Student logits 0 -> P_S uniform 1/4.
    # Teacher logits ln(4,2,1,1) -> P_T = (1/2, 1/4, 1/8, 1/8); teacher top-1 = {0}; y = 1.
    # S = {0, 1}; teacher (1/2, 1/4 | tail 1/4), student (1/4, 1/4 | tail 1/2).
    # rkl = 1/4 ln(1/2) + 0 + 1/2 ln 2 = 1/4 ln 2   (= exact here: P_T is flat on the tail)
    # fkl = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2
    # ta_k = 2: student top-2 of a uniform dist -> ids {0, 1};
    #   C = P_T(0) + P_T(1) (the sampled one) = 3/4; ta_entropy = ln 2 / ln 2 = 1;
    #   teacher top-2 among its K=1 entries = {0}; U = {0, 1};
    #   P_T|U = (2/3, 1/3), P_S|U = (1/2, 1/2)
    #   ta_fkl = 2/3 ln(4/3) + 1/3 ln(2/3)
    got, want = _single([0.0] * 4, [math.log(4.0), math.log(2.0), 0.0, 0.0], y=1, K=1, ta_k=2)
    _assert_hand(
        got,
        want,
        dict(
            entropy=math.log(4.0),
            entropy_norm=1.0,
            rkl=0.25 * LN2,
            fkl=0.25 * LN2,
            sampled_lr=0.0,
            teacher_mass_on_student_topk=0.75,
            ta_entropy=1.0,
            ta_fkl=2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3),
        ),
    )


# ------------------------------------------------- (b) random inputs vs the reference


_RANDOM_CASES = [
    (seed, V, K)
    for seed, V in ((0, 7), (1, 23), (2, 50))
    for K in sorted({1, 3, V - 1, V})
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed,V,K", _RANDOM_CASES)
def test_random_matches_reference(seed, V, K, dtype):
    id_dtype = torch.int32 if seed % 2 else torch.int64
    case = Case(seed, B=2, T=6, V=V, K=K, dtype=dtype, id_dtype=id_dtype)
    _check_against_reference(case, case.impl(), case.reference())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ta_k", [1, 2, 5, 64])
@pytest.mark.parametrize("V,K", [(9, 2), (9, 9), (20, 4)])
def test_random_ta_k_matches_reference(V, K, ta_k, dtype):
    case = Case(100 + V + K + ta_k, B=2, T=5, V=V, K=K, dtype=dtype)
    _check_against_reference(case, case.impl(ta_k=ta_k), case.reference(ta_k=ta_k))


@pytest.mark.parametrize("V,K", [(12, 3), (12, 11), (12, 12)])
def test_teacher_ids_in_any_order(V, K):
    """The teacher's K entries need not be sorted (full mode: any permutation of range(V))."""
    case = Case(7 + K, B=2, T=6, V=V, K=K, dtype=torch.float64, shuffle=True, t_scale=2.0)
    _check_against_reference(case, case.impl(ta_k=4), case.reference(ta_k=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K", [3, 12])
def test_topk_ties_break_to_lower_id(K, dtype):
    """Coarsely quantised logits (as bf16 logits often are) give exact ties inside the
    ta_k top-k choices; the convention is: ties go to the lower token id."""
    rng = np.random.default_rng(21)
    s = np.round(rng.normal(size=(2, 6, 12)) * 1.5)  # integers -> many exact ties
    tl = np.round(rng.normal(size=(2, 6, 12)) * 1.5)
    case = Case(21, B=2, T=6, V=12, K=K, dtype=dtype, student_logits=s, teacher_logits=tl)
    _check_against_reference(case, case.impl(ta_k=4), case.reference(ta_k=4))


def test_masked_positions_are_zero_even_with_garbage():
    case = Case(3, B=3, T=5, V=10, K=4, dtype=torch.float32)
    student = case.student.clone()
    student[~case.mask] = 1e4  # garbage logits where the mask is off
    stats = compute_token_stats(student, case.y, case.sig, case.mask)
    for name in STATS:
        g = _np(getattr(stats, name))
        assert np.all(g[~case.mask_np] == 0.0), name
        assert np.all(np.isfinite(g)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [None, 1, 4, 15])
def test_from_logits(k, dtype):
    V = 15
    case = Case(11, B=2, T=4, V=V, K=V if k is None else k, dtype=dtype)
    sig = TeacherSignal.from_logits(case.teacher_logits, case.y, k=k)
    K = V if k is None else k
    assert sig.dense == (k is None)  # the whole distribution: dense, the column is the id
    ids = sig.with_ids().topk_ids.detach().cpu().numpy()
    vals = _np(sig.topk_logprobs)
    samp = _np(sig.sampled_logprobs)
    assert ids.shape == (2, 4, K) and vals.shape == (2, 4, K) and samp.shape == (2, 4)
    lp = _np(case.t_lp_full)
    tol = TOL[dtype]
    for b in range(2):
        for t in range(4):
            # same set of ids as an independent top-K, with the matching log-probs
            assert sorted(ids[b, t].tolist()) == sorted(case.ids_np[b, t].tolist())
            np.testing.assert_allclose(vals[b, t], lp[b, t, ids[b, t]], **tol)
            assert samp[b, t] == pytest.approx(lp[b, t, case.y_np[b, t]], rel=tol["rtol"], abs=tol["atol"])
    # and the statistics computed from it agree with the reference
    _check_against_reference(case, case.impl(sig=sig), case.reference())


# ------------------------- (c) top-K estimates: non-negative, <= exact, = exact at K = V


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_bounded_by_exact_for_every_k(seed, dtype):
    V = 9
    # float64: the brief's +1e-6; float32: the float32 comparison tolerance (rounding of
    # the teacher tail 1 - sum exp(lp) in float32).
    slack = 1e-6 if dtype == torch.float64 else 1e-5
    base = Case(seed, B=2, T=6, V=V, K=V, dtype=dtype)
    exact = _stats_np(compute_token_stats(base.student, base.y, _full_signal(base.t_lp_full, base.y), base.mask))
    exact_ref = base.reference()
    for name in DIVS:
        np.testing.assert_allclose(exact[name], exact_ref[name], **TOL[dtype])
    m = base.mask_np
    prev = None
    for K in range(1, V + 1):
        case = Case(
            seed, B=2, T=6, V=V, K=K, dtype=dtype,
            student_logits=base.student.double().numpy(),
            teacher_logits=base.teacher_logits.double().numpy(),
            response_ids=base.y_np, mask=m,
        )
        est = _stats_np(case.impl())
        for name in DIVS:
            assert np.all(est[name][m] >= 0.0), (name, K, est[name][m].min())
            assert np.all(est[name][m] <= exact[name][m] + slack), (
                name, K, float(np.max(est[name][m] - exact[name][m])))
            if K >= V - 1:
                # K = V is the exact value; K = V - 1 merges at most one token into the
                # tail bucket, which is exact too.
                np.testing.assert_allclose(est[name][m], exact[name][m], rtol=1e-5, atol=1e-5)
            if prev is not None:
                # nested supports: the partition refines as K grows, so the estimate
                # can only increase (data-processing inequality)
                assert np.all(est[name][m] >= prev[name][m] - slack), (name, K)
        prev = est


# ------------------------------------------------------- (d) hypothesis properties


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    V=st.integers(2, 12),
    T=st.integers(1, 4),
    s_scale=st.floats(0.0, 8.0),
    t_scale=st.floats(0.0, 8.0),
    teacher_is_student=st.booleans(),
)
def test_property_nonnegative_and_bounded(data, seed, V, T, s_scale, t_scale, teacher_is_student):
    K = data.draw(st.integers(1, V), label="K")
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2, T, V)) * s_scale
    tl = s.copy() if teacher_is_student else rng.normal(size=(2, T, V)) * t_scale
    mask = np.ones((2, T), dtype=bool)
    mask[1, -1] = False
    y = rng.integers(0, V, size=(2, T))
    case = Case(seed, B=2, T=T, V=V, K=K, dtype=torch.float64, student_logits=s,
                teacher_logits=tl, response_ids=y, mask=mask)
    est = _stats_np(case.impl())
    exact = _stats_np(compute_token_stats(case.student, case.y, _full_signal(case.t_lp_full, case.y), case.mask))
    for stats in (est, exact):
        for name in DIVS:
            assert np.all(stats[name][mask] >= 0.0), (name, stats[name][mask].min())
        assert np.all(stats["jsd"][mask] <= 1.0 + 1e-9)
        assert np.all((stats["entropy_norm"][mask] >= -1e-12) & (stats["entropy_norm"][mask] <= 1 + 1e-9))
        assert np.all((stats["ta_entropy"][mask] >= -1e-12) & (stats["ta_entropy"][mask] <= 1 + 1e-9))
        c = stats["teacher_mass_on_student_topk"][mask]
        assert np.all((c >= 0.0) & (c <= 1.0 + 1e-9))
        assert np.all(stats["ta_fkl"][mask] >= -1e-12)
        for name in STATS:
            assert np.all(np.isfinite(stats[name])), name
    for name in DIVS:
        assert np.all(est[name][mask] <= exact[name][mask] + 1e-6), (
            name, K, float(np.max(est[name][mask] - exact[name][mask])))


# ------------------------------------------------------------- (e) selection rules


def _check_selection(stats, rule, rho, mask_np):
    keep = select_tokens(stats, rule, rho, torch.from_numpy(mask_np.copy()))
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
    assert tuple(keep.shape) == mask_np.shape
    keep = keep.cpu().numpy()
    want = ref.ref_select(_stats_np(stats), rule, rho, mask_np)
    m = int(mask_np.sum())
    assert not np.any(keep & ~mask_np), "kept a masked position"
    assert int(keep.sum()) == ref.ref_budget(rho, m), (int(keep.sum()), m)
    np.testing.assert_array_equal(keep, want, err_msg=f"{rule} rho={rho}")
    return keep


_RULES = [("soft_or", 0.5), ("overconfident", 0.1), ("entropy_topk", 0.5),
          ("soft_or", 0.3), ("overconfident", 0.25), ("entropy_topk", 0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,rho", _RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_reference(seed, rule, rho, dtype):
    case = Case(50 + seed, B=3, T=12, V=11, K=3, dtype=dtype, s_scale=1.5 + seed)
    _check_selection(case.impl(), rule, rho, case.mask_np)


def _prototype_case(seed, assignment, mask):
    """Positions that copy one of a few prototypes exactly, so that their stats tie."""
    rng = np.random.default_rng(seed)
    P = int(assignment.max()) + 1
    V = 8
    s_proto = rng.normal(size=(P, V)) * 2.0
    t_proto = 0.5 * s_proto + rng.normal(size=(P, V)) * 1.5
    y_proto = rng.integers(0, V, size=P)
    return Case(seed, B=assignment.shape[0], T=assignment.shape[1], V=V, K=V, dtype=torch.float64,
                student_logits=s_proto[assignment], teacher_logits=t_proto[assignment],
                response_ids=y_proto[assignment], mask=mask)


def _tie_straddles_boundary(stats_np, rule, rho, mask_np):
    idx = np.nonzero(mask_np.reshape(-1))[0]
    h = stats_np["entropy_norm"].reshape(-1)[idx]
    if rule == "entropy_topk":
        s = h
    elif rule == "soft_or":
        s = ref.ref_soft_or_scores(h, stats_np["rkl"].reshape(-1)[idx])
    else:
        s = ref.ref_overconfident_scores(h, stats_np["fkl"].reshape(-1)[idx])
    B = ref.ref_budget(rho, len(idx))
    srt = np.sort(s)[::-1]
    return B < len(srt) and srt[B - 1] == srt[B]


@pytest.mark.parametrize("rule,rho", [("soft_or", 0.5), ("overconfident", 0.1), ("entropy_topk", 0.5)])
def test_selection_ties_break_to_earlier_positions(rule, rho):
    # 3 prototypes, each repeated many times and interleaved: the kept/unkept boundary
    # falls inside a group of exactly equal scores.
    rng = np.random.default_rng(5)
    assignment = rng.permutation(np.repeat(np.arange(3), [9, 8, 7])).reshape(3, 8)
    mask = np.ones((3, 8), dtype=bool)
    mask[2, 6:] = False
    mask[0, 3] = False
    for seed in range(40):
        case = _prototype_case(seed, assignment, mask)
        stats = case.impl()
        st_np = _stats_np(stats)
        # precondition: copies of a prototype have bit-identical statistics
        for p in range(3):
            sel = (assignment == p) & mask
            for name in ("entropy_norm", "rkl", "fkl"):
                vals = st_np[name][sel]
                assert np.all(vals == vals[0]), f"copies of one position got different {name}"
        if _tie_straddles_boundary(st_np, rule, rho, mask):
            break
    else:
        pytest.fail("no prototype draw put a tie on the selection boundary")
    _check_selection(stats, rule, rho, mask)


@pytest.mark.parametrize("rule,rho", [("soft_or", 0.5), ("overconfident", 0.1), ("entropy_topk", 0.5)])
def test_selection_all_equal_keeps_first_valid_positions(rule, rho):
    # every position identical: minmax is 0 everywhere, all scores tie, and top-B must be
    # the first B valid positions in row-major order
    assignment = np.zeros((2, 10), dtype=np.int64)
    mask = np.ones((2, 10), dtype=bool)
    mask[0, :2] = False
    mask[1, 5] = False
    case = _prototype_case(1, assignment, mask)
    keep = _check_selection(case.impl(), rule, rho, mask)
    flat_valid = np.nonzero(mask.reshape(-1))[0]
    B = ref.ref_budget(rho, len(flat_valid))
    expected = np.zeros(mask.size, dtype=bool)
    expected[flat_valid[:B]] = True
    np.testing.assert_array_equal(keep.reshape(-1), expected)


@pytest.mark.parametrize("rule,rho", [("soft_or", 0.5), ("overconfident", 0.1), ("entropy_topk", 0.5)])
def test_selection_single_valid_token(rule, rho):
    case = Case(9, B=2, T=3, V=6, K=2, dtype=torch.float64, mask=np.array([[0, 0, 0], [0, 1, 0]], bool))
    keep = _check_selection(case.impl(), rule, rho, case.mask_np)
    assert keep.sum() == 1 and keep[1, 1]


# ------------------------------------------------------ the reference, checked itself


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_topk_bounded_by_reference_exact(seed):
    """Sanity of the reference alone: merging outcomes never increases a divergence."""
    rng = np.random.default_rng(seed)
    V = 10
    s = rng.normal(size=V) * 2
    lp = torch.log_softmax(torch.tensor(rng.normal(size=V) * 2, dtype=torch.float64), -1).numpy()
    y = int(rng.integers(V))
    order = np.argsort(-lp, kind="stable")
    exact = ref.ref_position_stats(s, y, order, lp[order], lp[y])
    prev = None
    for K in range(1, V + 1):
        est = ref.ref_position_stats(s, y, order[:K], lp[order[:K]], lp[y])
        for name in DIVS:
            assert 0.0 <= est[name] <= exact[name] + 1e-12
            if prev is not None:
                assert est[name] >= prev[name] - 1e-12
            if K >= V - 1:
                assert est[name] == pytest.approx(exact[name], abs=1e-9)
        prev = est


def test_reference_selection_helpers():
    assert np.array_equal(ref.ref_minmax([2.0, 2.0]), [0.0, 0.0])
    assert np.allclose(ref.ref_minmax([1.0, 3.0, 2.0]), [0.0, 1.0, 0.5])
    assert ref.ref_topb([1.0, 3.0, 3.0, 2.0], 2).tolist() == [False, True, True, False]
    assert ref.ref_topb([5.0, 5.0, 5.0], 2).tolist() == [True, True, False]
    assert ref.ref_topb([1.0, 1.0, 0.0], 2, bottom=True).tolist() == [True, False, True]
    h = np.linspace(0, 1, 101)
    # q98 of 0..1 in 101 steps is 0.98: the top two entropies are clipped
    s = ref.ref_soft_or_scores(h, np.zeros(101))
    assert s[-1] == s[-2] == s[-3] == 1.0 and s[-4] < 1.0
