"""Bad input policy (docs/bad_input.md): each kind gets its stated behaviour and a message naming the utterance;
no NaN is ever written; good utterances are intact."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import soxr

from spk_toolkit.backends.base import EmbeddingModel, load_model
from spk_toolkit.engine import ExtractionError, extract
from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import CorpusError, load_kaldi_dir
from spk_toolkit.testing import speechlike, write_wav


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# utt id -> (expected outcome, substring of the reason in errors.tsv)
BAD = {
    "bad_missing": "file not found",
    "bad_empty": "empty file (0 bytes)",
    "bad_truncated_header": "unreadable audio",
    "bad_not_audio": "unreadable audio",
    "bad_nan": "non-finite (NaN/inf) samples",
    "bad_inf": "non-finite (NaN/inf) samples",
    "bad_zeros": "silent audio",
    "bad_short": "too short",
    "bad_pipe": "pass --allow_pipes",
}
GOOD_CONVERTED = ("conv_8ch", "conv_8k", "conv_48k")


@pytest.fixture(scope="module")
def model():
    return load_model("resemblyzer")


@pytest.fixture(scope="module")
def corpus(fillets_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    utts = load_kaldi_dir(fillets_small)
    good = [min((u for u in utts if u.spk_id == s), key=lambda u: u.duration) for s in ("cs_m", "nl_v")]
    x16, _ = read_audio(good[0].path, 16000)
    write_wav(d / "8ch.wav", np.repeat(x16[:, None], 8, axis=1), 16000, subtype="FLOAT")
    write_wav(d / "8k.wav", soxr.resample(x16, 16000, 8000, quality="VHQ"), 8000, subtype="FLOAT")
    write_wav(d / "48k.wav", soxr.resample(x16, 16000, 48000, quality="VHQ"), 48000, subtype="FLOAT")
    (d / "empty.wav").write_bytes(b"")
    write_wav(d / "ok.wav", speechlike(1.0))
    (d / "truncated.wav").write_bytes((d / "ok.wav").read_bytes()[:22])
    (d / "not_audio.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    x = speechlike(1.0)
    x[100:200] = np.nan
    write_wav(d / "nan.wav", x, subtype="FLOAT")
    x = speechlike(1.0)
    x[5] = np.inf
    write_wav(d / "inf.wav", x, subtype="FLOAT")
    write_wav(d / "zeros.wav", np.zeros(16000, np.float32))
    write_wav(d / "short.wav", speechlike(0.05))
    entries = [(u.utt_id, u.path) for u in good] + [
        ("bad_missing", str(d / "missing.wav")), ("bad_empty", str(d / "empty.wav")),
        ("bad_truncated_header", str(d / "truncated.wav")), ("bad_not_audio", str(d / "not_audio.wav")),
        ("bad_nan", str(d / "nan.wav")), ("bad_inf", str(d / "inf.wav")), ("bad_zeros", str(d / "zeros.wav")),
        ("bad_short", str(d / "short.wav")), ("bad_pipe", f"cat {d / '8ch.wav'} |"),
        ("conv_8ch", str(d / "8ch.wav")), ("conv_8k", str(d / "8k.wav")), ("conv_48k", str(d / "48k.wav"))]
    data = d / "data"
    data.mkdir()
    (data / "wav.scp").write_text("".join(f"{k} {p}\n" for k, p in entries))
    return data, [u.utt_id for u in good], d


@pytest.fixture(scope="module")
def skip_run(corpus, model, tmp_path_factory):
    data, good, _ = corpus
    out = tmp_path_factory.mktemp("skip_out")
    caplog_records = []
    handler = logging.Handler()
    handler.emit = caplog_records.append
    logging.getLogger("spk_toolkit").addHandler(handler)
    try:
        summary = extract(data, out, model=model, num_workers=0, progress=False, shard_duration=2.0)
    finally:
        logging.getLogger("spk_toolkit").removeHandler(handler)
    return out, summary, [r.getMessage() for r in caplog_records if r.levelno >= logging.WARNING]


def test_each_bad_kind_is_skipped_with_its_reason(skip_run, corpus):
    out, summary, warnings = skip_run
    data, good, _ = corpus
    rows = [line.split("\t") for line in (out / "errors.tsv").read_text().splitlines()[1:]]
    reasons = {r[0]: r[2] for r in rows}
    assert set(reasons) == set(BAD)  # exactly the bad ones
    for utt, why in BAD.items():
        assert why in reasons[utt], (utt, reasons[utt])
        assert any(utt in w for w in warnings), f"no warning names {utt}"  # a message naming the utterance
    assert summary["errors"] == len(BAD) and summary["embedded"] == len(good) + len(GOOD_CONVERTED)
    emb = load_npz(out / "embeddings.npz")
    assert list(emb) == good + list(GOOD_CONVERTED)  # input order, bad ones absent
    assert all(np.isfinite(v).all() and v.shape == (256,) and np.linalg.norm(v) > 0.5 for v in emb.values())
    from spk_toolkit.engine import read_shard

    for shard in (out / "shards").glob("shard-*.npz"):  # no NaN anywhere on disk either
        sd = read_shard(shard, int(shard.stem.split("-")[1]))
        assert all(np.isfinite(v).all() for v in sd.outputs["embedding"]) and set(sd.keys).isdisjoint(BAD)


def test_multichannel_and_other_rates_are_good_input(skip_run, corpus, model):
    out, _, _ = skip_run
    data, good, _ = corpus
    emb = load_npz(out / "embeddings.npz")
    ref = emb[good[0]]
    # 8 identical channels downmix to the same samples: the same embedding (batch invariance)
    assert cos(emb["conv_8ch"], ref) > 0.9999
    # 48 kHz is resampled to 16 kHz: nearly the same signal
    assert cos(emb["conv_48k"], ref) > 0.99
    # 8 kHz lost everything above 4 kHz, still the same speaker: far closer to its source than to another speaker
    assert cos(emb["conv_8k"], ref) > 0.75 and cos(emb["conv_8k"], ref) > cos(emb["conv_8k"], emb[good[1]])


def test_pipe_runs_only_with_allow_pipes(corpus, model, tmp_path, skip_run):
    data, good, d = corpus
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    (pipe_dir / "wav.scp").write_text(f"piped cat {d / '8ch.wav'} |\n")
    s = extract(pipe_dir, tmp_path / "o", model=model, allow_pipes=True, num_workers=0, progress=False)
    assert s["embedded"] == 1 and s["errors"] == 0
    ref = load_npz(skip_run[0] / "embeddings.npz")["conv_8ch"]
    assert cos(load_npz(tmp_path / "o" / "embeddings.npz")["piped"], ref) > 0.9999


def test_on_error_raise_names_utterance_and_path(corpus, model, tmp_path):
    data, good, d = corpus
    only = tmp_path / "d"
    only.mkdir()
    (only / "wav.scp").write_text(f"u_ok {d / 'ok.wav'}\nu_nan {d / 'nan.wav'}\n")
    with pytest.raises(ExtractionError, match=r"u_nan.*nan\.wav.*non-finite"):
        extract(only, tmp_path / "o", model=model, on_error="raise", num_workers=0, progress=False)


def test_max_errors(corpus, model, tmp_path):
    data, good, d = corpus
    only = tmp_path / "d"
    only.mkdir()
    (only / "wav.scp").write_text("".join(f"u{i} {d / n}\n" for i, n in enumerate(["nan.wav", "inf.wav", "zeros.wav"])))
    with pytest.raises(ExtractionError, match="max_errors 1"):
        extract(only, tmp_path / "o", model=model, max_errors=1, num_workers=0, progress=False)


def test_min_duration_guard(corpus, model, tmp_path):
    data, good, d = corpus
    only = tmp_path / "d"
    only.mkdir()
    (only / "wav.scp").write_text(f"u_ok {d / 'ok.wav'}\n")
    with pytest.raises(ExtractionError, match="nothing was stored"):  # the only utterance is too short
        extract(only, tmp_path / "o", model=model, min_duration=1.5, num_workers=0, progress=False)
    assert "u_ok" in (tmp_path / "o" / "errors.tsv").read_text() and "too short" in (tmp_path / "o" / "errors.tsv").read_text()
    s = extract(only, tmp_path / "o", model=model, min_duration=0.5, num_workers=0, progress=False, overwrite=True)
    assert (s["embedded"], s["errors"]) == (1, 0)


class NaNModel(EmbeddingModel):
    """Finite embeddings except for utterances longer than 1.5 s (a model blowing up on some input)."""

    name = "nan_test"
    embed_dim = 4

    def embed(self, wav, lengths):
        import torch

        e = torch.stack([wav.abs().sum(1), lengths.float(), torch.ones(len(lengths)), wav.max(1).values], 1)
        e[lengths > 24000] = float("nan")
        return e


def test_non_finite_embedding_is_an_error_never_written(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_wav(tmp_path / "a.wav", speechlike(1.0))
    write_wav(tmp_path / "b.wav", speechlike(2.0, seed=1))
    (d / "wav.scp").write_text(f"short_ok {tmp_path / 'a.wav'}\nlong_nan {tmp_path / 'b.wav'}\n")
    s = extract(d, tmp_path / "o", model=NaNModel(), num_workers=0, progress=False)
    assert s["embedded"] == 1 and s["errors"] == 1
    emb = load_npz(tmp_path / "o" / "embeddings.npz")
    assert list(emb) == ["short_ok"] and np.isfinite(emb["short_ok"]).all()
    assert "long_nan" in (tmp_path / "o" / "errors.tsv").read_text()
    assert "non-finite embedding" in (tmp_path / "o" / "errors.tsv").read_text()
    with pytest.raises(ExtractionError, match="long_nan.*non-finite embedding"):
        extract(d, tmp_path / "o2", model=NaNModel(), on_error="raise", num_workers=0, progress=False)


def test_malformed_corpus_refused_before_any_work(tmp_path):
    write_wav(tmp_path / "a.wav", speechlike(1.0))
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "wav.scp").write_text(f"u1 {tmp_path / 'a.wav'}\nu2 {tmp_path / 'a.wav'}\nu1 {tmp_path / 'a.wav'}\n")
    with pytest.raises(CorpusError, match="duplicate utterance id 'u1'"):
        extract(dup, tmp_path / "o1", model=NaNModel(), progress=False)
    nopath = tmp_path / "nopath"
    nopath.mkdir()
    (nopath / "wav.scp").write_text(f"u1 {tmp_path / 'a.wav'}\nu_lonely\n")
    with pytest.raises(CorpusError, match=r"wav.scp:2.*u_lonely"):
        extract(nopath, tmp_path / "o2", model=NaNModel(), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing started


def test_trials_naming_unknown_utterances(skip_run, corpus, tmp_path):
    import spk_toolkit

    out, _, _ = skip_run
    data, good, _ = corpus
    trials = tmp_path / "trials.txt"
    trials.write_text(f"{good[0]} {good[1]} nontarget\n{good[0]} bad_nan target\n{good[1]} never_seen nontarget\n")
    with pytest.raises(ValueError, match=r"(?s)2 .*(bad_nan|never_seen)"):
        spk_toolkit.score_trials(out / "embeddings.npz", trials)
