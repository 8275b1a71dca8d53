"""The output directory is locked and self-verifying, and faults behave the same on every executor (issue 14).

Real speech (fillets): a 12-utterance subset; runs through the ``spk_inference`` CLI as users run it, in-process,
on torchrun x 2 (gloo) and on Dask x 2 (LocalCluster).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spk_toolkit.bin.cli import EXIT_FAILED
from spk_toolkit.engine import read_shard, shard_path
from spk_toolkit.io.datadir import load_kaldi_dir
from spk_toolkit.testing import load_npz, make_subset, speechlike, write_wav

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = ["--shard_duration", "4", "--num_workers", "0", "--progress", "false"]


def cli(data, out, *extra) -> list:
    return [sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data), "--output_dir", str(out),
            *COMMON, *extra]


def launch(executor: str, data, out, *extra, tmp: Path) -> list:
    """The command line of one run of ``spk_inference`` on ``executor``."""
    if executor == "torchrun":
        torchrun = ROOT / ".venv/bin/torchrun"
        return [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node=2", "-m",
                "spk_toolkit.bin.spk_inference", "--data_dir", str(data), "--output_dir", str(out), *COMMON, *extra]
    if executor == "dask":
        cfg = tmp / "parallel.yaml"
        cfg.write_text("env: local\nn_workers: 2\n")
        return cli(data, out, "--parallel", str(cfg), *extra)
    return cli(data, out, *extra)


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    return make_subset(fillets_small, tmp_path_factory.mktemp("sub") / "data")


@pytest.fixture(scope="module")
def reference(subset, tmp_path_factory):
    """One clean in-process CLI run: the outputs every other run must equal."""
    out = tmp_path_factory.mktemp("ref") / "o"
    p = run(cli(subset, out, "--output_format", "npz,kaldi_ark"))
    assert p.returncode == 0, p.stderr[-2000:]
    return out, load_npz(out / "embeddings.npz"), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def with_bad(subset, tmp_path_factory):
    """The subset plus one utterance whose audio has a NaN sample (readable header: it fails in a worker)."""
    d = tmp_path_factory.mktemp("bad")
    x = speechlike(1.5)
    x[100] = np.nan
    write_wav(d / "nan.wav", x, subtype="FLOAT")
    data = d / "data"
    data.mkdir()
    lines = (subset / "wav.scp").read_text().splitlines()
    (data / "wav.scp").write_text("\n".join(lines[:5] + [f"bad_nan {d / 'nan.wav'}"] + lines[5:]) + "\n")
    return data


def assert_equal_outputs(out: Path, ref: dict) -> None:
    got = load_npz(out / "embeddings.npz")
    assert list(got) == list(ref)
    assert max(float(np.abs(got[k] - ref[k]).max()) for k in ref) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inprocess", "torchrun", "dask"])
def test_same_faults_same_behaviour_on_every_executor(executor, subset, with_bad, reference, tmp_path):
    ref_out, ref, ref_summary = reference
    # 1. one bad file with --max_errors 0: non-zero exit, one line naming the utterance, no outputs
    p = run(launch(executor, with_bad, tmp_path / "bad", "--max_errors", "0", tmp=tmp_path))
    # the exit-code table; torchrun reports a failed child with its own exit status 1 (the same value)
    assert p.returncode == EXIT_FAILED, p.stderr[-3000:]
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("spk_inference: error:")]
    assert errs and all("'bad_nan'" in ln and "--max_errors 0" in ln for ln in errs), p.stderr[-3000:]
    assert p.stderr.count("Traceback") == (executor == "torchrun")  # torchrun's own report of a failed child
    assert not (tmp_path / "bad" / "embeddings.npz").exists()
    # 2. a garbage shard and a truncated shard from a previous run: recomputed with a warning naming each file
    out = tmp_path / "resume"
    shutil.copytree(ref_out, out)
    (out / "embeddings.npz").unlink()
    (out / "summary.json").unlink()
    garbage, truncated = shard_path(out, 1), shard_path(out, 2)
    garbage.write_bytes(os.urandom(300))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    p = run(launch(executor, subset, out, tmp=tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    for f in (garbage, truncated):
        assert any(f.name in ln and "recomputing" in ln for ln in p.stderr.splitlines()), p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_resumed"] == ref_summary["shards"] - 2 and s["shards_run"] == 2
    assert s["executor"] == {"inprocess": "in-process"}.get(executor, executor)
    assert_equal_outputs(out, ref)
    for k in (1, 2):  # the recomputed shards verify again
        read_shard(shard_path(out, k), k)


@pytest.mark.slow
def test_two_runs_at_once_never_crash_never_show_a_partial_file(subset, reference, tmp_path):
    _, ref, _ = reference
    data = make_subset(subset, tmp_path / "data4", per_speaker=1)  # 4 utterances: cheap rounds
    keys = [u.utt_id for u in load_kaldi_dir(data)]
    seen, problems, stop = [], [], threading.Event()
    current = {"dir": None}

    def reader():  # polls the outputs of the current round: whatever exists under a final name is complete
        while not stop.is_set():
            d = current["dir"]
            if d is not None:
                for name in ("embeddings.npz", "summary.json", "plan.json"):
                    p = d / name
                    try:
                        if name.endswith(".npz"):
                            z = load_npz(p)
                            if list(z) != keys:
                                problems.append((str(p), sorted(z)))
                            seen.append(name)
                        else:
                            json.loads(p.read_text())
                            seen.append(name)
                    except FileNotFoundError:
                        pass
                    except Exception as e:  # noqa: BLE001 - any partial read is the failure we look for
                        problems.append((str(p), repr(e)))
            time.sleep(0.002)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    results = []
    try:
        for r in range(4):
            out = tmp_path / f"round{r}"
            current["dir"] = out
            cmd = cli(data, out, "--lock_timeout", "-1", "--output_format", "npz,kaldi_ark")
            procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for _ in range(2)]
            outs = [p.communicate(timeout=300) for p in procs]
            results.append([(p.returncode, e[-1500:]) for p, (_, e) in zip(procs, outs)])
            assert all(p.returncode == 0 for p in procs), results[-1]
            got = load_npz(out / "embeddings.npz")
            assert list(got) == keys
            for k in keys:  # equal to a single run (the reference run embeds the same utterances)
                np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)
            s = json.loads((out / "summary.json").read_text())
            assert s["embedded"] == 4 and s["shards_resumed"] == s["shards"]  # the second waited, then resumed
    finally:
        stop.set()
        t.join()
    assert not problems, problems[:5]
    assert "embeddings.npz" in seen  # the reader did look at finished files


def test_second_run_refused_naming_the_holder(subset, tmp_path):
    from spk_toolkit.engine import ExtractionError, extract
    from spk_toolkit.io.lock import output_dir_lock

    with output_dir_lock(tmp_path / "o"):
        with pytest.raises(ExtractionError, match=rf"in use by another run: pid {os.getpid()} on "):
            extract(subset, tmp_path / "o", progress=False)
        p = run(cli(subset, tmp_path / "o"))
    assert p.returncode == 1 and f"pid {os.getpid()}" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o" / "plan.json").exists()  # refused before any work


@pytest.mark.slow
def test_changed_source_after_plan_removed_is_recomputed(subset, reference, tmp_path):
    from spk_toolkit.engine import extract

    _, ref, _ = reference
    utts = load_kaldi_dir(subset)
    # a private copy of the audio, so one file can change
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    copies = {}
    for i, u in enumerate(utts):
        copies[u.utt_id] = dst = tmp_path / f"a{i}{Path(u.path).suffix}"
        shutil.copy(u.path, dst)
        lines.append(f"{u.utt_id} {dst}")
    (data / "wav.scp").write_text("\n".join(lines) + "\n")
    s1 = extract(data, tmp_path / "o", progress=False, shard_duration=4, num_workers=0)
    victim, donor = utts[0], next(u for u in utts if u.spk_id != utts[0].spk_id)
    (tmp_path / "o" / "plan.json").unlink()
    assert Path(donor.path).suffix == Path(victim.path).suffix
    before = copies[victim.utt_id].stat()
    shutil.copy(donor.path, copies[victim.utt_id])  # same path, new audio
    # a later modification time, whatever the clock's resolution (what an edit of the file gives)
    os.utime(copies[victim.utt_id], ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    s2 = extract(data, tmp_path / "o", progress=False, shard_duration=4, num_workers=0)
    got = load_npz(tmp_path / "o" / "embeddings.npz")
    np.testing.assert_allclose(got[victim.utt_id], ref[donor.utt_id], atol=1e-6, rtol=0)  # recomputed
    assert float(np.abs(got[victim.utt_id] - ref[victim.utt_id]).max()) > 1e-2
    for u in utts[1:]:
        np.testing.assert_allclose(got[u.utt_id], ref[u.utt_id], atol=1e-6, rtol=0)
    assert s2["shards_run"] >= 1 and s2["shards_resumed"] == s1["shards"] - s2["shards_run"] > 0


@pytest.mark.slow
def test_overwrite_with_another_corpus_leaves_nothing_of_the_previous_run(subset, fillets_small, tmp_path):
    from spk_toolkit.engine import extract

    out = tmp_path / "o"
    extract(subset, out, progress=False, shard_duration=4, num_workers=0, output_format="npz,kaldi_ark,hdf5,npy_dir")
    (out / "scores").mkdir()
    (out / "scores" / "metrics.json").write_text("{}")
    before = {p.relative_to(out) for p in out.rglob("*")}
    other = tmp_path / "other"
    other.mkdir()
    picked = load_kaldi_dir(fillets_small)[-3:]
    (other / "wav.scp").write_text("".join(f"x_{u.utt_id} {u.path}\n" for u in picked))  # no speakers
    s = extract(other, out, progress=False, shard_duration=4, num_workers=0, overwrite=True)
    after = {p.relative_to(out) for p in out.rglob("*")}
    expected = {Path(n) for n in ("plan.json", "summary.json", "errors.tsv", "embeddings.npz", "shards",
                                  ".spk_toolkit.lock")}
    expected |= {Path("shards") / f"shard-{k:05d}.npz" for k in range(s["shards"])}
    assert after == expected, (sorted(map(str, after - expected)), sorted(map(str, before)))
    assert list(load_npz(out / "embeddings.npz")) == [f"x_{u.utt_id}" for u in picked]


@pytest.mark.slow
def test_errors_in_resumed_shards_count_for_max_errors(with_bad, tmp_path):
    from spk_toolkit.engine import ExtractionError, extract

    out = tmp_path / "o"
    s = extract(with_bad, out, progress=False, shard_duration=4, num_workers=0)  # skip: 1 error recorded
    assert s["errors"] == 1
    p = run(cli(with_bad, out, "--max_errors", "0"))  # nothing left to compute, the error is in a resumed shard
    assert p.returncode == 1 and "'bad_nan'" in p.stderr and "--max_errors 0" in p.stderr, p.stderr[-2000:]
    with pytest.raises(ExtractionError, match="utterance 'bad_nan'"):
        extract(with_bad, out, progress=False, shard_duration=4, num_workers=0, on_error="raise")


@pytest.mark.slow
def test_corrupt_plan_named(subset, tmp_path):
    from spk_toolkit.engine import ExtractionError, extract

    out = tmp_path / "o"
    extract(subset, out, progress=False, shard_duration=4, num_workers=0)
    (out / "plan.json").write_text('{"version": 2, "fingerp')
    with pytest.raises(ExtractionError, match=r"plan\.json is not a valid shard plan"):
        extract(subset, out, progress=False, shard_duration=4, num_workers=0)
    p = run(cli(subset, out))
    assert p.returncode == 1 and "plan.json is not a valid shard plan" in p.stderr and "Traceback" not in p.stderr
