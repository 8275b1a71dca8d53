"""Unit tests of EmbeddingModel.embed_utterances (spk_toolkit.backends.base) with a tiny deterministic model:
batch invariance, input order, preparation, and how a bad utterance is reported."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spk_toolkit.backends.base import EmbeddingModel, OutputKind
from spk_toolkit.errors import UtteranceError
from spk_toolkit.io.audio import AudioLoadingError
from spk_toolkit.io.datadir import Utterance
from spk_toolkit.testing import speechlike, write_wav

SR = 16000
SECONDS = [0.15, 4.0, 0.5, 2.3, 0.12, 1.0]  # very different lengths, not sorted


class TinyModel(EmbeddingModel):
    """``[mean, std, abs max, seconds]`` of each row's true samples (float64 inside, float32 out)."""

    name = "test-base-tiny"
    sample_rate = SR
    embed_dim = 4

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def embed(self, wav, lengths):
        self.batch_sizes.append(len(wav))
        out = torch.zeros(len(wav), 4, dtype=torch.float64)
        for i in range(len(wav)):
            x = wav[i, : int(lengths[i])].double()
            out[i] = torch.stack([x.mean(), x.std(), x.abs().max(), torch.tensor(len(x) / SR, dtype=torch.float64)])
        return out.float()


def by_definition(x: np.ndarray) -> np.ndarray:
    """TinyModel's embedding of one waveform, from its definition in numpy (independent of torch)."""
    x = x.astype(np.float64)
    return np.array([x.mean(), x.std(ddof=1), np.abs(x).max(), len(x) / SR], dtype=np.float32)


def memory_utts(seconds=SECONDS):
    """In-memory utterances of the given lengths, each a distinct speech-like signal."""
    return [Utterance(f"u{k}", f"<memory {k}>", audio=speechlike(s, f0=90.0 + 25 * k, seed=k), sample_rate=SR)
            for k, s in enumerate(seconds)]


def test_batch_invariance_across_lengths():
    """One big padded batch, one utterance per batch and the model on each alone give identical embeddings."""
    utts = memory_utts()
    m = TinyModel()
    big = m.embed_utterances(utts, batch_bins=SR * 60)
    assert m.batch_sizes == [len(utts)]  # really one padded batch
    m.batch_sizes.clear()
    single = m.embed_utterances(utts, batch_bins=1)
    assert m.batch_sizes == [1] * len(utts)
    assert big.shape == (len(utts), 4) and big.dtype == np.float32
    assert np.array_equal(big, single)
    for k, u in enumerate(utts):
        direct = m.embed(torch.from_numpy(u.audio)[None], torch.tensor([len(u.audio)])).numpy()[0]
        assert np.array_equal(big[k], direct), k
        np.testing.assert_allclose(big[k], by_definition(u.audio), rtol=1e-5, atol=1e-7)


def test_output_order_is_input_order():
    """Row i is utterance i (the engine batches longest first, the result is not in that order)."""
    m = TinyModel()
    out = m.embed_utterances(memory_utts(), batch_bins=SR * 5)
    assert np.array_equal(out[:, 3], np.array([round(s * SR) / SR for s in SECONDS], dtype=np.float32))
    rev = m.embed_utterances(memory_utts()[::-1], batch_bins=SR * 5)
    assert np.array_equal(rev, out[::-1])


def test_files_equal_in_memory(tmp_path):
    """Float wav files embed exactly like the same samples given in memory."""
    utts = memory_utts([0.3, 1.7, 0.8])
    files = [Utterance(u.utt_id, str(write_wav(tmp_path / f"{u.utt_id}.wav", u.audio, subtype="FLOAT")))
             for u in utts]
    m = TinyModel()
    assert np.array_equal(m.embed_utterances(files), m.embed_utterances(utts))


