"""Feature extractors and the offline cache on real speech (issue 16, acceptance criteria 1 and 2).

fbank of the fillets speech cached with every writer reads back equal to a direct computation (exact in float32,
within the documented bound in float16), tokens stay integers, and frame-level outputs are batch invariant: no
padded frame stored, each utterance equal to its batch-size-1 computation (exact for fbank, cosine >= 0.99999
per frame for ESPnet hidden states).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import spk_toolkit
from spk_toolkit.features import (
    CallableExtractor,
    FeatureExtractor,
    KaldiFbank,
    KmeansTokens,
    as_extractor,
    available_extractors,
    load_extractor,
    nearest_centroid,
)
from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import load_kaldi_dir
from spk_toolkit.testing import make_subset

FORMATS = ("hdf5", "kaldi_ark", "npz", "npy_dir")
OPTS = dict(progress=False, num_workers=0)


def direct_fbank(path: str, **kw) -> np.ndarray:
    """The reference: torchaudio's Kaldi fbank called directly on the decoded 16 kHz audio (not through us)."""
    import torchaudio.compliance.kaldi as kaldi

    x, _ = read_audio(path, 16000)
    opts = {"num_mel_bins": 80, "dither": 0.0, **kw}
    return kaldi.fbank(torch.from_numpy(x)[None] * 32768.0, sample_frequency=16000, **opts).numpy()


@pytest.fixture(scope="module")
def utts(fillets_small):
    return load_kaldi_dir(fillets_small)


@pytest.fixture(scope="module")
def reference(utts):
    return {u.utt_id: direct_fbank(u.path) for u in utts}


@pytest.fixture(scope="module")
def fbank_cache(fillets_small, tmp_path_factory):
    """fbank of fillets_small (48 utterances, 0.5-20 s) in every format, over several shards."""
    out = tmp_path_factory.mktemp("fbank_cache")
    s = spk_toolkit.cache_features(fillets_small, out, "fbank", {"num_mel_bins": 80}, output_format=",".join(FORMATS),
                                   writer_options={"hdf5": {"compression": "lzf"}}, shard_duration=30, **OPTS)
    return out, s


# ------------------------------------------------------------------------------------------- criterion 1
@pytest.mark.parametrize("fmt", FORMATS)
def test_fbank_cache_equals_direct_computation_in_every_format(fbank_cache, reference, utts, fmt):
    out, s = fbank_cache
    assert s["embedded"] == len(utts) == 48 and s["errors"] == 0 and s["shards"] > 1
    assert s["kinds"] == {"fbank": {"kind": "sequence", "dtype": "float32", "shape": [80]}}
    cache = spk_toolkit.open_cache(out, fmt=fmt)
    assert cache.format == fmt and list(cache) == [u.utt_id for u in utts]  # every utterance, input order
    for k, ref in reference.items():
        got = cache[k]
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)  # exact: float32 storage, the same computation


def test_kaldi_ark_cache_is_readable_by_kaldiio_and_hdf5_by_h5py(fbank_cache, reference):
    import h5py
    import kaldiio

    out, _ = fbank_cache
    scp = kaldiio.load_scp(str(out / "fbank.scp"))  # Kaldi FM matrices: what ESPnet's kaldi_ark loader reads
    assert list(scp) == list(reference)
    with open(out / "fbank.ark", "rb") as f:
        assert f.read(100).count(b"FM") >= 1
    for k in list(reference)[:5]:
        np.testing.assert_array_equal(scp[k], reference[k])
    from spk_toolkit.io.storage import hdf5_dataset_name

    with h5py.File(out / "fbank.h5", "r") as f:
        k = next(iter(reference))
        ds = f[hdf5_dataset_name(k)]
        assert ds.compression == "lzf" and ds.chunks is not None and ds.chunks[1] == 80  # chunked by whole frames
        np.testing.assert_array_equal(ds[()], reference[k])


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_cache_within_documented_bound(fillets_small, reference, tmp_path, fmt):
    s = spk_toolkit.cache_features(fillets_small, tmp_path, "fbank", {"num_mel_bins": 80, "dtype": "float16"},
                                   output_format=fmt, **OPTS)
    assert s["kinds"]["fbank"]["dtype"] == "float16"
    cache = spk_toolkit.open_cache(tmp_path)
    for k, ref in reference.items():
        got = cache[k]
        assert got.dtype == np.float16 and got.shape == ref.shape  # the dtype is kept by every reader
        # float16 round to nearest: |error| <= 2^-11 |x| (normal range; log-mel values here are ~[-16, 30])
        assert np.all(np.abs(got.astype(np.float64) - ref) <= 2.0 ** -11 * np.abs(ref) + 2.0 ** -24)


