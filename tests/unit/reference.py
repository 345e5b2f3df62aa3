"""Plain, slow, float64 reference for the per-token statistics and selection rules.

Written independently of ``tip_ray.tip`` as a cross-check (TIP_SPEC.md sections 2-4).
Deliberately un-vectorised: one position at a time, Python loops over the (small)
vocabulary, dicts/sets for supports. Use only with small V and few positions.

Conventions (from the test brief):

* Full mode: K == V and the teacher ids are a permutation of range(V). The teacher
  distribution exp(logprob) is renormalised to sum 1; rkl/fkl/jsd are exact.
* Top-K mode: K < V. Support S = set(t_ids) | {y}; teacher mass on S is exp(logprob)
  (exp(t_sampled_logprob) for y when y is not among t_ids); both teacher and student get
  a tail bucket ``max(1 - sum_S, 0)`` floored at 1e-10; each (|S|+1)-vector is then
  renormalised to sum 1 and the divergences are taken between the two.
* ``jsd`` uses beta = 0.5 and is divided by ln 2 (so it lies in [0, 1]).
* Top-k choices (ta_k statistics) break ties towards the lower token id.
* ``teacher_mass_on_student_topk`` and ``ta_fkl`` use the *unrenormalised* teacher
  probabilities exp(logprob) in top-K mode (unknown ids count 0) and the renormalised
  full distribution in full mode.
"""

from __future__ import annotations

import math

import numpy as np

TAIL_FLOOR = 1e-10
LN2 = math.log(2.0)

STAT_NAMES = (
    "entropy",
    "entropy_norm",
    "rkl",
    "fkl",
    "jsd",
    "sampled_lr",
    "teacher_mass_on_student_topk",
    "ta_entropy",
    "ta_fkl",
)


# ----------------------------------------------------------------------------- helpers


def _student_dist(student_logits):
    """Return (prob, logprob) as dicts id -> value, computed in float64."""
    x = [float(v) for v in np.asarray(student_logits, dtype=np.float64)]
    mx = max(x)
    z = 0.0
    for v in x:
        z += math.exp(v - mx)
    log_z = mx + math.log(z)
    logp = {i: x[i] - log_z for i in range(len(x))}
    prob = {i: math.exp(lp) for i, lp in logp.items()}
    return prob, logp


def _kl(p, q):
    """KL(p || q) for two equally long lists of probabilities (natural log)."""
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0.0:
            if qi <= 0.0:
                return math.inf
            total += pi * (math.log(pi) - math.log(qi))
    return total


def _jsd_over_ln2(p, q):
    """0.5*KL(p||m) + 0.5*KL(q||m) with m = (p+q)/2, divided by ln 2."""
    m = [(pi + qi) / 2.0 for pi, qi in zip(p, q)]
    return (0.5 * _kl(p, m) + 0.5 * _kl(q, m)) / LN2


def _entropy(p):
    h = 0.0
    for pi in p:
        if pi > 0.0:
            h -= pi * math.log(pi)
    return h


def _topk_ids(prob_by_id, k):
    """The k ids of largest value; ties towards the lower id."""
    order = sorted(prob_by_id.keys(), key=lambda v: (-prob_by_id[v], v))
    return order[:k]


def _tail_bucket(mass_on_support):
    tail = 1.0 - mass_on_support
    if tail < 0.0:
        tail = 0.0
    if tail < TAIL_FLOOR:
        tail = TAIL_FLOOR
    return tail


def _normalise(values):
    s = sum(values)
    return [v / s for v in values]


# ------------------------------------------------------------------- one position