def test_prepare_applied_only_when_asked():
    """prepare=True runs the model's prepare (here: keep the first half); prepare=False embeds the waveform whole."""
    class Halving(TinyModel):
        name = "test-base-halving"

        def prepare(self, wav):
            return wav[: len(wav) // 2]

    utts = memory_utts([1.0, 0.5])
    m = Halving()
    prepared = m.embed_utterances(utts)
    raw = m.embed_utterances(utts, prepare=False)
    assert prepared[:, 3].tolist() == [0.5, 0.25] and raw[:, 3].tolist() == [1.0, 0.5]
    np.testing.assert_allclose(prepared[0], by_definition(utts[0].audio[:8000]), rtol=1e-5, atol=1e-7)


def test_missing_file_raises_naming_the_first_bad_path(tmp_path):
    """A missing file is an AudioLoadingError naming the first bad utterance's path in input order (no result)."""
    good = write_wav(tmp_path / "good.wav", speechlike(0.5), subtype="FLOAT")
    utts = [Utterance("g", str(good)), Utterance("m1", str(tmp_path / "missing1.wav")),
            Utterance("g2", str(good)), Utterance("m2", str(tmp_path / "missing2.wav"))]
    with pytest.raises(AudioLoadingError) as e:
        TinyModel().embed_utterances(utts)
    assert e.value.path == str(tmp_path / "missing1.wav") and e.value.reason
    assert str(tmp_path / "missing1.wav") in str(e.value)


def test_corrupt_file_raises(tmp_path):
    """A file that is not audio is an AudioLoadingError naming it."""
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 7)
    with pytest.raises(AudioLoadingError) as e:
        TinyModel().embed_utterances([*memory_utts([0.4]), Utterance("c", str(bad))])
    assert e.value.path == str(bad)


def test_too_short_and_silent_are_refused():
    """Shorter than min_duration or all-zero audio: AudioLoadingError naming the utterance and the reason."""
    short = Utterance("s", "<short>", audio=speechlike(0.05), sample_rate=SR)
    with pytest.raises(AudioLoadingError, match="too short") as e:
        TinyModel().embed_utterances([*memory_utts([0.5]), short])
    assert e.value.path == "<short>"
    silent = Utterance("z", "<silent>", audio=np.zeros(SR, np.float32), sample_rate=SR)
    with pytest.raises(AudioLoadingError, match="silent") as e:
        TinyModel().embed_utterances([silent])
    assert e.value.path == "<silent>"
    # the same short utterance passes once min_duration allows it
    assert TinyModel().embed_utterances([short], min_duration=0.01)[0, 3] == np.float32(800 / SR)


def test_non_finite_embedding_is_refused():
    """A model giving NaN for one utterance raises AudioLoadingError naming that utterance's path."""
    class NaNForLong(TinyModel):
        name = "test-base-nan"

        def embed(self, wav, lengths):
            out = super().embed(wav, lengths)
            out[lengths > SR] = float("nan")
            return out

    with pytest.raises(UtteranceError, match="non-finite embedding") as e:
        NaNForLong().embed_utterances(memory_utts([0.5, 2.0, 0.3]))
    assert e.value.path == "<memory 1>" and isinstance(e.value, AudioLoadingError)
    assert str(e.value) == "utterance 'u1' (<memory 1>): model produced a non-finite embedding"


def test_model_without_vector_embedding_output_is_refused():
    """embed_utterances needs a vector 'embedding' output: other models get a ValueError."""
    class Frames(TinyModel):
        name = "test-base-frames"

        def output_kinds(self):
            return {"frames": OutputKind("sequence", "float32", (2,))}

    with pytest.raises(ValueError, match="no vector 'embedding' output"):
        Frames().embed_utterances(memory_utts([0.5]))


def test_embed_waveforms_needs_sample_rate_and_resamples():
    """embed_waveforms refuses a missing rate; at the model's rate it equals embed_utterances on the same audio."""
    m = TinyModel()
    utts = memory_utts([0.4, 1.1])
    with pytest.raises(ValueError, match="sample_rate"):
        m.embed_waveforms([u.audio for u in utts])
    assert np.array_equal(m.embed_waveforms([u.audio for u in utts], SR), m.embed_utterances(utts))
    eight = m.embed_waveforms([speechlike(1.0, sr=8000)], 8000)
    assert eight[0, 3] == np.float32(1.0)  # resampled to 16 kHz: 16000 samples