def test_tokens_stay_integers_and_equal_the_nearest_centroid(fillets_small, reference, tmp_path):
    rng = np.random.default_rng(0)
    frames = np.concatenate(list(reference.values()))
    codebook = frames[rng.choice(len(frames), 64, replace=False)] + rng.normal(0, 0.1, (64, 80))
    np.save(tmp_path / "codebook.npy", codebook)
    s = spk_toolkit.cache_features(fillets_small, tmp_path / "c", "kmeans_tokens",
                                   {"codebook": str(tmp_path / "codebook.npy"), "features": "fbank",
                                    "features_conf": {"num_mel_bins": 80}, "keep_features": True},
                                   output_format=",".join(FORMATS), shard_duration=40, **OPTS)
    assert s["kinds"]["tokens"] == {"kind": "sequence", "dtype": "int16", "shape": []}
    assert s["kinds"]["fbank"]["dtype"] == "float32"  # keep_features: the inner frames in the same pass
    for fmt in FORMATS:
        tok = spk_toolkit.open_cache(tmp_path / "c", output="tokens", fmt=fmt)
        fb = spk_toolkit.open_cache(tmp_path / "c", output="fbank", fmt=fmt)
        for k, ref in reference.items():
            t = tok[k]
            assert t.dtype == np.int16 and t.shape == (len(ref),)
            # brute force: full squared distances in float64, first minimum
            d = ((ref.astype(np.float64)[:, None, :] - codebook[None]) ** 2).sum(-1)
            np.testing.assert_array_equal(t, d.argmin(1))
            np.testing.assert_array_equal(fb[k], ref)
    with pytest.raises(ValueError, match="choose one with output="):
        spk_toolkit.open_cache(tmp_path / "c")


# ------------------------------------------------------------------------------------------- criterion 2
def test_fbank_batch_invariant_and_no_padded_frame_stored(fillets_small, utts, tmp_path):
    # one batch of every utterance (0.5-20 s together: mostly padding) vs every utterance alone
    big = spk_toolkit.cache_features(fillets_small, tmp_path / "big", "fbank", output_format="hdf5",
                                     batch_bins=10 ** 9, shard_duration=10 ** 6, **OPTS)
    one = spk_toolkit.cache_features(fillets_small, tmp_path / "one", "fbank", output_format="hdf5",
                                     batch_bins=1, shard_duration=10 ** 6, **OPTS)
    assert big["shards"] == one["shards"] == 1 and big["padding_waste"] > 0.5
    fb = KaldiFbank()
    a, b = spk_toolkit.open_cache(tmp_path / "big"), spk_toolkit.open_cache(tmp_path / "one")
    for u in utts:
        n = fb.num_frames(len(read_audio(u.path, 16000)[0]))
        assert a.num_frames(u.utt_id) == b.num_frames(u.utt_id) == n  # the true frame count, nothing padded
        np.testing.assert_array_equal(a[u.utt_id], b[u.utt_id])


