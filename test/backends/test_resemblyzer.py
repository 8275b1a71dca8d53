"""The offline default backend: equality with resemblyzer and batch invariance on real speech."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from spk_toolkit.backends import load_model
from spk_toolkit.data import collate
from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import load_corpus

DEVICE = os.environ.get("SPK_TEST_DEVICE", "cpu")  # cpu in CI; `SPK_TEST_DEVICE=cuda` on a GPU machine


@pytest.fixture(scope="module")
def model():
    return load_model("resemblyzer", device=DEVICE)


@pytest.fixture(scope="module")
def prepared(model, fillets_small):
    """Prepared (VAD-trimmed) 16 kHz real utterances, 0.5 s to 20 s long (one per ~2 s of duration range)."""
    utts = load_corpus(fillets_small)
    wavs = [model.prepare(read_audio(u.path, 16000)[0]) for u in utts]
    wavs = [w for w in wavs if len(w) >= 8000]
    # add a 20 s utterance by concatenating real speech so the range 0.5 s .. 20 s is covered
    long = np.concatenate(wavs)[: 20 * 16000]
    short = wavs[0][:8000]
    return [short] + wavs + [long]


@pytest.mark.slow
def test_equals_embed_utterance(model, prepared):
    from resemblyzer import VoiceEncoder

    enc = VoiceEncoder(device="cpu", verbose=False)
    batch = collate([(i, w, None) for i, w in enumerate(prepared)])
    ours = model.embed(batch.wav, batch.lengths).numpy()
    ref = np.stack([enc.embed_utterance(w) for w in prepared])
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.slow
def test_batch_invariance(model, prepared):
    lengths = [len(w) for w in prepared]
    assert min(lengths) <= 8000 and max(lengths) >= 20 * 16000
    single = np.stack([model.embed(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0].numpy() for w in prepared])
    everything = collate([(i, w, None) for i, w in enumerate(prepared)])
    big = model.embed(everything.wav, everything.lengths).numpy()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(prepared))
    mixed = np.zeros_like(big)
    for chunk in np.array_split(perm, 5):
        b = collate([(int(i), prepared[i], None) for i in chunk])
        mixed[b.indices] = model.embed(b.wav, b.lengths).numpy()
    for batched in (big, mixed):
        cos = (single * batched).sum(1) / np.linalg.norm(single, axis=1) / np.linalg.norm(batched, axis=1)
        assert cos.min() >= 0.99999, cos.min()


def test_embeddings_separate_real_speakers(small_run, fillets_small):
    """Same-speaker cosine is higher than cross-speaker cosine on real speech (pretrained weights work)."""
    from spk_toolkit import load_embeddings

    out, _ = small_run
    emb = load_embeddings(out / "embeddings.npz")
    utts = load_corpus(fillets_small)
    keys = [u.utt_id for u in utts if u.utt_id in emb]
    spk = np.array([next(u.spk_id for u in utts if u.utt_id == k) for k in keys])
    X = np.stack([emb[k] for k in keys])
    S = X @ X.T
    same = spk[:, None] == spk[None, :]
    off = ~np.eye(len(keys), dtype=bool)
    assert S[same & off].mean() > S[~same].mean() + 0.1
