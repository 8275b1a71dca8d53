"""Length-bucketed batching."""
from __future__ import annotations

import numpy as np

from spk_toolkit.data import bucket_batches, padding_waste


def test_bucket_batches_bound_and_cover():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8000, 16000 * 20, size=500).tolist()
    bins = 16000 * 60
    batches = bucket_batches(lengths, bins)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= bins
    assert padding_waste(lengths, batches) < 0.05  # sorted buckets: little padding on a 500-utterance set


def test_bucket_batches_single_long_item_and_max_batch_size():
    assert bucket_batches([10, 1000, 10], 100) == [[1], [0, 2]]
    assert bucket_batches([5] * 5, 1000, max_batch_size=2) == [[0, 1], [2, 3], [4]]
