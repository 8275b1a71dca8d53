"""Metrics against brute-force implementations of their definitions (REFERENCE.md) and against ESPnet."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spk_toolkit import metrics as M

TOL = 1e-12


# ------------------------------------------------------------------------------------------------
# brute-force oracles, written from the definitions (O(N * thresholds), Python loops)
# ------------------------------------------------------------------------------------------------
def bf_points(scores, labels):
    """[(t, P_miss(t), P_fa(t))] for t = +inf then every distinct score, decreasing."""
    tar = [s for s, l in zip(scores, labels) if l]
    non = [s for s, l in zip(scores, labels) if not l]
    pts = []
    for t in [math.inf] + sorted(set(scores), reverse=True):
        pm = sum(1 for s in tar if s < t) / len(tar)
        pf = sum(1 for s in non if s >= t) / len(non)
        pts.append((t, pm, pf))
    return pts


def bf_eer(scores, labels):
    pts = bf_points(scores, labels)
    for i, (_, pm, pf) in enumerate(pts):
        if pm - pf == 0:
            return pm
        if pm - pf < 0:
            _, pm0, pf0 = pts[i - 1]
            # the line P_miss(a) - P_fa(a) between the two points, solved for zero
            a = (pm0 - pf0) / ((pm0 - pf0) - (pm - pf))
            return pm0 + a * (pm - pm0)
    raise AssertionError("no sign change")


def bf_min_dcf(scores, labels, p, c_miss=1.0, c_fa=1.0):
    best = min(c_miss * p * pm + c_fa * (1 - p) * pf for _, pm, pf in bf_points(scores, labels))
    return best / min(c_miss * p, c_fa * (1 - p))


def bf_act_dcf(scores, labels, p, c_miss=1.0, c_fa=1.0):
    th = math.log(c_fa * (1 - p) / (c_miss * p))
    tar = [s for s, l in zip(scores, labels) if l]
    non = [s for s, l in zip(scores, labels) if not l]
    pm = sum(1 for s in tar if s < th) / len(tar)
    pf = sum(1 for s in non if s >= th) / len(non)
    return (c_miss * p * pm + c_fa * (1 - p) * pf) / min(c_miss * p, c_fa * (1 - p))


def bf_cllr(scores, labels):
    tar = [s for s, l in zip(scores, labels) if l]
    non = [s for s, l in zip(scores, labels) if not l]
    ct = sum(math.log2(1 + math.exp(-s)) for s in tar) / len(tar)
    cn = sum(math.log2(1 + math.exp(s)) for s in non) / len(non)
    return 0.5 * (ct + cn)


def bf_min_cllr(scores, labels):
    # PAV on tie groups in increasing score order: blocks of [n_target, n_total], merged while decreasing
    groups = {}
    for s, l in zip(scores, labels):
        g = groups.setdefault(s, [0, 0])
        g[0] += int(bool(l))
        g[1] += 1
    blocks = []
    for s in sorted(groups):
        blocks.append(list(groups[s]))
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            t, n = blocks.pop()
            blocks[-1][0] += t
            blocks[-1][1] += n
    n_tar = sum(1 for l in labels if l)
    n_non = len(labels) - n_tar
    ct = cn = 0.0
    for t, n in blocks:
        p = t / n
        # Cllr contributions of the calibrated LLR log(p/(1-p)) - log(n_tar/n_non)
        if t:
            ct += t * math.log2(1 + (1 - p) / p * n_tar / n_non)
        if n - t:
            cn += (n - t) * math.log2(1 + p / (1 - p) * n_non / n_tar)
    return 0.5 * (ct / n_tar + cn / n_non)


def bf_rocch_eer(scores, labels):
    # lower convex hull (Andrew's monotone chain) of the ROC points in the (P_fa, P_miss) plane,
    # then the crossing of the hull with P_miss = P_fa
    pts = sorted({(pf, pm) for _, pm, pf in bf_points(scores, labels)})
    hull = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    for (x0, y0), (x1, y1) in zip(hull[:-1], hull[1:]):
        d0, d1 = y0 - x0, y1 - x1
        if d0 == 0:
            return x0
        if d0 > 0 and d1 <= 0:
            a = d0 / (d0 - d1)
            return x0 + a * (x1 - x0)
    return hull[-1][0]


# ------------------------------------------------------------------------------------------------
# random score sets with ties and unbalanced classes
# ------------------------------------------------------------------------------------------------
@st.composite
def trial_sets(draw, max_size=60):
    n = draw(st.integers(2, max_size))
    # a small score alphabet forces many ties; a wide one gives none
    levels = draw(st.sampled_from([3, 8, 30, 10_000]))
    scores = draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))
    scale = draw(st.sampled_from([0.25, 1.0 / 7, 0.01]))
    shift = draw(st.sampled_from([-3.0, 0.0, 1.0]))
    p_tar = draw(st.sampled_from([0.05, 0.3, 0.5, 0.9]))
    labels = draw(st.lists(st.booleans().map(lambda b: b), min_size=n, max_size=n))
    # unbalance: flip labels towards the drawn target ratio
    u = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    labels = [ui < p_tar for ui in u]
    if all(labels) or not any(labels):
        labels[0] = not labels[0]
    if all(labels) or not any(labels):
        labels[1] = not labels[0]
    # target scores shifted up a little so the sets are not pure noise
    s = [shift + scale * (v + (levels // 4 if l else 0)) for v, l in zip(scores, labels)]
    return np.array(s, dtype=np.float64), np.array(labels, dtype=int)


@settings(max_examples=100, deadline=None)
@given(trial_sets())
def test_eer_interp_equals_definition(ts):
    s, l = ts
    assert abs(M.eer(s, l) - bf_eer(s.tolist(), l.tolist())) < TOL


@settings(max_examples=100, deadline=None)
@given(trial_sets())
def test_eer_rocch_equals_hull_definition(ts):
    s, l = ts
    r = M.eer(s, l, method="rocch")
    assert abs(r - bf_rocch_eer(s.tolist(), l.tolist())) < TOL
    assert r <= M.eer(s, l) + TOL


@settings(max_examples=100, deadline=None)
@given(trial_sets(), st.sampled_from([0.001, 0.01, 0.05, 0.3, 0.5, 0.8]),
       st.sampled_from([(1.0, 1.0), (10.0, 1.0), (1.0, 3.0)]))
def test_min_dcf_equals_definition(ts, p, costs):
    s, l = ts
    got = M.min_dcf(s, l, p, c_miss=costs[0], c_fa=costs[1])
    assert abs(got - bf_min_dcf(s.tolist(), l.tolist(), p, *costs)) < TOL


@settings(max_examples=100, deadline=None)
@given(trial_sets())
def test_min_dcf_several_p_targets_at_once(ts):
    s, l = ts
    got = M.min_dcf(s, l, [0.01, 0.05, 0.5])
    assert got.shape == (3,)
    for g, p in zip(got, [0.01, 0.05, 0.5]):
        assert abs(g - bf_min_dcf(s.tolist(), l.tolist(), p)) < TOL


@settings(max_examples=100, deadline=None)
@given(trial_sets(), st.sampled_from([0.01, 0.05, 0.5, 0.7]))
def test_act_dcf_equals_definition(ts, p):
    s, l = ts
    assert abs(M.act_dcf(s, l, p) - bf_act_dcf(s.tolist(), l.tolist(), p)) < TOL
    assert M.act_dcf(s, l, p) >= M.min_dcf(s, l, p) - TOL


@settings(max_examples=100, deadline=None)
@given(trial_sets())
def test_cllr_and_min_cllr_equal_definition(ts):
    s, l = ts
    s = s * (8.0 / max(1.0, np.abs(s).max()))  # keep the oracle's math.exp in range (LLRs within +-8)
    assert abs(M.cllr(s, l) - bf_cllr(s.tolist(), l.tolist())) < TOL
    mc = M.min_cllr(s, l)
    assert abs(mc - bf_min_cllr(s.tolist(), l.tolist())) < TOL
    assert mc <= M.cllr(s, l) + TOL


@settings(max_examples=100, deadline=None)
@given(trial_sets())
def test_det_curve_equals_definition(ts):
    s, l = ts
    pm, pf, th = M.det_curve(s, l)
    ref = bf_points(s.tolist(), l.tolist())
    assert len(ref) == pm.size == pf.size == th.size
    for (t, rpm, rpf), a, b, c in zip(ref, pm, pf, th):
        assert t == c and abs(a - rpm) < TOL and abs(b - rpf) < TOL
    assert np.all(np.diff(th) < 0) and np.all(np.diff(pm) <= 0) and np.all(np.diff(pf) >= 0)


# ------------------------------------------------------------------------------------------------
# against ESPnet (espnet2.utils.eer): EER there is in %, minDCF is normalised like ours
# ------------------------------------------------------------------------------------------------
def _random_sets(n_sets, ties):
    rng = np.random.default_rng(1234 + ties)
    for _ in range(n_sets):
        n = int(rng.integers(20, 400))
        p = rng.choice([0.02, 0.1, 0.5, 0.8])
        lab = (rng.random(n) < p).astype(int)
        lab[0], lab[1] = 1, 0
        s = rng.standard_normal(n) + 2.0 * rng.random() * lab
        if ties:
            s = np.round(s * 4) / 4
        yield s, lab


NO_ESPNET = ("OPTIONAL DEPENDENCY MISSING: espnet is not installed (not in install_requires; `make setup` installs "
             "espnet==202611 --no-deps), so the cross-check against ESPnet's own metric code did NOT run")


@pytest.mark.parametrize("ties", [False, True])
def test_eer_espnet_method_equals_tuneThresholdfromScore(ties):
    eer_mod = pytest.importorskip("espnet2.utils.eer", reason=NO_ESPNET)
    for s, lab in _random_sets(100, ties):
        ref_pct = eer_mod.tuneThresholdfromScore(s.tolist(), lab.tolist(), [1, 0.1])[1]
        assert abs(100 * M.eer(s, lab, method="espnet") - ref_pct) < 1e-10  # % units: 100 x 1e-12
        assert abs(M.eer(s, lab, method="espnet") - ref_pct / 100) < TOL


def test_min_dcf_equals_espnet_ComputeMinDcf():
    eer_mod = pytest.importorskip("espnet2.utils.eer", reason=NO_ESPNET)
    # continuous scores: ESPnet's ComputeErrorRates evaluates one point per trial, so with tied scores it
    # also evaluates splits inside a tie group that no threshold can reach (documented in docs/metrics.md)
    for s, lab in _random_sets(100, ties=False):
        fnrs, fprs, thr = eer_mod.ComputeErrorRates(s.tolist(), lab.tolist())
        for p in (0.05, 0.01):
            ref = eer_mod.ComputeMinDcf(fnrs, fprs, thr, p, 1, 1)[0]
            assert abs(M.min_dcf(s, lab, p) - ref) < TOL


# ------------------------------------------------------------------------------------------------
# invariance battery
# ------------------------------------------------------------------------------------------------
METRICS = {
    "eer": lambda s, l: M.eer(s, l),
    "eer_rocch": lambda s, l: M.eer(s, l, method="rocch"),
    "eer_espnet": lambda s, l: M.eer(s, l, method="espnet"),
    "min_dcf": lambda s, l: M.min_dcf(s, l, 0.05),
    "min_dcf_multi": lambda s, l: tuple(M.min_dcf(s, l, [0.01, 0.05])),
    "act_dcf": lambda s, l: M.act_dcf(s, l, 0.01),
    "cllr": M.cllr,
    "min_cllr": M.min_cllr,
}
RANK_ONLY = {"eer", "eer_rocch", "min_dcf", "min_dcf_multi", "min_cllr"}


def _data(seed=0, n=300):
    rng = np.random.default_rng(seed)
    lab = (rng.random(n) < 0.2).astype(int)
    s = np.round(rng.standard_normal(n) + 1.5 * lab, 2)
    return s, lab


def _close(a, b, tol=1e-12):
    return np.allclose(np.atleast_1d(a), np.atleast_1d(b), rtol=0, atol=tol)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_trial_order_invariance(name):
    s, l = _data()
    perm = np.random.default_rng(1).permutation(s.size)
    assert _close(METRICS[name](s, l), METRICS[name](s[perm], l[perm]))


@pytest.mark.parametrize("name", sorted(set(METRICS) - {"eer_espnet"}))
def test_duplication_invariance(name):
    # eer_espnet is excluded: sklearn's drop_intermediate keeps a different vertex set after duplication
    s, l = _data()
    assert _close(METRICS[name](s, l), METRICS[name](np.r_[s, s], np.r_[l, l]))


@pytest.mark.parametrize("name", sorted(RANK_ONLY))
def test_monotone_transform_invariance(name):
    s, l = _data()
    assert _close(METRICS[name](s, l), METRICS[name](np.exp(s / 3) * 2 - 1, l), tol=1e-12)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_string_and_bool_labels(name):
    s, l = _data()
    strs = np.where(l == 1, "target", "nontarget")
    assert _close(METRICS[name](s, l), METRICS[name](s, strs))
    assert _close(METRICS[name](s, l), METRICS[name](s, l.astype(bool)))
    if name in RANK_ONLY:  # float32 rounding keeps the order of these 2-decimal scores
        assert _close(METRICS[name](s, l), METRICS[name](s.astype(np.float32), l))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_errors(name):
    f = METRICS[name]
    s, l = _data()
    bad = s.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/inf"):
        f(bad, l)
    bad[3] = np.inf
    with pytest.raises(ValueError, match=r"NaN/inf"):
        f(bad, l)
    with pytest.raises(ValueError, match=r"both classes; got 0 target and 300 nontarget"):
        f(s, np.zeros_like(l))
    with pytest.raises(ValueError, match=r"differ in length: 300 vs 299"):
        f(s, l[:-1])
    with pytest.raises(ValueError, match=r"1-D"):
        f(s.reshape(30, 10), l.reshape(30, 10))
    with pytest.raises(ValueError, match=r"binary"):
        f(s, l * 2)
    with pytest.raises(ValueError, match=r"target'/'nontarget"):
        f(s, np.where(l == 1, "target", "impostr"))
    with pytest.raises(ValueError, match=r"empty"):
        f(np.array([]), np.array([]))


def test_option_errors():
    s, l = _data()
    with pytest.raises(ValueError, match="method must be one of"):
        M.eer(s, l, method="bosaris")
    with pytest.raises(ValueError, match=r"p_target must lie in the open interval"):
        M.min_dcf(s, l, 1.5)
    with pytest.raises(ValueError, match=r"c_fa must be a positive"):
        M.min_dcf(s, l, 0.01, c_fa=0)


def test_small_exact_cases():
    # hand-checkable: interleaved classes
    assert M.eer([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]) == 0.5
    assert M.eer([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 0.0
    assert M.eer([1.0, 1.0], [0, 1]) == 0.5  # all tied: the only crossing is at the midpoint
    assert M.min_dcf([1.0, 1.0], [0, 1], 0.01) == 1.0
    assert abs(M.cllr([0.0, 0.0], [0, 1]) - 1.0) < TOL


def test_compute_metrics_matches_individual_functions():
    s, l = _data(3, 2000)
    m = M.compute_metrics(s, l, with_cllr=True)
    assert m["eer"] == M.eer(s, l)
    assert m["min_dcf"] == {0.01: M.min_dcf(s, l, 0.01), 0.05: M.min_dcf(s, l, 0.05)}
    assert m["n_target"] == int(l.sum()) and m["n_nontarget"] == int((1 - l).sum())
    assert m["cllr"] == M.cllr(s, l) and m["min_cllr"] == M.min_cllr(s, l)
    for p, t in m["min_dcf_threshold"].items():
        # the returned threshold reaches the minimum: recompute C_det at it
        pm = np.mean(s[l == 1] < t)
        pf = np.mean(s[l == 0] >= t)
        assert abs((p * pm + (1 - p) * pf) / min(p, 1 - p) - m["min_dcf"][p]) < TOL


def test_float32_scores_keep_their_ties():
    # float32 input is not rounded differently from its float64 copy: same ties, same operating points
    rng = np.random.default_rng(5)
    s = rng.standard_normal(200_000).astype(np.float32)
    l = (rng.random(200_000) < 0.01).astype(int)
    s[l == 1] += 2
    m32 = M.eer(s, l)
    m64 = M.eer(s.astype(np.float64), l)
    assert m32 == m64


def exact_from_groups(groups, p_targets):
    """Exact (Fraction) P_miss/P_fa points, EER (interp definition) and minDCF from tie groups
    ``[(score, n_target, n_nontarget)]``: integer counts, no floating point."""
    from fractions import Fraction

    gs = sorted(groups, key=lambda g: -g[0])
    n_tar, n_non = sum(g[1] for g in gs), sum(g[2] for g in gs)
    pts, tp, fp = [(Fraction(1), Fraction(0))], 0, 0  # +inf: accept nothing
    for _, t, f in gs:
        tp, fp = tp + t, fp + f
        pts.append((Fraction(n_tar - tp, n_tar), Fraction(fp, n_non)))
    k = next(i for i, (pm, pf) in enumerate(pts) if pm - pf <= 0)
    (pm0, pf0), (pm1, pf1) = pts[k - 1], pts[k]
    if pm1 == pf1:
        e = pm1
    else:
        a = (pm0 - pf0) / ((pm0 - pf0) - (pm1 - pf1))
        e = pf0 + a * (pf1 - pf0)
    dcf = [min(p * pm + (1 - p) * pf for pm, pf in pts) / min(p, 1 - p) for p in map(Fraction, p_targets)]
    return pts, e, dcf


def test_counts_beyond_2_24_are_exact():
    """2**24 + 6007 trials: past 2**24 float32 cannot count (2**24 + 1 rounds to 2**24, so adding the 3000
    single targets below the big tied group leaves a float32 count stuck at 2**24); float64 stays exact."""
    import tracemalloc

    k1, k2 = 2000, 1000
    groups = [(1.0, 2**24, 0)]  # one tied group of 2**24 targets
    groups += [(0.75 - i / 2**14, 1, 0) for i in range(k1)]  # then 1 target per distinct score
    groups += [(0.25 - i / 2**14, 1, 2) for i in range(k2)]  # then 1 target + 2 nontargets per score
    groups += [(-0.5, 7, 1000)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(groups))  # unsorted input (group by group: cheap)
    sc = np.array([groups[i][0] for i in order], np.float32)  # all exactly representable
    nt = np.array([groups[i][1] for i in order])
    nn = np.array([groups[i][2] for i in order])
    tracemalloc.start()
    s = np.concatenate([np.repeat(sc, nn), np.repeat(sc, nt)])  # float32: 64 MiB
    l = np.concatenate([np.zeros(nn.sum(), np.int8), np.ones(nt.sum(), np.int8)])
    assert s.size == 2**24 + 6007 and int(l.sum()) == 2**24 + 3007
    p_targets = [0.01, 0.05, 0.5]
    pts, e_ref, dcf_ref = exact_from_groups(groups, p_targets)
    e = M.eer(s, l)
    dcf = M.min_dcf(s, l, p_targets)
    p_miss, p_fa, thr = M.det_curve(s, l)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1e9, f"peak {peak / 2**20:.0f} MiB"
    # every operating point is the exact fraction, correctly rounded (integer counts, one division)
    assert p_miss.tolist() == [float(pm) for pm, _ in pts] and p_fa.tolist() == [float(pf) for _, pf in pts]
    assert thr.size == len(groups) + 1
    # EER ~ 6.0006e-05 and minDCF ~ 6.0011e-05 (a float32 count gives ~1.79e-04 for both)
    assert math.isclose(e, float(e_ref), rel_tol=1e-12, abs_tol=0), (e, float(e_ref))
    for got, want in zip(dcf, dcf_ref):
        assert math.isclose(got, float(want), rel_tol=1e-12, abs_tol=0), (got, float(want))
    m = M.compute_metrics(s, l, p_targets)
    assert m["eer"] == e and [m["min_dcf"][p] for p in p_targets] == dcf.tolist()
    assert m["n_target"] == 2**24 + 3007 and m["n_nontarget"] == 3000
