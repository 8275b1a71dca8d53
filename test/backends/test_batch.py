"""Unit tests of the one batch computation (spk_toolkit.backends.batch): ESPnet's evaluation crops, chunk bounds,
one batch's outputs and the non-finite policy. Expected values are worked out by hand or by a brute-force definition
here, never taken from a run of the code."""
from __future__ import annotations

import numpy as np
import pytest

from batch_helpers import NaNModel, SumModel, padded
from spk_toolkit.backends.base import OutputKind
from spk_toolkit.backends.batch import BatchOptions, chunk_bounds, compute_batch, eval_crops, nonfinite_reason, stored_kinds
from spk_toolkit.engine.options import ExtractOptions


# --------------------------------------------------------------------------------------------------- eval_crops
def test_eval_crops_long_input_starts_follow_linspace():
    """T=10, L=4: n=3 -> starts 0,3,6; n=4 -> 0,2,4,6; n=5 -> int(0,1.5,3,4.5,6) = 0,1,3,4,6."""
    x = np.arange(10, dtype=np.float32)
    for n, starts in ((3, [0, 3, 6]), (4, [0, 2, 4, 6]), (5, [0, 1, 3, 4, 6]), (1, [0])):
        c = eval_crops(x, n, 4)
        assert c.shape == (n, 4)
        assert np.array_equal(c, np.array([np.arange(s, s + 4) for s in starts], dtype=np.float32)), n


def test_eval_crops_exact_length_input_is_not_padded():
    """T == L: no wrap, every crop is the whole input."""
    x = np.arange(4, dtype=np.float32) + 1
    assert np.array_equal(eval_crops(x, 3, 4), np.tile(x, (3, 1)))


def test_eval_crops_short_input_is_wrapped_to_length_plus_one():
    """T=3 < L=5: wrapped to L+1=6 samples [a b c a b c]; starts int(linspace(0, 1, 3)) = 0, 0, 1."""
    a, b, c = 1.0, 2.0, 3.0
    x = np.array([a, b, c], dtype=np.float32)
    got = eval_crops(x, 3, 5)
    assert got.shape == (3, 5)
    assert np.array_equal(got, np.array([[a, b, c, a, b], [a, b, c, a, b], [b, c, a, b, c]], dtype=np.float32))


def test_eval_crops_much_shorter_input_wraps_repeatedly():
    """T=2 < L=7: wrapped to 8 samples [p q p q p q p q]; starts int(linspace(0, 1, 2)) = 0, 1."""
    x = np.array([5.0, -5.0], dtype=np.float32)
    got = eval_crops(x, 2, 7)
    p, q = 5.0, -5.0
    assert np.array_equal(got, np.array([[p, q, p, q, p, q, p], [q, p, q, p, q, p, q]], dtype=np.float32))


# ------------------------------------------------------------------------------------------------- chunk_bounds
def test_chunk_bounds_hand_examples():
    """n=10, max 4 -> [0,3,6,10]; n=8, max 4 -> [0,4,8]; n=1 -> [0,1]; n=5, max 1 -> [0..5]; n <= max -> [0,n]."""
    assert chunk_bounds(10, 4).tolist() == [0, 3, 6, 10]
    assert chunk_bounds(8, 4).tolist() == [0, 4, 8]
    assert chunk_bounds(1, 5).tolist() == [0, 1]
    assert chunk_bounds(5, 1).tolist() == [0, 1, 2, 3, 4, 5]
    assert chunk_bounds(7, 100).tolist() == [0, 7]
    assert chunk_bounds(10, 4).dtype == np.int64


def test_chunk_bounds_properties_brute_force():
    """For every n <= 80, max_len <= 25: ceil(n/max) chunks, 0 = b0 < ... < bk = n, lengths <= max, within 1."""
    for n in range(1, 81):
        for m in range(1, 26):
            b = chunk_bounds(n, m)
            k = (n + m - 1) // m
            assert len(b) == k + 1 and b[0] == 0 and b[-1] == n, (n, m)
            d = np.diff(b)
            assert (d >= 1).all() and (d <= m).all() and d.max() - d.min() <= 1, (n, m)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 0), (-1, 3)])
def test_chunk_bounds_rejects_non_positive(n, m):
    """n or max_len < 1 is a ValueError."""
    with pytest.raises(ValueError, match="must be >= 1"):
        chunk_bounds(n, m)


# ------------------------------------------------------------------------------------------------ compute_batch
def test_compute_batch_equals_per_utterance_values():
    """Whole utterances: row i of each output is the model's value on row i's true samples (padding invisible)."""
    m = SumModel()
    rows = [np.arange(1, 6), np.array([7.0, -2.0]), np.array([0.5, 0.25, 0.125])]
    out = compute_batch(m, m.output_kinds(), padded(rows), BatchOptions())
    assert list(out) == ["embedding"] and len(out["embedding"]) == 3
    want = [[15, 1, 5], [5, 7, -2], [0.875, 0.5, 0.125]]  # [sum, first, last] by hand
    for got, w in zip(out["embedding"], want):
        assert got.dtype == np.float32 and got.shape == (3,)
        assert np.array_equal(got, np.array(w, dtype=np.float32))
    assert m.calls == [(3, 5)]  # one forward of the padded batch


