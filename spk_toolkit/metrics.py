"""Speaker-verification metrics: EER, minDCF, actDCF, Cllr, minCllr, DET curve.

Naming contract
---------------
* Every public function takes ``scores`` of shape ``(n_trials,)`` (higher = more target-like) and
  ``labels`` of shape ``(n_trials,)`` (1/0, True/False or the strings ``"target"``/``"nontarget"``).
* Rates (EER, P_miss, P_fa) are **fractions in [0, 1]**; percentages appear only in CLI output and in
  ``metrics.json`` fields named ``*_pct``.
* ``*_curve`` functions return arrays; the other functions return floats (or one float per ``p_target``).
* The literature's names are kept: ``p_target``, ``c_miss``, ``c_fa``.

Definitions (see ``docs/metrics.md`` and REFERENCE.md): for a threshold t,
``P_miss(t) = #{target: s < t} / N_tar`` and ``P_fa(t) = #{nontarget: s >= t} / N_non``. Tied scores form a
single operating point. The operating points are those of every distinct score plus the "accept nothing"
point (t = +inf).

All the threshold-sweeping metrics (EER, minDCF, DET) share one private sorted core
(:func:`_operating_counts`): the scores are sorted once, ties are grouped with ``diff``, and the per-threshold
counts are accumulated exactly (int64 cumulative sums, converted to float64). Time O(N log N), memory O(N).

References
----------
.. [1] NIST, "NIST 2016 Speaker Recognition Evaluation Plan", 2016, eq. (2)-(4) (DCF).
.. [2] N. Brümmer and J. du Preez, "Application-independent evaluation of speaker detection",
       Computer Speech and Language 20(2-3), 2006 (Cllr, minCllr via PAV).
.. [3] A. Martin et al., "The DET curve in assessment of detection task performance", Eurospeech 1997.
.. [4] N. Brümmer and E. de Villiers, "The BOSARIS Toolkit", 2011 (ROC convex hull, ``rocch2eer``).
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np

__all__ = [
    "eer",
    "min_dcf",
    "act_dcf",
    "cllr",
    "min_cllr",
    "det_curve",
    "compute_metrics",
    "EER_METHODS",
]

EER_METHODS = ("interp", "rocch", "espnet")

_TARGET_STRINGS = {"target", "tgt", "1", "true"}
_NONTARGET_STRINGS = {"nontarget", "non-target", "imp", "impostor", "0", "false"}

PTargets = Union[float, Sequence[float]]


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _as_binary_labels(labels: np.ndarray) -> np.ndarray:
    """Convert labels of shape (n_trials,) to a boolean array (True = target)."""
    if labels.dtype == bool:
        return labels
    if labels.dtype.kind in "US" or labels.dtype == object:
        low = np.char.lower(labels.astype(str))
        is_tar = np.isin(low, list(_TARGET_STRINGS))
        is_non = np.isin(low, list(_NONTARGET_STRINGS))
        bad = ~(is_tar | is_non)
        if bad.any():
            examples = sorted(set(labels[bad].astype(str).tolist()))[:5]
            raise ValueError(
                f"labels must be 1/0 or 'target'/'nontarget'; {int(bad.sum())} of {labels.size} "
                f"labels are neither, e.g. {examples}"
            )
        return is_tar
    if labels.dtype.kind in "iuf":
        if labels.dtype.kind == "f" and not np.isfinite(labels).all():
            raise ValueError("labels contain NaN or inf")
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            examples = np.unique(labels[bad])[:5].tolist()
            raise ValueError(
                f"labels must be binary (0/1); {int(bad.sum())} of {labels.size} labels are not, "
                f"e.g. {examples}"
            )
        return labels == 1
    raise ValueError(f"labels have unsupported dtype {labels.dtype}; use 0/1, bool or 'target'/'nontarget'")


def _check_trials(scores, labels, *, need_both: bool = True):
    """Validate ``scores`` and ``labels`` (each of shape (n_trials,)).

    Returns
    -------
    scores : ndarray of shape (n_trials,)
        Floating point scores (dtype kept when already floating, else float64).
    is_target : ndarray of bool, shape (n_trials,)

    Raises
    ------
    ValueError
        Not 1-D, different lengths, empty, NaN/inf scores, non-binary labels, or only one class present.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D of shape (n_trials,), got shape {scores.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D of shape (n_trials,), got shape {labels.shape}")
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    if scores.size == 0:
        raise ValueError("scores and labels are empty (0 trials)")
    if scores.dtype.kind not in "f":
        if scores.dtype.kind not in "iub":
            raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
        scores = scores.astype(np.float64)
    finite = np.isfinite(scores)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"scores contain {bad.size} NaN/inf value(s) of {scores.size} "
            f"(first at index {bad[:5].tolist()})"
        )
    is_target = _as_binary_labels(labels)
    if need_both:
        n_tar = int(np.count_nonzero(is_target))
        n_non = is_target.size - n_tar
        if n_tar == 0 or n_non == 0:
            raise ValueError(
                f"labels must contain both classes; got {n_tar} target and {n_non} nontarget trials"
            )
    return scores, is_target


