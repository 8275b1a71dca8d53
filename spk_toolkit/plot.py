"""DET curves and score histograms as PNG files (matplotlib, Agg backend, imported lazily).

The DET axes are fitted to the data: both axes span the error rates the curves actually reach (down to one
error in the trial list, up to where the curves leave the plot), on normal-deviate (probit) scales with ticks at
round percentages, so a strong model's curve is not squeezed into a corner and a weak model's is not clipped.
The legend sits outside the axes (below), so it never hides the curve or the EER marker. The axis limits (in %)
and the EER points are also written into the PNG's text chunks (``xlim_pct``, ``ylim_pct``, ``Description``).

References
----------
.. [1] A. Martin et al., "The DET curve in assessment of detection task performance", Eurospeech 1997.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np

__all__ = ["plot_det", "plot_score_histogram", "det_limits", "probit_ticks", "plotting_unavailable"]

#: candidate tick positions in %, by priority: powers of ten and 50 first, then the 5s, then the 2s
_TICK_LEVELS = (
    (0.001, 0.01, 0.1, 1, 10, 50, 90, 99, 99.9, 99.99, 99.999),
    (0.005, 0.05, 0.5, 5, 20, 40, 60, 80, 95, 99.5, 99.95, 99.995),
    (0.002, 0.02, 0.2, 2, 30, 70, 98, 99.8, 99.98, 99.998),
)

def plotting_unavailable() -> Optional[str]:
    """None when matplotlib can be imported, else a one-line reason with the install hint."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib is not installed (pip install matplotlib): {e}"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def det_limits(curves: Mapping[str, Tuple[np.ndarray, np.ndarray, float]], margin: float = 0.15
               ) -> Tuple[float, float]:
    """Axis range (fractions, the same for both axes) that shows every curve whole and every EER point.

    The lower end is the smallest non-zero error rate of any curve (one miss or one false alarm in the list:
    rates of zero lie at minus infinity on a probit axis); the upper end the largest rate below 1 that a curve
    reaches while the other rate is still non-zero. Both are widened by ``margin`` in probit units and clipped to
    [1e-5, 1 - 1e-5].

    Parameters
    ----------
    curves : mapping label -> (p_miss, p_fa, eer)
        As for :func:`plot_det`.
    margin : float, default=0.15
        Padding on each side, in standard deviations.

    Returns
    -------
    (lo, hi) : (float, float)
        Fractions with ``0 < lo < hi < 1``.
    """
    from scipy.special import ndtr, ndtri

    lows, highs = [], []
    for p_miss, p_fa, e in curves.values():
        pm, pf = np.asarray(p_miss, float), np.asarray(p_fa, float)
        inside = (pm > 0) & (pf > 0) & (pm < 1) & (pf < 1)
        for r in (pm, pf):
            nz = r[(r > 0) & (r < 1)]
            if nz.size:
                lows.append(nz.min())
        if inside.any():
            highs.append(max(pm[inside].max(), pf[inside].max()))
        if 0 < e < 1:
            lows.append(e)
            highs.append(e)
    lo = min(lows) if lows else 1e-3
    hi = max(highs) if highs else 0.5
    hi = max(hi, lo * 10)
    a, b = ndtri(np.clip([lo, hi], 1e-5, 1 - 1e-5))
    a, b = a - margin, b + margin
    return float(max(ndtr(a), 1e-5)), float(min(ndtr(b), 1 - 1e-5))


def probit_ticks(lo: float, hi: float, max_ticks: int = 10) -> list:
    """Round-percentage ticks inside ``[lo, hi]`` (fractions), spread evenly on the probit scale.

    Candidates come in priority order (powers of ten and 50 %, then 5 / 20 / 40 / 60 / 80 / 95 %, then the 2s);
    a candidate is kept when it is at least a tenth of the axis (in probit units) away from every kept tick.

    Returns
    -------
    list of float
        Tick positions in %, increasing.
    """
    from scipy.special import ndtri

    zlo, zhi = float(ndtri(lo)), float(ndtri(hi))
    gap = (zhi - zlo) / max_ticks
    kept: list = []
    for level in _TICK_LEVELS:
        for t in level:
            if not lo * 100 <= t <= hi * 100:
                continue
            z = float(ndtri(t / 100))
            if all(abs(z - float(ndtri(k / 100))) >= gap for k in kept):
                kept.append(t)
    return sorted(kept)


