"""Engine -> storage property test (issue 14, criterion 3): any Kaldi utterance id, vector and sequence outputs of
float16 / float32 / int32, through the one driver into every registered format and back, exactly.

The model is a deterministic stand-in whose outputs are functions of each utterance's true samples only (so they
are batch-invariant by construction) and whose expected values are computed here independently, one utterance at
a time. Audio is speech-like and held in memory (``Utterance.audio``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spk_toolkit.backends.base import EmbeddingModel, OutputKind
from spk_toolkit.engine import extract
from spk_toolkit.io.datadir import Utterance
from spk_toolkit.io.storage import get_reader, open_reader
from spk_toolkit.testing import speechlike

FRAME = 160  # samples per frame of the sequence outputs
FORMATS = ["npz", "kaldi_ark", "hdf5", "npy_dir"]
KEYWORDS = ["file", "allow_pickle", "name", "mode", "data", "shape", "dtype", "compression"]


class StatsModel(EmbeddingModel):
    """A (4,) float16 vector, (T', 3) float32 frame statistics and (T',) int32 tokens per utterance."""

    name = "test-stats"
    sample_rate = 16000
    embed_dim = 4

    def output_kinds(self):
        return {"embedding": OutputKind("vector", "float16", (4,)),
                "frames": OutputKind("sequence", "float32", (3,)),
                "tokens": OutputKind("sequence", "int32", ())}

    def embed(self, wav, lengths):
        return self.compute(wav, lengths)["embedding"]

    def compute(self, wav, lengths):
        B, T = wav.shape
        n_frames = lengths // FRAME
        tmax = max(int(n_frames.max()), 1)
        frames = torch.zeros(B, tmax, 3)
        vec = torch.zeros(B, 4)
        for i in range(B):
            x = wav[i, : int(lengths[i])].double()
            vec[i] = torch.tensor([x.mean(), x.std(), len(x) / 1000.0, x.abs().max()])
            f = x[: int(n_frames[i]) * FRAME].reshape(-1, FRAME)
            frames[i, : len(f)] = torch.stack([f.mean(1), f.std(1), f.abs().max(1).values], 1).float()
        tokens = (frames[..., 2] * 1000).floor().to(torch.int32)
        return {"embedding": vec.half(), "frames": (frames, n_frames), "tokens": (tokens, n_frames)}


def expected(x: np.ndarray) -> dict:
    """The model's outputs for one utterance, computed alone (no batch)."""
    t = torch.from_numpy(x)[None]
    out = StatsModel().compute(t, torch.tensor([len(x)]))
    n = len(x) // FRAME
    return {"embedding": out["embedding"][0].numpy(), "frames": out["frames"][0][0, :n].numpy(),
            "tokens": out["tokens"][0][0, :n].numpy()}


kaldi_char = st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs"), blacklist_characters="\x00")
segment = st.text(kaldi_char, min_size=1, max_size=8)
utt_id = st.one_of(
    st.sampled_from(KEYWORDS),
    st.lists(segment, min_size=1, max_size=3).map("/".join),
    segment.map(lambda s: "/" + s), segment.map(lambda s: s + "/"), segment.map(lambda s: s + "//" + s),
    st.text(st.sampled_from("aé中/._-"), min_size=1, max_size=6),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ids=st.lists(utt_id, min_size=1, max_size=6, unique=True), seed=st.integers(0, 2**16))
def test_any_id_and_kind_round_trips_through_the_engine(tmp_path_factory, ids, seed):
    rng = np.random.default_rng(seed)
    utts = []
    for k, uid in enumerate(ids):
        x = speechlike(float(rng.uniform(0.1, 0.9)), f0=float(rng.uniform(90, 250)), seed=k)
        utts.append(Utterance(uid, f"<memory {k}>", audio=x, sample_rate=16000))
    out = tmp_path_factory.mktemp("run")
    s = extract(utts, out, model=StatsModel(), output_format=FORMATS, progress=False, num_workers=0,
                shard_duration=0.7, batch_bins=16000, min_duration=0.0)
    assert s["embedded"] == len(ids) and s["errors"] == 0
    want = {u.utt_id: expected(u.audio) for u in utts}
    for name, stem in (("embedding", "embeddings"), ("frames", "frames"), ("tokens", "tokens")):
        for fmt in FORMATS:
            path = s["outputs_by_name"][name][fmt]
            with get_reader(fmt)(path) as r:
                assert list(r) == ids, (name, fmt)  # every id exactly, in input order
                assert len(r) == s["embedded"]
                for uid in ids:
                    got, ref = r[uid], want[uid][name]
                    assert got.dtype == ref.dtype and got.shape == ref.shape, (name, fmt, uid)
                    assert np.array_equal(got, ref), (name, fmt, uid)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kinds"]["tokens"] == {"kind": "sequence", "dtype": "int32", "shape": []}
    with open_reader(out) as r:  # the run directory itself opens the embedding output
        assert list(r) == ids and len(r) == summary["embedded"]


def test_batch_invariance_of_stored_sequences(tmp_path):
    """No padded frame is ever stored: batch size 1 and one large batch give identical files' contents."""
    utts = [Utterance(f"u{k}", f"<memory {k}>", audio=speechlike(d, seed=k), sample_rate=16000)
            for k, d in enumerate([0.31, 2.0, 0.52, 1.37, 0.11])]
    outs = []
    for bins, name in ((1, "b1"), (16000 * 60, "big")):
        s = extract(utts, tmp_path / name, model=StatsModel(), output_format="hdf5", progress=False, num_workers=0,
                    batch_bins=bins, min_duration=0.0)
        outs.append(s)
    with get_reader("hdf5")(outs[0]["outputs_by_name"]["frames"]["hdf5"]) as a, \
            get_reader("hdf5")(outs[1]["outputs_by_name"]["frames"]["hdf5"]) as b:
        for u in utts:
            assert a[u.utt_id].shape == (len(u.audio) // FRAME, 3)
            assert np.array_equal(a[u.utt_id], b[u.utt_id])


def test_crops_require_vector_outputs(tmp_path):
    from spk_toolkit.engine import ExtractionError

    utts = [Utterance("u", "<memory>", audio=speechlike(1.0), sample_rate=16000)]
    with pytest.raises((ValueError, ExtractionError), match="vector outputs"):
        extract(utts, tmp_path / "o", model=StatsModel(), crops=2, crop_duration=0.5, progress=False, num_workers=0,
                on_error="raise")