def _check_p_targets(p_target) -> tuple[np.ndarray, bool]:
    scalar = np.ndim(p_target) == 0
    p = np.atleast_1d(np.asarray(p_target, dtype=np.float64))
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p_target must be a float or a 1-D sequence of floats, got {p_target!r}")
    if not ((p > 0) & (p < 1)).all():
        raise ValueError(f"p_target must lie in the open interval (0, 1), got {p.tolist()}")
    return p, scalar


def _check_costs(c_miss: float, c_fa: float) -> None:
    if not (np.isfinite(c_miss) and c_miss > 0):
        raise ValueError(f"c_miss must be a positive finite number, got {c_miss!r}")
    if not (np.isfinite(c_fa) and c_fa > 0):
        raise ValueError(f"c_fa must be a positive finite number, got {c_fa!r}")


# --------------------------------------------------------------------------------------------------
# the sorted core
# --------------------------------------------------------------------------------------------------
def _operating_counts(scores: np.ndarray, is_target: np.ndarray):
    """Exact accept counts at every distinct score, thresholds decreasing.

    Sort once, group ties with ``diff``, and count each class per group. Instead of an argsort (slow for
    10 M floats) the scores are sorted by value (SIMD ``np.sort``) and the trials of the smaller class are
    located among the distinct values with ``searchsorted``; the other class's count per group is the group
    size minus that count. Both sorts are by value, so no argsort is needed.

    Returns
    -------
    tp : ndarray of float64, shape (n_thresholds,)
        Number of target trials with score >= thresholds[i].
    fp : ndarray of float64, shape (n_thresholds,)
        Number of nontarget trials with score >= thresholds[i].
    thresholds : ndarray of shape (n_thresholds,)
        Distinct scores in decreasing order. Accepting ``s >= thresholds[-1]`` accepts every trial.
    n_tar, n_non : int
    """
    n = scores.size
    n_tar = int(np.count_nonzero(is_target))
    n_non = n - n_tar
    srt = np.sort(scores)  # ascending
    # last index of each group of tied scores (ascending order)
    ends = np.flatnonzero(srt[1:] != srt[:-1])
    ends = np.append(ends, n - 1)
    distinct = srt[ends]
    del srt
    group_size = np.diff(ends, prepend=-1)
    del ends
    # count the smaller class per group (values are present in `distinct`, so searchsorted is exact)
    minority_is_target = n_tar <= n_non
    minority = scores[is_target] if minority_is_target else scores[~is_target]
    minority.sort()  # sorted queries make searchsorted cache-friendly (~8x faster at 1e7)
    per_group_min = np.bincount(np.searchsorted(distinct, minority), minlength=distinct.size)
    del minority
    per_group_maj = group_size - per_group_min
    tar_per_group, non_per_group = (
        (per_group_min, per_group_maj) if minority_is_target else (per_group_maj, per_group_min)
    )
    # descending thresholds: accept s >= t. The summands are integer counts, so float64 cumulative sums are
    # exact up to 2**53 trials (float32 would drift at 1e7+ trials, cf. scikit-learn issue #31533)
    tp = np.cumsum(tar_per_group[::-1], dtype=np.float64)
    fp = np.cumsum(non_per_group[::-1], dtype=np.float64)
    return tp, fp, distinct[::-1], n_tar, n_non