def _det_figure(curves, *, title: str, limits_pct=None):
    """Build the DET figure (kept open for the caller to inspect and save): returns ``(fig, ax, (lo, hi))``."""
    from scipy.special import ndtri

    plt = _pyplot()
    if limits_pct is None:
        lo, hi = det_limits(curves)
    else:
        lo, hi = limits_pct[0] / 100, limits_pct[1] / 100
    n = len(curves)
    fig, ax = plt.subplots(figsize=(5.6, 5.6 + 0.25 * (n + 1)), dpi=110)
    floor = ndtri(lo) - 1.0  # zero rates are drawn just off the axes (the curve runs to the frame)
    for i, (label, (p_miss, p_fa, e)) in enumerate(curves.items()):
        pf, pm = np.asarray(p_fa, float), np.asarray(p_miss, float)
        x = np.where(pf > 0, ndtri(np.clip(pf, 1e-300, 1 - 1e-16)), floor)
        y = np.where(pm > 0, ndtri(np.clip(pm, 1e-300, 1 - 1e-16)), floor)
        (line,) = ax.plot(x, y, lw=1.6, label=f"{label}: EER {100 * e:.2f}%")
        q = ndtri(min(max(e, 1e-12), 1 - 1e-12))
        ax.plot([q], [q], "o", color=line.get_color(), ms=8, mfc="white", mew=2, zorder=5)
        ax.annotate(f"EER {100 * e:.2f}%", (q, q), xytext=(10, -14 - 12 * i) if i % 2 else (10, 6 + 12 * i), textcoords="offset points", fontsize=8,
                    color=line.get_color(), bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
    d = ndtri(np.array([lo, hi]))
    ax.plot(d, d, ":", color="grey", lw=0.8, label="P_miss = P_fa")
    ticks = probit_ticks(lo, hi)
    tk = ndtri(np.array(ticks) / 100)
    labels = [f"{t:g}" for t in ticks]
    ax.set_xticks(tk, labels)
    ax.set_yticks(tk, labels)
    ax.set_xlim(d[0], d[1])
    ax.set_ylim(d[0], d[1])
    ax.set_aspect("equal")
    ax.set_xlabel("False alarm probability (%)")
    ax.set_ylabel("Miss probability (%)")
    ax.set_title(title)
    ax.grid(True, ls="--", lw=0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False, ncol=1)
    fig.tight_layout()
    return fig, ax, (lo, hi)


def plot_det(
    curves: Mapping[str, Tuple[np.ndarray, np.ndarray, float]],
    path: str,
    *,
    title: str = "DET curve",
    limits_pct: Optional[Tuple[float, float]] = None,
) -> str:
    """Draw DET curves on normal-deviate (probit) axes fitted to the data and mark each EER point [1]_.

    Parameters
    ----------
    curves : mapping label -> (p_miss, p_fa, eer)
        ``p_miss``, ``p_fa`` of shape (n_points,) as fractions (from :func:`spk_toolkit.metrics.det_curve`);
        ``eer`` a fraction, drawn as a marker on the diagonal and labelled.
    path : str
        Output PNG path.
    title : str
    limits_pct : (float, float), optional
        Axis range in % (both axes); default: fitted to the curves (:func:`det_limits`).

    Returns
    -------
    path : str
        The PNG; its text chunks hold ``xlim_pct`` / ``ylim_pct`` (``"lo,hi"`` in %) and the EER points.
    """
    plt = _pyplot()
    fig, ax, (lo, hi) = _det_figure(curves, title=title, limits_pct=limits_pct)
    try:
        eers = "; ".join(f"{k}={100 * v[2]:.4f}%" for k, v in curves.items())
        lim = f"{100 * lo:.6g},{100 * hi:.6g}"
        fig.savefig(path, format="png", metadata={
            "Title": title, "Description": f"DET curve, probit (normal deviate) axes; EER points: {eers}",
            "xlim_pct": lim, "ylim_pct": lim})
    finally:
        plt.close(fig)
    return path


def histogram_edges(scores: np.ndarray, labels: Optional[np.ndarray] = None, max_bins: int = 80,
                    min_bins: int = 10) -> np.ndarray:
    """Bin edges chosen from the data, on one grid for both classes.

    The bin width is numpy's ``"auto"`` width (the smaller of the Sturges and Freedman-Diaconis widths) of the
    class that needs the widest bins (usually the smaller class, the targets), so neither histogram is spiky; the
    number of bins over the whole range is kept between ``min_bins`` and ``max_bins``.

    Parameters
    ----------
    scores : ndarray of shape (n,), finite
    labels : ndarray of shape (n,) with 1/0, optional
    max_bins, min_bins : int

    Returns
    -------
    ndarray of shape (n_bins + 1,)
    """
    scores = np.asarray(scores, float)
    if scores.size == 0:
        return np.linspace(0.0, 1.0, min_bins + 1)
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        return np.linspace(lo - 0.5, hi + 0.5, min_bins + 1)
    groups = [scores] if labels is None else [scores[np.asarray(labels).astype(bool) == c] for c in (True, False)]
    widths = []
    for g in groups:
        if g.size > 1 and g.max() > g.min():
            e = np.histogram_bin_edges(g, bins="auto")
            widths.append(float(e[1] - e[0]))
    n = int(round((hi - lo) / max(widths))) if widths else min_bins
    return np.linspace(lo, hi, int(np.clip(n, min_bins, max_bins)) + 1)


def plot_score_histogram(
    scores: np.ndarray,
    labels: Optional[np.ndarray],
    path: str,
    *,
    title: str = "Score distribution",
    bins: Optional[int] = None,
    thresholds: Optional[Mapping[str, float]] = None,
) -> str:
    """Histogram of target and nontarget scores (or of all scores when ``labels`` is None).

    Parameters
    ----------
    scores : ndarray of shape (n_trials,)
    labels : ndarray of shape (n_trials,) with 1/0, or None
    path : str
        Output PNG path.
    bins : int, optional
        Number of bins; default: chosen from the data (:func:`histogram_edges`, per class on a common grid).
    thresholds : mapping name -> score, optional
        Vertical lines (the EER and minDCF thresholds), each with its own line style and named with its value in
        the legend, so labels never overlap however close the thresholds are.

    Returns
    -------
    path : str
    """
    plt = _pyplot()
    scores = np.asarray(scores, dtype=float)
    ok = np.isfinite(scores)
    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=110)
    try:
        edges = (np.histogram_bin_edges(scores[ok], bins=bins) if bins
                 else histogram_edges(scores[ok], None if labels is None else np.asarray(labels)[ok]))
        if labels is None:
            ax.hist(scores[ok], bins=edges, color="tab:grey", alpha=0.8, density=True, label=f"all ({int(ok.sum())})")
        else:
            lab = np.asarray(labels).astype(bool)
            ax.hist(scores[ok & ~lab], bins=edges, alpha=0.55, density=True, color="tab:blue",
                    label=f"nontarget ({int((ok & ~lab).sum())})")
            ax.hist(scores[ok & lab], bins=edges, alpha=0.55, density=True, color="tab:orange",
                    label=f"target ({int((ok & lab).sum())})")
        styles = [("k", "--"), ("tab:red", ":"), ("tab:green", "-."), ("tab:purple", (0, (5, 2, 1, 2)))]
        for i, (name, t) in enumerate((thresholds or {}).items()):
            if t is not None and np.isfinite(t):
                color, ls = styles[i % len(styles)]
                ax.axvline(t, ls=ls, lw=1.3, color=color, label=f"{name} threshold {t:.3f}")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
