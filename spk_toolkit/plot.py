"""DET curves and score histograms as PNG files (matplotlib, Agg backend, imported lazily).

References
----------
.. [1] A. Martin et al., "The DET curve in assessment of detection task performance", Eurospeech 1997.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["plot_det", "plot_score_histogram"]

_TICKS = [0.001, 0.01, 0.05, 0.2, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 95, 99]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_det(
    curves: Mapping[str, Tuple[np.ndarray, np.ndarray, float]],
    path: str,
    *,
    title: str = "DET curve",
    limits_pct: Tuple[float, float] = (0.01, 60.0),
) -> str:
    """Draw DET curves on normal-deviate (probit) axes and mark each EER point (Martin et al. 1997 [1]).

    Parameters
    ----------
    curves : mapping label -> (p_miss, p_fa, eer)
        ``p_miss``, ``p_fa`` of shape (n_points,) as fractions (from :func:`spk_toolkit.metrics.det_curve`);
        ``eer`` a fraction, drawn as a marker on the diagonal.
    path : str
        Output PNG path.
    title : str
    limits_pct : (float, float), default=(0.01, 60)
        Axis range in %.

    Returns
    -------
    path : str
    """
    from scipy.special import ndtri

    plt = _pyplot()
    lo, hi = limits_pct[0] / 100, limits_pct[1] / 100
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    try:
        for label, (p_miss, p_fa, e) in curves.items():
            x = ndtri(np.clip(np.asarray(p_fa, dtype=float), lo / 10, 1 - 1e-12))
            y = ndtri(np.clip(np.asarray(p_miss, dtype=float), lo / 10, 1 - 1e-12))
            (line,) = ax.plot(x, y, lw=1.5, label=f"{label} (EER {100 * e:.2f}%)")
            q = ndtri(min(max(e, lo), hi))
            ax.plot([q], [q], "o", color=line.get_color(), ms=7, mfc="none", mew=2)
        d = ndtri(np.array([lo, hi]))
        ax.plot(d, d, ":", color="grey", lw=0.8, label="P_miss = P_fa")
        ticks = [t for t in _TICKS if lo * 100 <= t <= hi * 100]
        tk = ndtri(np.array(ticks) / 100)
        labels = [f"{t:g}" for t in ticks]
        ax.set_xticks(tk, labels)
        ax.set_yticks(tk, labels)
        ax.set_xlim(ndtri(lo), ndtri(hi))
        ax.set_ylim(ndtri(lo), ndtri(hi))
        ax.set_xlabel("False alarm probability (%)")
        ax.set_ylabel("Miss probability (%)")
        ax.set_title(title)
        ax.grid(True, ls="--", lw=0.5)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        eers = "; ".join(f"{k}={100 * v[2]:.4f}%" for k, v in curves.items())
        fig.savefig(
            path,
            format="png",
            metadata={"Title": title, "Description": f"DET curve, probit (normal deviate) axes; EER points: {eers}"},
        )
    finally:
        plt.close(fig)
    return path


def plot_score_histogram(
    scores: np.ndarray,
    labels: Optional[np.ndarray],
    path: str,
    *,
    title: str = "Score distribution",
    bins: int = 100,
    thresholds: Optional[Mapping[str, float]] = None,
) -> str:
    """Histogram of target and nontarget scores (or of all scores when ``labels`` is None).

    Parameters
    ----------
    scores : ndarray of shape (n_trials,)
    labels : ndarray of shape (n_trials,) with 1/0, or None
    path : str
        Output PNG path.
    bins : int, default=100
    thresholds : mapping name -> score, optional
        Vertical lines (e.g. the minDCF thresholds).

    Returns
    -------
    path : str
    """
    plt = _pyplot()
    scores = np.asarray(scores, dtype=float)
    ok = np.isfinite(scores)
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    try:
        edges = np.histogram_bin_edges(scores[ok], bins=bins)
        if labels is None:
            ax.hist(scores[ok], bins=edges, color="tab:grey", alpha=0.8, density=True, label="all")
        else:
            lab = np.asarray(labels).astype(bool)
            ax.hist(scores[ok & ~lab], bins=edges, alpha=0.6, density=True, label=f"nontarget ({int((ok & ~lab).sum())})")
            ax.hist(scores[ok & lab], bins=edges, alpha=0.6, density=True, label=f"target ({int((ok & lab).sum())})")
        for i, (name, t) in enumerate((thresholds or {}).items()):
            if np.isfinite(t):
                ax.axvline(t, ls="--", lw=1, color="k")
                ax.text(t, ax.get_ylim()[1] * (0.95 - 0.07 * i), f" {name}", fontsize=7, va="top")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