def _error_rates(scores: np.ndarray, is_target: np.ndarray):
    """(p_miss, p_fa, thresholds) over every operating point, thresholds decreasing.

    Element 0 is the "accept nothing" point (threshold +inf, P_miss = 1, P_fa = 0); element i > 0 accepts
    ``s >= thresholds[i]``; the last element accepts everything (P_miss = 0, P_fa = 1).
    """
    tp, fp, thr, n_tar, n_non = _operating_counts(scores, is_target)
    g = tp.size
    p_miss = np.empty(g + 1)
    p_miss[0] = 1.0
    np.subtract(n_tar, tp, out=p_miss[1:])
    p_miss[1:] /= n_tar
    p_fa = np.empty(g + 1)
    p_fa[0] = 0.0
    np.divide(fp, n_non, out=p_fa[1:])
    del tp, fp
    thresholds = np.empty(g + 1)
    thresholds[0] = np.inf
    thresholds[1:] = thr
    return p_miss, p_fa, thresholds


# --------------------------------------------------------------------------------------------------
# EER
# --------------------------------------------------------------------------------------------------
def _eer_interp(p_miss: np.ndarray, p_fa: np.ndarray) -> float:
    # P_fa - P_miss increases strictly from -1 (accept nothing) to 1 (accept all): binary search for the first
    # point k where P_miss - P_fa <= 0; k >= 1 because point 0 has P_miss - P_fa = 1
    k = int(np.searchsorted(p_fa - p_miss, 0.0, side="left"))
    d0 = p_miss[k - 1] - p_fa[k - 1]  # > 0
    d1 = p_miss[k] - p_fa[k]  # <= 0
    if d1 == 0:
        return float(p_miss[k])
    # linear interpolation between points k-1 and k, where P_miss - P_fa crosses zero
    alpha = d0 / (d0 - d1)
    return float(p_fa[k - 1] + alpha * (p_fa[k] - p_fa[k - 1]))


def _rocch_vertices(scores: np.ndarray, is_target: np.ndarray):
    """Vertices of the ROC convex hull as (p_miss, p_fa), p_fa increasing, via PAV (BOSARIS ``rocch``)."""
    tp, fp, _, n_tar, n_non = _operating_counts(scores, is_target)
    tar_g = np.diff(tp, prepend=0.0)
    non_g = np.diff(fp, prepend=0.0)
    blocks = _pav_blocks(tar_g, non_g)  # in decreasing-score order, decreasing target fraction
    tp_h = np.concatenate(([0.0], np.cumsum(blocks[0])))
    fp_h = np.concatenate(([0.0], np.cumsum(blocks[1])))
    return (n_tar - tp_h) / n_tar, fp_h / n_non


def _eer_rocch(scores, is_target) -> float:
    p_miss, p_fa = _rocch_vertices(scores, is_target)
    # BOSARIS rocch2eer: for each hull segment, the EER candidate is where the line through the segment meets
    # P_miss = P_fa; segments parallel to an axis give 0; the EER is the largest candidate.
    x0, x1 = p_fa[:-1], p_fa[1:]
    y0, y1 = p_miss[:-1], p_miss[1:]
    dx, dy = x0 - x1, y0 - y1
    ok = (dx != 0) & (dy != 0)
    # line a*x + b*y = 1 through (x0, y0), (x1, y1): solve the 2x2 system; candidate = 1 / (a + b)
    det = x0 * y1 - x1 * y0
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (y1 - y0) / det
        b = (x0 - x1) / det
        cand = np.where(ok, 1.0 / (a + b), 0.0)
        # det == 0: the segment's line passes through the origin, so it meets P_miss = P_fa at 0
        cand = np.where(ok & (det == 0), 0.0, cand)
    return float(max(0.0, cand.max(initial=0.0)))