def test_compute_batch_crops_mean_by_hand():
    """crops=3, L=4: the stored vector is the mean over ESPnet's crops, per utterance (hand-computed)."""
    m = SumModel()  # 1000 Hz: crop_duration 0.004 s = 4 samples
    a = np.arange(10)  # crops [0..3] [3..6] [6..9]: sums 6, 18, 30; firsts 0, 3, 6; lasts 3, 6, 9
    b = 100 + np.arange(7)  # starts int(linspace(0, 3, 3)) = 0, 1, 3: sums 406, 410, 418; firsts 100, 101, 103
    opts = BatchOptions(crops=3, crop_duration=0.004, batch_bins=8)
    out = compute_batch(m, m.output_kinds(), padded([a, b]), opts)["embedding"]
    assert np.array_equal(out[0], np.array([18, 3, 6], dtype=np.float32))
    assert np.array_equal(out[1], np.array([1234 / 3, 304 / 3, 313 / 3], dtype=np.float32))
    assert out[0].dtype == np.float32
    # 6 crops of 4 samples in forwards of at most batch_bins = 8 samples: 3 forwards of 2 crops, no padding
    assert m.calls == [(2, 4), (2, 4), (2, 4)]


def test_compute_batch_crops_not_averaged():
    """average_crops=False: every crop's vector, (n_crops, D) per utterance, in crop order."""
    m = SumModel()
    opts = BatchOptions(crops=3, crop_duration=0.004, average_crops=False)
    out = compute_batch(m, m.output_kinds(), padded([np.arange(10), 100 + np.arange(7)]), opts)["embedding"]
    assert out[0].shape == (3, 3)
    assert np.array_equal(out[0], np.array([[6, 0, 3], [18, 3, 6], [30, 6, 9]], dtype=np.float32))
    assert np.array_equal(out[1], np.array([[406, 100, 103], [410, 101, 104], [418, 103, 106]], dtype=np.float32))


def test_compute_batch_max_chunk_duration_length_weighted_mean():
    """max_chunk_duration 4 samples on 10 samples: chunks [0,3) [3,6) [6,10), outputs weighted by 3, 3, 4."""
    m = SumModel()
    opts = BatchOptions(max_chunk_duration=0.004)
    x = np.arange(10)
    out = compute_batch(m, m.output_kinds(), padded([x, np.array([1.0, 2.0])]), opts)["embedding"]
    # sums 3, 12, 30; firsts 0, 3, 6; lasts 2, 5, 9
    want = [(3 * 3 + 12 * 3 + 30 * 4) / 10, (0 * 3 + 3 * 3 + 6 * 4) / 10, (2 * 3 + 5 * 3 + 9 * 4) / 10]
    assert np.allclose(out[0], want, rtol=0, atol=1e-5)
    assert np.array_equal(out[1], np.array([3, 1, 2], dtype=np.float32))  # short row: one chunk, the whole row


def test_compute_batch_passes_non_finite_rows_through():
    """compute_batch does not judge values: a NaN row comes back NaN, the other rows are unchanged."""
    m = NaNModel()
    out = compute_batch(m, m.output_kinds(), padded([np.arange(1, 8), np.arange(1, 4)]), BatchOptions())
    assert np.isnan(out["embedding"][0]).all()
    assert np.array_equal(out["embedding"][1], np.array([6, 1, 3], dtype=np.float32))


def test_compute_batch_wrong_batch_size_is_an_error():
    """A model returning a different number of rows than the batch raises ValueError."""
    class Short(SumModel):
        name = "test-run-short"

        def embed(self, wav, lengths):
            return super().embed(wav, lengths)[:1]

    m = Short()
    with pytest.raises(ValueError, match="1 rows for a batch of 2"):
        compute_batch(m, m.output_kinds(), padded([np.ones(3), np.ones(2)]), BatchOptions())


def test_compute_batch_takes_extract_options_as_batch_options():
    """The engine passes its ExtractOptions: the same fields give the same values as BatchOptions."""
    m = SumModel()
    batch = padded([np.arange(1, 12, dtype=np.float32), np.arange(1, 4, dtype=np.float32)])
    for fields in ({}, {"crops": 3, "crop_duration": 0.004}, {"max_chunk_duration": 0.004}):
        a = compute_batch(m, m.output_kinds(), batch, BatchOptions(**fields))["embedding"]
        b = compute_batch(m, m.output_kinds(), batch, ExtractOptions(num_workers=0, **fields))["embedding"]
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), fields


# ---------------------------------------------------------------------------------------- the non-finite policy
@pytest.mark.parametrize("values,reason", [
    ({"embedding": np.array([1.0, np.nan], np.float32)}, "model produced a non-finite embedding"),
    ({"embedding": np.array([np.inf], np.float32), "frames": np.ones((2, 3), np.float16)},
     "model produced a non-finite embedding"),
    ({"a": np.array([-np.inf]), "b": np.array([[np.nan]], np.float32)}, "model produced a non-finite a and b"),
    ({"embedding": np.array([1.0, 2.0], np.float32), "tokens": np.array([3, 4], np.int64)}, None),
])
def test_nonfinite_reason(values, reason):
    assert nonfinite_reason(values) == reason


def test_stored_kinds_adds_the_crop_axis_only_when_crops_are_kept():
    kinds = {"embedding": OutputKind("vector", "float32", (4,))}
    assert stored_kinds(kinds, BatchOptions()) == kinds
    assert stored_kinds(kinds, BatchOptions(crops=5)) == kinds
    assert stored_kinds(kinds, BatchOptions(crops=5, average_crops=False))["embedding"].shape == (5, 4)
