"""Small models and batches for the unit tests of the batch computation and the shard accumulator."""
from __future__ import annotations

import numpy as np
import torch

from spk_toolkit.backends.base import EmbeddingModel
from spk_toolkit.data import Batch


class SumModel(EmbeddingModel):
    """``[sum(x), x[0], x[-1]]`` of each row's true samples (float64 inside, float32 out); records its forwards."""

    name = "test-run-sum"
    sample_rate = 1000
    embed_dim = 3

    def __init__(self):
        super().__init__()
        self.calls = []  # (B, T) of every forward

    def embed(self, wav, lengths):
        self.calls.append(tuple(wav.shape))
        out = torch.zeros(len(wav), 3, dtype=torch.float64)
        for i in range(len(wav)):
            x = wav[i, : int(lengths[i])].double()
            out[i] = torch.stack([x.sum(), x[0], x[-1]])
        return out.float()


class NaNModel(SumModel):
    """:class:`SumModel`, but a row of true length 7 comes out NaN."""

    name = "test-run-nan"

    def embed(self, wav, lengths):
        out = super().embed(wav, lengths)
        out[lengths == 7] = float("nan")
        return out


def padded(rows, tag=None, errors=()) -> Batch:
    """A Batch of the given 1-D float rows (zero-padded), indices 0..B-1 unless rows is a dict index -> row."""
    items = list(rows.items()) if isinstance(rows, dict) else list(enumerate(rows))
    T = max(len(r) for _, r in items)
    wav = torch.zeros(len(items), T)
    for k, (_, r) in enumerate(items):
        wav[k, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.float32))
    lengths = torch.tensor([len(r) for _, r in items], dtype=torch.int64)
    return Batch(wav, lengths, [i for i, _ in items], list(errors), tag)