def _eer_espnet(scores, is_target) -> float:
    # Reproduces espnet2.utils.eer.tuneThresholdfromScore: sklearn roc_curve(drop_intermediate=True), then
    # max(fpr, fnr) at the first argmin of |fnr - fpr| (returned here as a fraction, ESPnet returns %).
    tp, fp, _, _, _ = _operating_counts(scores, is_target)
    if tp.size > 2:
        keep = np.concatenate(([True], (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), [True]))
        tp, fp = tp[keep], fp[keep]
    tp = np.concatenate(([0.0], tp))
    fp = np.concatenate(([0.0], fp))
    fpr = fp / fp[-1]
    fnr = 1 - tp / tp[-1]
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return float(max(fpr[i], fnr[i]))


def eer(scores, labels, *, method: str = "interp") -> float:
    """Equal error rate, as a fraction in [0, 1].

    Parameters
    ----------
    scores : array-like of shape (n_trials,)
        Detection scores, higher = more target-like. Must be finite.
    labels : array-like of shape (n_trials,)
        1/0, True/False, or ``"target"``/``"nontarget"``. Both classes must be present.
    method : {"interp", "rocch", "espnet"}, default="interp"
        * ``"interp"``: linear interpolation between the two consecutive operating points where
          P_miss - P_fa changes sign (NIST SRE scoring tools, WeSpeaker, 3D-Speaker). Exact when a point
          has P_miss = P_fa.
        * ``"rocch"``: EER of the ROC convex hull (BOSARIS ``rocch2eer``) [4]; never larger than ``"interp"``.
        * ``"espnet"``: ``max(P_fa, P_miss)`` at the ROC vertex (scikit-learn ``roc_curve`` with
          ``drop_intermediate=True``) nearest to P_miss = P_fa, as ``espnet2.utils.eer.tuneThresholdfromScore``
          (which returns it in %).

    Returns
    -------
    eer : float
        Fraction in [0, 1] (multiply by 100 for %).

    Raises
    ------
    ValueError
        Shapes differ or are not 1-D, scores contain NaN/inf, labels are not binary, one class is missing,
        or ``method`` is unknown.

    Notes
    -----
    P_miss(t) = #{target: s < t}/N_tar, P_fa(t) = #{nontarget: s >= t}/N_non, tied scores grouped into one
    operating point. O(N log N) time, O(N) memory.

    Examples
    --------
    >>> eer([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    0.5
    >>> eer([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])
    0.0
    """
    if method not in EER_METHODS:
        raise ValueError(f"method must be one of {EER_METHODS}, got {method!r}")
    scores, is_target = _check_trials(scores, labels)
    if method == "espnet":
        return _eer_espnet(scores, is_target)
    if method == "rocch":
        return _eer_rocch(scores, is_target)
    p_miss, p_fa, _ = _error_rates(scores, is_target)
    return _eer_interp(p_miss, p_fa)


# --------------------------------------------------------------------------------------------------
# DCF
# --------------------------------------------------------------------------------------------------
def _min_dcf_from_rates(p_miss, p_fa, thresholds, p, c_miss, c_fa):
    out = np.empty(p.size)
    thr = np.empty(p.size)
    for j, pt in enumerate(p):
        c_det = c_miss * pt * p_miss + c_fa * (1 - pt) * p_fa
        i = int(np.argmin(c_det))
        out[j] = c_det[i] / min(c_miss * pt, c_fa * (1 - pt))
        thr[j] = thresholds[i]
    return out, thr


