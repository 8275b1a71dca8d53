"""Plots (issue 18, criterion 4): DET axes fitted to the data, legend outside, EER marked; histogram bins from the
data, thresholds labelled without overlap."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from scipy.special import ndtri  # noqa: E402

from spk_toolkit import metrics  # noqa: E402
from spk_toolkit.plot import _det_figure, det_limits, histogram_edges, plot_det, plot_score_histogram  # noqa: E402


def _weak_model(n_tar=500, n_non=5000, seed=0):
    """Scores of a weak system: EER about 40 % (targets shifted by 0.51 standard deviations)."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(0.507, 1, n_tar), rng.normal(0, 1, n_non)])
    labels = np.concatenate([np.ones(n_tar, int), np.zeros(n_non, int)])
    return scores, labels


def _curve(scores, labels):
    p_miss, p_fa, _ = metrics.det_curve(scores, labels)
    return p_miss, p_fa, metrics.eer(scores, labels)


def _png_limits(path):
    from PIL import Image

    with Image.open(path) as im:
        text = dict(im.text)
    return tuple(float(v) for v in text["xlim_pct"].split(",")), tuple(float(v) for v in text["ylim_pct"].split(","))


def test_weak_model_det_shows_the_whole_curve_and_the_eer_marker(tmp_path):
    scores, labels = _weak_model()
    p_miss, p_fa, e = _curve(scores, labels)
    assert 0.37 < e < 0.43
    inside = (p_miss > 0) & (p_fa > 0) & (p_miss < 1) & (p_fa < 1)
    # the old fixed axes (0.01 % .. 60 %) clipped this curve: it reaches far above 60 %
    assert max(p_miss[inside].max(), p_fa[inside].max()) > 0.9

    path = plot_det({"cosine": (p_miss, p_fa, e)}, str(tmp_path / "det.png"), title="weak")
    (xlo, xhi), (ylo, yhi) = _png_limits(path)
    assert (xlo, xhi) == (ylo, yhi)
    # every point of the curve with both rates non-zero lies inside both axes, and so does the EER point
    for r in (p_miss[inside], p_fa[inside]):
        assert xlo <= 100 * r.min() and 100 * r.max() <= xhi
    assert xlo < 100 * e < xhi
    # the lower end is at the data's resolution, not at a fixed 0.01 %: about one error in the list
    assert 100 / 5000 / 2 < xlo <= 100 / 5000

    fig, ax, (lo, hi) = _det_figure({"cosine": (p_miss, p_fa, e)}, title="weak")
    try:
        np.testing.assert_allclose(ax.get_xlim(), ndtri([lo, hi]))
        np.testing.assert_allclose(ax.get_ylim(), ndtri([lo, hi]))
        np.testing.assert_allclose([100 * lo, 100 * hi], [xlo, xhi], rtol=1e-5)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = ax.get_legend().get_window_extent(renderer)
        axes = ax.get_window_extent(renderer)
        assert not legend.overlaps(axes), "the legend must sit outside the axes"
        # the EER marker is drawn (a line with one point on the diagonal at the EER)
        q = ndtri(e)
        markers = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
        assert any(abs(ln.get_xdata()[0] - q) < 1e-9 and abs(ln.get_ydata()[0] - q) < 1e-9 for ln in markers)
        assert any("EER" in t.get_text() for t in ax.texts)
        # ticks are round percentages inside the axes
        ticks = [float(t.get_text()) for t in ax.get_xticklabels()]
        assert len(ticks) >= 5 and all(100 * lo <= t <= 100 * hi for t in ticks)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_strong_model_det_is_not_squeezed_into_a_corner():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(4.0, 1, 2000), rng.normal(0, 1, 20000)])
    labels = np.concatenate([np.ones(2000, int), np.zeros(20000, int)])
    p_miss, p_fa, e = _curve(scores, labels)
    lo, hi = det_limits({"s": (p_miss, p_fa, e)})
    assert lo < e < hi
    assert hi < 0.6  # nothing of the curve lives above: no empty upper half
    assert lo <= 1 / 20000


def test_histogram_bins_come_from_the_data_and_thresholds_are_in_the_legend(tmp_path):
    scores, labels = _weak_model()
    edges = histogram_edges(scores)
    assert 10 <= len(edges) - 1 <= 80
    assert len(histogram_edges(scores[:30])) - 1 == 10  # few scores: few bins, never 100 spiky ones
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    captured = {}
    orig = plt.Figure.savefig

    def grab(fig, *a, **k):  # keep the legend texts of the figure being saved
        captured["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        captured["axes_texts"] = [t.get_text() for t in fig.axes[0].texts]
        return orig(fig, *a, **k)

    plt.Figure.savefig = grab
    try:
        plot_score_histogram(scores, labels, str(tmp_path / "h.png"),
                             thresholds={"EER": 0.25, "minDCF 0.01": 0.2501, "minDCF 0.05": 0.2502})
    finally:
        plt.Figure.savefig = orig
    # three thresholds 1e-4 apart: each named once, in the legend (never text on top of each other in the plot)
    assert captured["axes_texts"] == []
    assert [t for t in captured["labels"] if "threshold" in t] == [
        "EER threshold 0.250", "minDCF 0.01 threshold 0.250", "minDCF 0.05 threshold 0.250"]
    assert (tmp_path / "h.png").stat().st_size > 0