def ref_position_stats(student_logits, sampled_id, t_ids, t_logprobs, t_sampled_logprob, ta_k=16):
    """All statistics for one response position, as a dict of Python floats."""
    student_logits = np.asarray(student_logits, dtype=np.float64)
    t_ids = [int(v) for v in np.asarray(t_ids).reshape(-1)]
    t_lp = [float(v) for v in np.asarray(t_logprobs, dtype=np.float64).reshape(-1)]
    t_samp = float(t_sampled_logprob)
    y = int(sampled_id)
    V = int(student_logits.shape[-1])
    K = len(t_ids)
    assert K == len(t_lp) and 1 <= K <= V
    assert len(set(t_ids)) == K, "teacher ids must be distinct"
    assert all(0 <= v < V for v in t_ids) and 0 <= y < V

    p_s, logp_s = _student_dist(student_logits)
    out = {}

    # entropy
    h = _entropy([p_s[v] for v in range(V)])
    out["entropy"] = h
    out["entropy_norm"] = h / math.log(V) if V > 1 else 0.0

    # sampled-token log ratio (k1)
    out["sampled_lr"] = logp_s[y] - t_samp

    full_mode = K == V
    if full_mode:
        assert set(t_ids) == set(range(V)), "full mode needs a permutation of range(V)"
        # teacher: renormalised exp(logprob); its log computed as lp - logsumexp(lp)
        mx = max(t_lp)
        z = sum(math.exp(v - mx) for v in t_lp)
        log_z = mx + math.log(z)
        logp_t = {t_ids[i]: t_lp[i] - log_z for i in range(K)}
        p_t = {v: math.exp(lp) for v, lp in logp_t.items()}

        rkl = 0.0
        fkl = 0.0
        for v in range(V):
            if p_s[v] > 0.0:
                rkl += p_s[v] * (logp_s[v] - logp_t[v])
            if p_t[v] > 0.0:
                fkl += p_t[v] * (logp_t[v] - logp_s[v])
        out["rkl"] = rkl
        out["fkl"] = fkl
        out["jsd"] = _jsd_over_ln2([p_s[v] for v in range(V)], [p_t[v] for v in range(V)])

        teacher_known = dict(p_t)  # every id known
        teacher_rank_value = dict(p_t)
    else:
        support = set(t_ids) | {y}
        teacher_known = {t_ids[i]: math.exp(t_lp[i]) for i in range(K)}
        if y not in teacher_known:
            teacher_known[y] = math.exp(t_samp)
        ids = sorted(support)
        t_vec = [teacher_known[v] for v in ids]
        s_vec = [p_s[v] for v in ids]
        t_vec.append(_tail_bucket(sum(t_vec)))
        s_vec.append(_tail_bucket(sum(s_vec)))
        t_vec = _normalise(t_vec)
        s_vec = _normalise(s_vec)
        out["rkl"] = _kl(s_vec, t_vec)
        out["fkl"] = _kl(t_vec, s_vec)
        out["jsd"] = _jsd_over_ln2(s_vec, t_vec)
        # the teacher's own top-k is chosen among its K reported entries only
        teacher_rank_value = {t_ids[i]: t_lp[i] for i in range(K)}

    # teachability statistics (TA-OPD), k = min(ta_k, V)
    k = min(int(ta_k), V)
    s_top = _topk_ids(p_s, k)

    out["teacher_mass_on_student_topk"] = sum(teacher_known.get(v, 0.0) for v in s_top)

    if k == 1:
        out["ta_entropy"] = 0.0
    else:
        q = _normalise([p_s[v] for v in s_top])
        out["ta_entropy"] = _entropy(q) / math.log(k)

    t_top = _topk_ids(teacher_rank_value, k)
    union = sorted(set(s_top) | set(t_top))
    pt_u = _normalise([teacher_known.get(v, 0.0) for v in union])
    ps_u = _normalise([p_s[v] for v in union])
    ta_fkl = 0.0
    for a, b in zip(pt_u, ps_u):
        if a > 0.0:
            ta_fkl += a * (math.log(a) - math.log(b))
    out["ta_fkl"] = ta_fkl
    return out


# ----------------------------------------------------------------------- batches


def ref_batch_stats(student_logits, response_ids, t_ids, t_lp, t_samp, mask, ta_k=16):
    """Dict name -> [B, T] float64 array; zeros at masked positions."""
    student_logits = np.asarray(student_logits, dtype=np.float64)
    response_ids = np.asarray(response_ids)
    t_ids = np.asarray(t_ids)
    t_lp = np.asarray(t_lp, dtype=np.float64)
    t_samp = np.asarray(t_samp, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    B, T, _ = student_logits.shape
    out = {name: np.zeros((B, T), dtype=np.float64) for name in STAT_NAMES}
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            d = ref_position_stats(
                student_logits[b, t],
                int(response_ids[b, t]),
                t_ids[b, t],
                t_lp[b, t],
                float(t_samp[b, t]),
                ta_k=ta_k,
            )
            for name in STAT_NAMES:
                out[name][b, t] = d[name]
    return out


# --------------------------------------------------------------------- selection


def ref_minmax(x):
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    lo = float(x.min())
    hi = float(x.max())
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _clip_entropy(h_norm_valid, q):
    h = np.asarray(h_norm_valid, dtype=np.float64)
    cap = float(np.quantile(h, q))  # numpy default: linear interpolation
    return np.minimum(h, cap)


def ref_soft_or_scores(h_norm_valid, rkl_valid, q=0.98):
    a = ref_minmax(_clip_entropy(h_norm_valid, q))
    b = ref_minmax(rkl_valid)
    return a + b - a * b


def ref_overconfident_scores(h_norm_valid, fkl_valid, q=0.98):
    a = ref_minmax(_clip_entropy(h_norm_valid, q))
    return np.asarray(fkl_valid, dtype=np.float64) * (1.0 - a)


def ref_topb(scores, B, bottom=False):
    """bool[m]: the B largest (smallest if bottom) scores, ties to the earlier index."""
    scores = [float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1)]
    m = len(scores)
    sign = 1.0 if bottom else -1.0
    order = sorted(range(m), key=lambda i: (sign * scores[i], i))
    keep = np.zeros(m, dtype=bool)
    for i in order[: max(0, min(int(B), m))]:
        keep[i] = True
    return keep


def ref_budget(rho, m):
    return int(math.ceil(rho * m))


def ref_select(stats, rule, rho, mask, q=0.98):
    """Reference selection over the whole batch (scope = all valid tokens, row-major).

    ``stats`` maps names to [B, T] arrays (numpy or anything np.asarray accepts).
    """
    mask = np.asarray(mask, dtype=bool)
    flat_mask = mask.reshape(-1)
    idx = np.nonzero(flat_mask)[0]  # row-major order of valid positions
    m = len(idx)
    keep = np.zeros(flat_mask.shape, dtype=bool)
    if m == 0:
        return keep.reshape(mask.shape)

    def valid(name):
        return np.asarray(stats[name], dtype=np.float64).reshape(-1)[idx]

    if rule == "entropy_topk":
        scores = valid("entropy_norm")
    elif rule == "soft_or":
        scores = ref_soft_or_scores(valid("entropy_norm"), valid("rkl"), q)
    elif rule == "overconfident":
        scores = ref_overconfident_scores(valid("entropy_norm"), valid("fkl"), q)
    else:
        raise ValueError(rule)
    sel = ref_topb(scores, ref_budget(rho, m))
    keep[idx[sel]] = True
    return keep.reshape(mask.shape)