def min_dcf(
    scores,
    labels,
    p_target: PTargets = 0.01,
    *,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    return_threshold: bool = False,
):
    """Normalised minimum detection cost (NIST SRE 2016 eval plan eq. 2-4 [1]).

    C_det(t) = c_miss * p_target * P_miss(t) + c_fa * (1 - p_target) * P_fa(t), minimised over every
    operating point (each distinct score, plus "accept nothing"), divided by
    C_def = min(c_miss * p_target, c_fa * (1 - p_target)).

    Parameters
    ----------
    scores : array-like of shape (n_trials,)
    labels : array-like of shape (n_trials,)
        1/0, True/False or ``"target"``/``"nontarget"``; both classes present.
    p_target : float or sequence of float, default=0.01
        Prior probability of a target, in (0, 1). A sequence computes every value from one sort.
    c_miss, c_fa : float, default=1.0
        Costs of a miss and of a false alarm (> 0).
    return_threshold : bool, default=False
        Also return the threshold t (accept ``s >= t``) reaching the minimum.

    Returns
    -------
    min_dcf : float, or ndarray of shape (n_p_targets,) when ``p_target`` is a sequence
        Normalised cost; 1.0 means no better than the best trivial system.
    threshold : float or ndarray, only when ``return_threshold``
        ``+inf`` when rejecting every trial is optimal.

    Raises
    ------
    ValueError
        Invalid scores/labels (see :func:`eer`), p_target outside (0, 1), or non-positive costs.

    Examples
    --------
    >>> float(min_dcf([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 0.05))
    0.0
    """
    p, scalar = _check_p_targets(p_target)
    _check_costs(c_miss, c_fa)
    scores, is_target = _check_trials(scores, labels)
    p_miss, p_fa, thresholds = _error_rates(scores, is_target)
    out, thr = _min_dcf_from_rates(p_miss, p_fa, thresholds, p, c_miss, c_fa)
    if scalar:
        return (float(out[0]), float(thr[0])) if return_threshold else float(out[0])
    return (out, thr) if return_threshold else out


def act_dcf(scores, labels, p_target: PTargets = 0.01, *, c_miss: float = 1.0, c_fa: float = 1.0):
    """Normalised actual detection cost at the Bayes threshold (for calibrated LLR scores).

    The decision threshold is θ = log(c_fa * (1 - p_target) / (c_miss * p_target)); trials with
    ``s >= θ`` are accepted, and the cost is normalised as in :func:`min_dcf` (NIST SRE 2016 eq. 2-4 [1]).
    Meaningful only when scores are natural-log likelihood ratios; for raw cosine scores use
    :func:`min_dcf`. Always ``act_dcf >= min_dcf``.

    Parameters
    ----------
    scores : array-like of shape (n_trials,)
        Log-likelihood ratios (natural log).
    labels : array-like of shape (n_trials,)
    p_target : float or sequence of float, default=0.01
    c_miss, c_fa : float, default=1.0

    Returns
    -------
    act_dcf : float, or ndarray of shape (n_p_targets,)

    Raises
    ------
    ValueError
        As :func:`min_dcf`.
    """
    p, scalar = _check_p_targets(p_target)
    _check_costs(c_miss, c_fa)
    scores, is_target = _check_trials(scores, labels)
    tar = scores[is_target]
    non = scores[~is_target]
    tar.sort()
    non.sort()
    theta = np.log(c_fa * (1 - p) / (c_miss * p))
    p_miss = np.searchsorted(tar, theta, side="left") / tar.size  # #{tar: s < θ}
    p_fa = (non.size - np.searchsorted(non, theta, side="left")) / non.size  # #{non: s >= θ}
    out = (c_miss * p * p_miss + c_fa * (1 - p) * p_fa) / np.minimum(c_miss * p, c_fa * (1 - p))
    return float(out[0]) if scalar else out


