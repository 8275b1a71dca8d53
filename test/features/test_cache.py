"""The offline cache on real speech (issue 16, acceptance criteria 3, 4 and 5).

A changed extractor config is detected and named (resume and read); a killed run resumes to an identical cache;
two runs on one cache directory do not corrupt it; a DataLoader with 2 workers reads an HDF5 cache correctly
(handles reopened after fork) and partial reads return the requested frames only; torchrun x 2 and Dask x 2 build
the same cache as one process. Runs go through the ``cache_features`` CLI as users run it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults_helpers import start_until, test_rng

import spk_toolkit
from spk_toolkit.engine import ExtractionError
from spk_toolkit.features.cache import StaleCacheError
from spk_toolkit.features.cache import CacheDataset, collate_frames
from spk_toolkit.io.atomic import is_temporary
from spk_toolkit.testing import make_subset

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FORMATS = "hdf5,npz"


def cli(data, out, *extra) -> list:
    return [sys.executable, "-m", "spk_toolkit.bin.cache_features", "--config", str(ROOT / "conf/cache_fbank.yaml"),
            "--data_dir", str(data), "--output_dir", str(out), "--output_format", FORMATS, "--num_workers", "0",
            "--progress", "false", *extra]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def load_all(out: Path, fmt: str = "hdf5") -> dict:
    c = spk_toolkit.open_cache(out, fmt=fmt)
    return {k: c[k] for k in c}


def assert_same(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(got[k], ref[k])


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    return make_subset(fillets_small, tmp_path_factory.mktemp("sub") / "data")


@pytest.fixture(scope="module")
def reference(fillets_small, tmp_path_factory):
    """One clean CLI run over fillets_small (48 utterances) with many small shards."""
    out = tmp_path_factory.mktemp("ref") / "o"
    p = run(cli(fillets_small, out, "--shard_duration", "2.5"))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, load_all(out), json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------------------- criterion 3
def test_changed_extractor_config_detected_and_named(subset, tmp_path):
    out = tmp_path / "o"
    spk_toolkit.cache_features(subset, out, "fbank", {"num_mel_bins": 80}, progress=False, num_workers=0)
    # resuming with another config: refused, naming what changed
    with pytest.raises(ExtractionError, match=r"the model changed: config\.num_mel_bins: 80 -> 64"):
        spk_toolkit.cache_features(subset, out, "fbank", {"num_mel_bins": 64}, progress=False, num_workers=0)
    p = run(cli(subset, out, "--extractor_conf", "{num_mel_bins: 80, frame_shift: 12}", "--output_format", "hdf5"))
    assert p.returncode == 1 and "config.frame_shift: 10.0 -> 12.0" in p.stderr and "Traceback" not in p.stderr
    # reading it for another config: refused, naming every difference
    with pytest.raises(StaleCacheError, match=r"config\.num_mel_bins: 80 -> 64; outputs\.fbank\.shape: \[80\] -> "
                                              r"\[64\]"):
        spk_toolkit.open_cache(out, extractor="fbank", extractor_conf={"num_mel_bins": 64})
    with pytest.raises(StaleCacheError, match=r"config\.dtype: \"float32\" -> \"float16\""):
        spk_toolkit.open_cache(out, extractor=spk_toolkit.load_extractor("fbank", dtype="float16"))
    # new code or another package version: named too (the recorded hashes stand for the code that computed it)
    rec = spk_toolkit.open_cache(out).extractor
    with pytest.raises(StaleCacheError, match=rf'code_sha256: "{rec["code_sha256"]}" -> "0+"; spk_toolkit_version: '
                                              rf'"{spk_toolkit.__version__}" -> "0.0.1"'):
        spk_toolkit.open_cache(out, extractor={**rec, "code_sha256": "0" * 64, "spk_toolkit_version": "0.0.1"})
    assert len(spk_toolkit.open_cache(out, extractor="fbank", extractor_conf={"num_mel_bins": 80})) == 12
    assert len(spk_toolkit.open_cache(out, extractor={**rec, "spk_toolkit_version": "9"},
                                      ignore=["spk_toolkit_version"])) == 12
    # an unfinished cache is not read
    (out / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="no finished cache"):
        spk_toolkit.open_cache(out)


def test_changed_codebook_and_inner_config_named(subset, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(16, 40)))
    np.save(tmp_path / "b.npy", rng.normal(size=(16, 40)))
    conf = {"codebook": str(tmp_path / "a.npy"), "features_conf": {"num_mel_bins": 40}}
    spk_toolkit.cache_features(subset, tmp_path / "o", "kmeans_tokens", conf, progress=False, num_workers=0)
    with pytest.raises(ExtractionError, match=r"config\.codebook_sha256"):
        spk_toolkit.cache_features(subset, tmp_path / "o", "kmeans_tokens",
                                   {**conf, "codebook": str(tmp_path / "b.npy")}, progress=False, num_workers=0)
    with pytest.raises(StaleCacheError, match=r"config\.features\.config\.low_freq: 20\.0 -> 40\.0"):
        spk_toolkit.open_cache(tmp_path / "o", extractor="kmeans_tokens",
                               extractor_conf={**conf, "features_conf": {"num_mel_bins": 40, "low_freq": 40}})


@pytest.mark.slow
def test_killed_run_resumes_to_an_identical_cache(fillets_small, reference, tmp_path):
    """Three SIGKILLs, each right after a drawn shard commit of its run (a fault point, not a race), then a rerun:
    the cache equals the uninterrupted one bit for bit. The draws come from a printed seed (``SPK_TEST_SEED``)."""
    ref_out, ref, ref_summary = reference
    n_shards = ref_summary["shards"]
    assert n_shards >= 40
    rng, seed = test_rng("cache kill")
    out = tmp_path / "run"

    def n_done() -> int:
        d = out / "shards"
        return len(list(d.glob("shard-*.npz"))) if d.is_dir() else 0

    for _ in range(3):
        before = n_done()
        k = rng.randint(1, n_shards // 4)
        proc = start_until(cli(fillets_small, out, "--shard_duration", "2.5"), f"shard_committed:{k}", tmp_path,
                           env=ENV, cwd=ROOT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert n_done() == before + k, seed
    assert 0 < n_done() < n_shards and not (out / "summary.json").exists()
    p = run(cli(fillets_small, out, "--shard_duration", "2.5"))
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_resumed"] > 0 and s["shards_resumed"] + s["shards_run"] == n_shards
    for fmt in ("hdf5", "npz"):
        assert_same(load_all(out, fmt), ref)  # bit-identical to the clean run
    assert not [p.name for p in out.rglob("*") if is_temporary(p.name)]  # no partial file of the killed runs


@pytest.mark.slow
def test_two_runs_on_one_cache_directory_do_not_corrupt_it(subset, tmp_path):
    ref_out = tmp_path / "ref"
    assert run(cli(subset, ref_out)).returncode == 0
    ref = load_all(ref_out)
    for r in range(3):
        out = tmp_path / f"round{r}"
        procs = [subprocess.Popen(cli(subset, out, "--lock_timeout", "-1", "--shard_duration", "3"), cwd=ROOT,
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
        assert_same(load_all(out), ref)
        assert_same(load_all(out, "npz"), ref)
        s = json.loads((out / "summary.json").read_text())
        assert s["shards_resumed"] == s["shards"]  # the second waited for the lock, then found everything done
    # without waiting, the second run is refused at once, naming the holder, and writes nothing
    from spk_toolkit.io.lock import output_dir_lock

    with output_dir_lock(tmp_path / "held"):
        p = run(cli(subset, tmp_path / "held"))
    assert p.returncode == 1 and f"pid {os.getpid()}" in p.stderr and not (tmp_path / "held" / "plan.json").exists()


# ------------------------------------------------------------------------------------------- criterion 4
class _PidDataset(CacheDataset):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        r = self.cache.reader
        item["pid"], item["reader_pid"] = os.getpid(), r._pid
        return item


def _collate(items):
    out = collate_frames(items)
    out["pid"] = [it["pid"] for it in items]
    out["reader_pid"] = [it["reader_pid"] for it in items]
    return out


@pytest.mark.parametrize("given", ["cache", "path"])
def test_dataloader_with_two_workers_reads_hdf5_after_fork(reference, given):
    ref_out, ref, _ = reference
    cache = spk_toolkit.open_cache(ref_out, fmt="hdf5")
    first = next(iter(ref))
    np.testing.assert_array_equal(cache[first], ref[first])  # the parent's h5py handle is open before the fork
    parent_handle = cache.reader._h
    ds = _PidDataset(cache if given == "cache" else ref_out, open_kwargs=None if given == "cache" else {"fmt": "hdf5"})
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=_collate,
                                     multiprocessing_context="fork")
    seen, pids = {}, set()
    for b in dl:
        for i, k in enumerate(b["ids"]):
            seen[k] = b["feats"][i, : b["lengths"][i]].numpy()
            assert b["reader_pid"][i] == b["pid"][i] != os.getpid()  # the worker reopened its own handle
            pids.add(b["pid"][i])
    assert len(pids) == 2
    assert_same(seen, ref)
    assert cache.reader._h is parent_handle and cache.reader._pid == os.getpid()  # the parent's stays usable
    np.testing.assert_array_equal(cache[first], ref[first])


@pytest.mark.parametrize("fmt", ["hdf5", "npz"])
def test_partial_reads_return_the_requested_frames_only(reference, fmt, tmp_path):
    ref_out, ref, _ = reference
    cache = spk_toolkit.open_cache(ref_out, fmt=fmt)
    rng = np.random.default_rng(0)
    for k in list(ref)[:12]:
        n = len(ref[k])
        assert cache.num_frames(k) == n
        for s, e in [(0, n), (0, 1), (n - 1, n), (n, n)] + [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(5)]:
            got = cache.read(k, int(s), int(e))
            assert got.shape == (e - s, 80) and got.dtype == np.float32
            np.testing.assert_array_equal(got, ref[k][s:e])
    k = next(iter(ref))
    n = len(ref[k])
    for s, e in [(-1, 5), (5, 4), (0, n + 1)]:
        with pytest.raises(ValueError, match=rf"frames \[{s}, {e}\) outside the array's {n} frames"):
            cache.read(k, s, e)
    with pytest.raises(TypeError, match="start_frame must be an integer"):
        cache.read(k, 1.5, 3)
    with pytest.raises(KeyError):
        cache.read("no-such-utterance", 0, 1)
    # fixed crops of a training epoch, as partial reads through a DataLoader
    segs = [(k, 10, 110) for k in ref if len(ref[k]) >= 110][:6]
    dl = torch.utils.data.DataLoader(CacheDataset(cache, segments=segs), batch_size=3, collate_fn=collate_frames)
    got = [x for b in dl for x in b["feats"]]
    assert len(got) == len(segs)
    for (k, s, e), x in zip(segs, got):
        np.testing.assert_array_equal(x.numpy(), ref[k][s:e])


def test_partial_reads_npy_dir_and_kaldi_ark(subset, tmp_path):
    s = spk_toolkit.cache_features(subset, tmp_path, "fbank", output_format="npy_dir,kaldi_ark", progress=False,
                                   num_workers=0)
    assert s["embedded"] == 12
    full = load_all(tmp_path, "npy_dir")
    for fmt in ("npy_dir", "kaldi_ark"):
        c = spk_toolkit.open_cache(tmp_path, fmt=fmt)
        for k, v in full.items():
            assert c.num_frames(k) == len(v)
            np.testing.assert_array_equal(c.read(k, 3, 17), v[3:17])


# ------------------------------------------------------------------------------------------- criterion 5
@pytest.mark.slow
@pytest.mark.parametrize("executor", ["torchrun", "dask"])
def test_torchrun_and_dask_build_the_same_cache_as_one_process(executor, subset, tmp_path):
    ref_out = tmp_path / "one"
    p = run(cli(subset, ref_out, "--shard_duration", "3"))
    assert p.returncode == 0, p.stderr[-3000:]
    ref = load_all(ref_out)
    out = tmp_path / executor
    if executor == "torchrun":
        torchrun = ROOT / ".venv/bin/torchrun"
        cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node=2", "-m",
               "spk_toolkit.bin.cache_features", *cli(subset, out, "--shard_duration", "3")[3:]]
    else:
        cfg = tmp_path / "parallel.yaml"
        cfg.write_text("env: local\nn_workers: 2\n")
        cmd = cli(subset, out, "--shard_duration", "3", "--parallel", str(cfg))
    p = run(cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("utterances :") == 1  # one summary, from the driver
    s = json.loads((out / "summary.json").read_text())
    assert s["executor"] == executor and s["world_size"] == 2 and s["embedded"] == 12
    assert all(w["shards"] for w in s["workers"].values()) and len(s["workers"]) == 2  # both took part
    for fmt in ("hdf5", "npz"):
        assert_same(load_all(out, fmt), ref)  # values equal


def test_writer_options_checked_before_any_work(subset, tmp_path):
    from spk_toolkit.engine import ExtractOptions

    with pytest.raises(ValueError, match="unknown hdf5 writer option.*compresion.*accepted: compression"):
        ExtractOptions(output_format="hdf5", writer_options={"hdf5": {"compresion": "lzf"}})
    with pytest.raises(ValueError, match="compression must be one of gzip, lzf, none; got 'zstd'"):
        ExtractOptions(output_format="h5", writer_options={"h5": {"compression": "zstd"}})
    with pytest.raises(ValueError, match="writer_options given for npz, which is not an output format"):
        ExtractOptions(output_format="hdf5", writer_options={"npz": {"compress": False}})
    assert ExtractOptions(output_format="h5", writer_options={"h5": {"compression": "none"}}).writer_options == \
        {"hdf5": {"compression": "none"}}
    with pytest.raises(ValueError, match="unknown hdf5 writer option"):
        spk_toolkit.cache_features(subset, tmp_path / "o", writer_options={"hdf5": {"level": 3}}, progress=False)
    assert not (tmp_path / "o" / "plan.json").exists()