def test_hidden_states_batch_invariant_cosine(fillets_small, tmp_path):
    pytest.importorskip("espnet2")
    from espnet_helpers import CONFIGS

    data = make_subset(fillets_small, tmp_path / "data", per_speaker=3)  # 12 utterances, 0.5-3 s
    conf = {"train_config": str(CONFIGS["xvector"]), "seed": 0, "layer": "encoder"}
    big = spk_toolkit.cache_features(data, tmp_path / "big", "hidden_states", conf, output_format="npz",
                                     batch_bins=10 ** 9, shard_duration=10 ** 6, **OPTS)
    one = spk_toolkit.cache_features(data, tmp_path / "one", "hidden_states", conf, output_format="npz",
                                     batch_bins=1, shard_duration=10 ** 6, **OPTS)
    assert big["model"]["config"]["batch_mode"] == "masked" and big["padding_waste"] > 0.1
    a, b = spk_toolkit.open_cache(tmp_path / "big"), spk_toolkit.open_cache(tmp_path / "one")
    worst = 1.0
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        assert x.shape == y.shape and x.shape[1] == 384  # same frames: no padded frame stored
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        worst = min(worst, float(cos.min()))
    assert worst >= 0.99999, worst


def test_hidden_states_any_module_any_layer_single_is_exact():
    """The single way: a forward hook on any layer of any module, each utterance alone (exact by construction)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 8, 400, stride=160)
            self.mix = torch.nn.Conv1d(8, 6, 3, padding=1)

        def forward(self, wav, lengths):
            return self.mix(torch.relu(self.conv(wav[:, None]))).mean(-1)

    torch.manual_seed(0)
    from spk_toolkit.features import HiddenStates

    hs = HiddenStates(module=Net(), layer="mix", time_axis=2)
    assert hs.batch_mode == "single" and hs.dim == 6
    g = torch.Generator().manual_seed(0)
    L = [16000, 4000, 9000]
    wav = torch.zeros(3, 16000)
    for i, n in enumerate(L):
        wav[i, :n] = 0.1 * torch.randn(n, generator=g)
    data, frames = hs.compute(wav, torch.tensor(L))["hidden"]
    for i, n in enumerate(L):
        alone = hs.compute_waveforms([wav[i, :n].numpy()])[0]["hidden"]
        assert int(frames[i]) == alone.shape[0] == 1 + (n - 400) // 160
        np.testing.assert_array_equal(data[i, : frames[i]].numpy(), alone)
    with pytest.raises(ValueError, match="unknown layer 'nope'; available: conv, mix"):
        HiddenStates(module=Net(), layer="nope")


# ----------------------------------------------------------------------------------------- the contract
def test_callable_adapter_per_utterance_and_checks():
    calls = []

    def frames(wav, lengths):  # (B, T) -> ((B, T // 100, 2), (B,)) and a (B, 3) vector
        calls.append(wav.shape[0])
        B, T = wav.shape
        x = wav[:, : T // 100 * 100].reshape(B, -1, 100)
        return {"f": (torch.stack([x.mean(-1), x.std(-1)], -1), lengths // 100), "v": wav[:, :3] * 0 + T}

    ex = as_extractor(frames, outputs={"f": ("sequence", "float16", (2,)), "v": ("vector", "float32", (3,))})
    assert isinstance(ex, CallableExtractor) and isinstance(ex, FeatureExtractor)
    wav = torch.zeros(2, 1000)
    wav[0] = torch.linspace(-1, 1, 1000)
    wav[1, :500] = 0.5
    out = ex.compute(wav, torch.tensor([1000, 500]))
    assert calls == [1, 1]  # per utterance, on its true length
    assert out["f"][1].tolist() == [10, 5] and out["v"][:, 0].tolist() == [1000, 500]
    assert ex.describe()["config"] == {"per_utterance": True} and ex.describe()["code_sha256"]
    bad = as_extractor(lambda w, n: {"f": (torch.zeros(w.shape[0], 3, 5), n)},
                       outputs={"f": ("sequence", "float32", (2,))})
    with pytest.raises(ValueError, match=r"output 'f': expected \(1, T', 2\) frames, got \(1, 3, 5\)"):
        bad.compute(wav, torch.tensor([1000, 500]))
    with pytest.raises(TypeError, match="needs outputs="):
        as_extractor(frames)
    with pytest.raises(TypeError, match="has no embedding"):
        ex.embed(wav, torch.tensor([1000, 500]))


def test_registry_by_name_and_option_errors(tmp_path):
    assert {"fbank", "mfcc", "hidden_states", "kmeans_tokens"} <= set(available_extractors())
    assert "fbank" in spk_toolkit.available_backends()  # the one registry: every executor builds it by name
    fb = spk_toolkit.load_model("fbank", num_mel_bins=40, dtype="float16")
    assert isinstance(fb, KaldiFbank) and fb.output_kinds()["fbank"].shape == (40,) and fb.min_samples == 400
    mf = load_extractor("mfcc", num_ceps=20, num_mel_bins=30)
    assert mf.output_kinds()["mfcc"].shape == (20,)
    with pytest.raises(ValueError, match="dither"):
        load_extractor("fbank", dither=1.0)
    with pytest.raises(ValueError, match="unknown fbank option.*num_mel_bin\\b.*known: .*num_mel_bins"):
        load_extractor("fbank", num_mel_bin=80)
    with pytest.raises(ValueError, match="sample_frequency is set from sample_rate"):
        load_extractor("fbank", sample_frequency=8000)
    with pytest.raises(ValueError, match="num_ceps cannot be larger than num_mel_bins"):
        load_extractor("mfcc", num_ceps=40)
    with pytest.raises(ValueError, match="unknown feature extractor 'resemblyzer'"):
        load_extractor("resemblyzer")
    with pytest.raises(ValueError, match="dtype must be one of float16"):
        load_extractor("fbank", dtype="int16")
    np.save(tmp_path / "cb.npy", np.zeros((4, 40)))
    with pytest.raises(ValueError, match="F=40 columns, the frames of 'fbank' have 80"):
        KmeansTokens(tmp_path / "cb.npy")
    with pytest.raises(FileNotFoundError, match="codebook not found"):
        KmeansTokens(tmp_path / "missing.npy")
    d = json.loads(json.dumps(fb.describe()))  # JSON-serialisable, and what the fingerprints see
    assert d["config"]["num_mel_bins"] == 40 and d["config"]["dtype"] == "float16" and d["code_sha256"]
    assert d["spk_toolkit_version"] == spk_toolkit.__version__ and "device" not in json.dumps(d["config"])


def test_nearest_centroid_ties_and_blocks():
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.0], [0.9, 0.1], [1.0, 0.0]])
    assert nearest_centroid(x, c).tolist() == [0, 1, 1]  # a tie goes to the lowest index
    g = torch.Generator().manual_seed(0)
    big = torch.randn(9000, 2, generator=g)  # more than one block of frames
    brute = ((big.double()[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest_centroid(big, c), brute)


# ------------------------------------------------------------------------------------------------ the docs
def _doc_blocks() -> list:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "features.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run_blocks(blocks, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "data").symlink_to(root / "data")  # the examples' relative paths: data/..., exp/...
    script = tmp_path / "example.py"
    script.write_text("\n\n".join(blocks))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_docs_examples_run(tmp_path):
    """docs/features.md: computing, reading, tokens and the plain-PyTorch DataLoader example run as written."""
    # the SpeechBrain block has its own test; the training-from-cache block is what
    # test_trainer.py::test_one_epoch_from_cached_fbank_equals_audio runs (with a smaller recipe)
    blocks = [b for b in _doc_blocks() if "speechbrain" not in b and "prepare_from_cache" not in b]
    assert len(blocks) == 3
    out = _run_blocks(blocks, tmp_path)
    assert out.splitlines()[0].startswith("48 (") and "(100, 80) 100.0" in out and "int16" in out


@pytest.mark.slow
def test_docs_example_speechbrain(tmp_path):
    pytest.importorskip("speechbrain", reason="speechbrain is not installed: the DynamicItemDataset example of "
                                              "docs/features.md was not run")
    blocks = _doc_blocks()
    _run_blocks([blocks[0], next(b for b in blocks if "speechbrain" in b)], tmp_path)