# --------------------------------------------------------------------------------------------------
# Cllr
# --------------------------------------------------------------------------------------------------
_LN2 = np.log(2.0)


def cllr(scores, labels) -> float:
    """Log-likelihood-ratio cost in bits (Brümmer & du Preez 2006 [2]).

    Cllr = ½ [ mean_tar log2(1 + e^-s) + mean_non log2(1 + e^s) ], scores taken as natural-log LLRs.

    Parameters
    ----------
    scores : array-like of shape (n_trials,)
        Natural-log likelihood ratios.
    labels : array-like of shape (n_trials,)

    Returns
    -------
    cllr : float
        Bits; 1.0 for an uninformative system (all scores 0), 0 for a perfect calibrated one.

    Raises
    ------
    ValueError
        As :func:`eer`.
    """
    scores, is_target = _check_trials(scores, labels)
    s = scores.astype(np.float64, copy=False)
    c_tar = np.logaddexp(0.0, -s[is_target]).mean()
    c_non = np.logaddexp(0.0, s[~is_target]).mean()
    return float(0.5 * (c_tar + c_non) / _LN2)


def _pav_blocks(tar_g: np.ndarray, non_g: np.ndarray):
    """Pool adjacent violators on groups in decreasing-score order.

    Fits a non-increasing target fraction tar/(tar+non) over the groups and returns the pooled blocks as
    ``(tar_per_block, non_per_block)`` (each (n_blocks,), float64). Uses scipy's C PAV when available.
    """
    w = tar_g + non_g
    y = tar_g / w
    try:
        from scipy.optimize import isotonic_regression
    except ImportError:  # pragma: no cover - scipy < 1.12
        isotonic_regression = None
    if isotonic_regression is not None:
        res = isotonic_regression(y, weights=w, increasing=False)
        starts = np.asarray(res.blocks[:-1])
    else:  # pragma: no cover
        starts = _pav_starts_python(y, w)
    return np.add.reduceat(tar_g, starts), np.add.reduceat(non_g, starts)


def _pav_starts_python(y, w):  # pragma: no cover - fallback
    vals, wts, starts = [], [], []
    for i, (yi, wi) in enumerate(zip(y, w)):
        vals.append(yi)
        wts.append(wi)
        starts.append(i)
        while len(vals) > 1 and vals[-2] < vals[-1]:
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / (wts[-2] + wts[-1])
            wt = wts[-2] + wts[-1]
            vals[-2:] = [v]
            wts[-2:] = [wt]
            starts.pop()
    return np.asarray(starts)


def min_cllr(scores, labels) -> float:
    """Minimum Cllr: Cllr after optimal monotone calibration by PAV (Brümmer & du Preez 2006 [2]).

    The scores are sorted (ties grouped), the target posterior is fitted by pool-adjacent-violators
    (isotonic regression), converted to LLRs by removing the empirical prior log(N_tar/N_non), and Cllr of
    those LLRs is returned. Depends only on the ranking of the scores.

    Parameters
    ----------
    scores : array-like of shape (n_trials,)
    labels : array-like of shape (n_trials,)

    Returns
    -------
    min_cllr : float
        Bits, in [0, 1].

    Raises
    ------
    ValueError
        As :func:`eer`.
    """
    scores, is_target = _check_trials(scores, labels)
    tp, fp, _, n_tar, n_non = _operating_counts(scores, is_target)
    tar_b, non_b = _pav_blocks(np.diff(tp, prepend=0.0), np.diff(fp, prepend=0.0))
    # per block: posterior p = tar/(tar+non); LLR = logit(p) - log(n_tar/n_non)
    # target cost log(1 + e^-llr) = log(1 + non/tar * n_tar/n_non); nontarget: log(1 + tar/non * n_non/n_tar)
    with np.errstate(divide="ignore", invalid="ignore"):
        c_tar = np.where(tar_b > 0, tar_b * np.log1p((non_b / tar_b) * (n_tar / n_non)), 0.0)
        c_non = np.where(non_b > 0, non_b * np.log1p((tar_b / non_b) * (n_non / n_tar)), 0.0)
    return float(0.5 * (c_tar.sum() / n_tar + c_non.sum() / n_non) / _LN2)


