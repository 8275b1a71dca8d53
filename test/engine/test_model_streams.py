"""``model_streams``: concurrent forwards give the outputs, errors and shard behaviour of one stream, on real speech."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from spk_toolkit import load_embeddings
from spk_toolkit.data import UtteranceDataset
from spk_toolkit.engine import ExtractionError, extract
from spk_toolkit.io.datadir import load_kaldi_dir

import espnet_helpers as H


@pytest.fixture(scope="module")
def ecapa():
    return H.build("ecapa", seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [1, 0], ids=["decoding_worker", "decoding_in_streams"])
def test_streams_equal_one_stream(fillets_small, ecapa, tmp_path, monkeypatch, num_workers):
    # small batches so that both streams get many batches from several shards
    kw = dict(model=ecapa, progress=False, batch_bins=16000 * 12, shard_duration=40, torch_threads=2)
    one = extract(fillets_small, tmp_path / "one", model_streams=1, **kw)
    threads, decoders, embed, load = set(), set(), ecapa.embed, UtteranceDataset.load

    def recording_embed(wav, lengths):
        threads.add((threading.current_thread().name, torch.get_num_threads()))
        return embed(wav, lengths)

    def recording_load(self, i):
        decoders.add(threading.current_thread().name)  # only seen in this process (not in a worker process)
        return load(self, i)

    monkeypatch.setattr(ecapa, "embed", recording_embed)
    monkeypatch.setattr(UtteranceDataset, "load", recording_load)
    two = extract(fillets_small, tmp_path / "two", model_streams=2, num_workers=num_workers, **kw)
    # the forwards ran in two pool threads with 2 // 2 = 1 intra-op thread each
    assert {n.rsplit("_", 1)[0] for n, _ in threads} == {"spk-model"} and len(threads) == 2, threads
    assert {t for _, t in threads} == {1}
    # with num_workers=0 the same two stream threads decoded the audio; otherwise a worker process did
    assert decoders == ({n for n, _ in threads} if num_workers == 0 else set()), decoders
    assert one["embedded"] == two["embedded"] == len(load_kaldi_dir(fillets_small)) and two["shards"] >= 3
    a, b = load_embeddings(tmp_path / "one" / "embeddings.npz"), load_embeddings(tmp_path / "two" / "embeddings.npz")
    assert list(a) == list(b)  # same utterances, same (wav.scp) order
    # 1 intra-op thread per stream vs 2 threads: same maths, float32 summation order may differ
    worst = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)
    print(f"max relative difference 1 vs 2 streams: {worst:.2e}")
    assert worst < 1e-5, worst
    sa = load_embeddings(tmp_path / "one" / "spk_embeddings.npz")
    sb = load_embeddings(tmp_path / "two" / "spk_embeddings.npz")
    assert sorted(sa) == sorted(sb) and all(np.allclose(sa[s], sb[s], rtol=1e-5, atol=1e-6) for s in sa)


def test_streams_restore_thread_count(fillets_small, ecapa, tmp_path):
    before = torch.get_num_threads()
    extract(fillets_small, tmp_path, model=ecapa, progress=False, model_streams=2, num_workers=0)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("num_workers", [1, 0], ids=["decoding_worker", "decoding_in_streams"])
def test_streams_bad_input(bad_dir, ecapa, tmp_path, num_workers):
    data, good = bad_dir
    s = extract(data, tmp_path / "skip", model=ecapa, progress=False, model_streams=2, batch_bins=16000 * 4,
                num_workers=num_workers)
    assert s["embedded"] == 3 and s["errors"] == 5
    rows = [l.split("\t")[0] for l in (tmp_path / "skip" / "errors.tsv").read_text().splitlines()[1:]]
    assert sorted(rows) == ["bad_corrupt", "bad_empty", "bad_missing", "bad_nan", "bad_short"]
    assert sorted(load_embeddings(tmp_path / "skip" / "embeddings.npz")) == sorted(good)
    with pytest.raises(ExtractionError, match=r"utterance 'bad_\w+' \(.*\.wav\)"):
        extract(data, tmp_path / "raise", model=ecapa, progress=False, model_streams=2, on_error="raise",
                num_workers=num_workers)
    # the run stopped at the bad utterance: the shards finished before it stay on disk, nothing was merged
    assert not (tmp_path / "raise" / "embeddings.npz").exists()


def test_streams_validation():
    with pytest.raises(ValueError, match="model_streams"):
        extract("unused", "unused", model_streams=0)


def test_resemblyzer_decoding_in_streams_equals_default(small_run, fillets_small, tmp_path):
    # the default model's VAD preparation (webrtcvad) and mel run in the stream threads: same embeddings as the
    # default set-up (one decoding worker, one stream), which small_run used
    out, summary = small_run
    s = extract(fillets_small, tmp_path, progress=False, shard_duration=60, model_streams=2, num_workers=0)
    assert s["embedded"] == summary["embedded"] == len(load_kaldi_dir(fillets_small))
    a, b = load_embeddings(out / "embeddings.npz"), load_embeddings(tmp_path / "embeddings.npz")
    assert list(a) == list(b)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst  # unit-norm GE2E embeddings; 1 vs 2 intra-op threads differ by float32 rounding