# --------------------------------------------------------------------------------------------------
# DET
# --------------------------------------------------------------------------------------------------
def det_curve(scores, labels):
    """Detection error tradeoff curve (Martin et al. 1997 [3]).

    Parameters
    ----------
    scores : array-like of shape (n_trials,)
    labels : array-like of shape (n_trials,)

    Returns
    -------
    p_miss : ndarray of shape (n_thresholds + 1,)
        Miss rate when accepting ``s >= thresholds[i]``; non-increasing.
    p_fa : ndarray of shape (n_thresholds + 1,)
        False-alarm rate at ``thresholds[i]``; non-decreasing.
    thresholds : ndarray of shape (n_thresholds + 1,)
        ``+inf`` (accept nothing) followed by the distinct scores in decreasing order.

    Raises
    ------
    ValueError
        As :func:`eer`.

    Notes
    -----
    Plot on normal-deviate (probit) axes: ``scipy.special.ndtri(p)``; see :func:`spk_toolkit.plot.plot_det`.
    """
    scores, is_target = _check_trials(scores, labels)
    return _error_rates(scores, is_target)


# --------------------------------------------------------------------------------------------------
# convenience
# --------------------------------------------------------------------------------------------------
def compute_metrics(
    scores,
    labels,
    p_targets: Iterable[float] = (0.01, 0.05),
    *,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    eer_method: str = "interp",
    with_cllr: bool = False,
) -> dict:
    """EER and minDCF at several priors from one sort.

    Parameters
    ----------
    scores, labels : array-like of shape (n_trials,)
    p_targets : iterable of float, default=(0.01, 0.05)
    c_miss, c_fa : float, default=1.0
    eer_method : {"interp", "rocch", "espnet"}, default="interp"
    with_cllr : bool, default=False
        Also compute ``cllr``, ``min_cllr`` and ``act_dcf`` (for LLR-like scores).

    Returns
    -------
    metrics : dict
        ``{"eer": fraction, "min_dcf": {p_target: value}, "min_dcf_threshold": {p_target: t},
        "n_target": int, "n_nontarget": int}`` plus ``"cllr"``, ``"min_cllr"``, ``"act_dcf"`` when asked.

    Raises
    ------
    ValueError
        As :func:`eer` / :func:`min_dcf`.
    """
    if eer_method not in EER_METHODS:
        raise ValueError(f"eer_method must be one of {EER_METHODS}, got {eer_method!r}")
    p_list = [float(x) for x in p_targets]
    p, _ = _check_p_targets(p_list)
    _check_costs(c_miss, c_fa)
    scores, is_target = _check_trials(scores, labels)
    p_miss, p_fa, thresholds = _error_rates(scores, is_target)
    if eer_method == "interp":
        e = _eer_interp(p_miss, p_fa)
    elif eer_method == "rocch":
        e = _eer_rocch(scores, is_target)
    else:
        e = _eer_espnet(scores, is_target)
    dcf, thr = _min_dcf_from_rates(p_miss, p_fa, thresholds, p, c_miss, c_fa)
    n_tar = int(np.count_nonzero(is_target))
    out = {
        "eer": e,
        "min_dcf": {pt: float(v) for pt, v in zip(p_list, dcf)},
        "min_dcf_threshold": {pt: float(t) for pt, t in zip(p_list, thr)},
        "n_target": n_tar,
        "n_nontarget": int(is_target.size - n_tar),
    }
    if with_cllr:
        out["cllr"] = cllr(scores, is_target)
        out["min_cllr"] = min_cllr(scores, is_target)
        out["act_dcf"] = {pt: float(v) for pt, v in zip(p_list, act_dcf(scores, is_target, p_list))}
    return out
