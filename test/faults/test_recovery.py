"""Recovery: SIGKILL the CLI at each stage of a run (deterministic fault points), resume, and get bit-identical outputs; plan reuse and refusal."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults_helpers import start_until, test_rng

from spk_toolkit.engine import read_shard
from spk_toolkit.io.atomic import is_temporary
from spk_toolkit.io.datadir import load_kaldi_dir
from spk_toolkit.testing import load_npz, make_subset

ROOT = Path(__file__).resolve().parents[2]
SHARD_S = 4.5  # two short (2-3 s) utterances per shard: six shards, so kills land between and inside shards


def cli(data: Path, out: Path) -> list:
    return [sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data), "--output_dir", str(out),
            "--shard_duration", str(SHARD_S), "--num_workers", "0", "--output_format", "npz,kaldi_ark",
            "--progress", "false", "--batch_bins", "1"]  # one utterance per batch: moments inside a shard


def n_shard_files(out: Path) -> int:
    d = out / "shards"
    return len(list(d.glob("shard-*.npz"))) if d.is_dir() else 0


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    return make_subset(fillets_small, tmp_path_factory.mktemp("sub") / "data")


def _check_committed(out: Path, subset: Path) -> int:
    """Whatever is under a final shard name is complete (verifies against the plan and its checksum); returns
    the number of committed shards."""
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else None
    utts = load_kaldi_dir(subset)
    files = sorted((out / "shards").glob("shard-*.npz")) if (out / "shards").is_dir() else []
    for p in files:
        k = int(p.stem.split("-")[1])
        sd = read_shard(p, k, [utts[i].utt_id for i in plan["shards"][k]])
        assert len(sd.keys) + len(sd.errors) == len(plan["shards"][k])
    return len(files)


@pytest.mark.slow
def test_sigkill_at_every_stage_then_resume_is_bit_identical(subset, tmp_path):
    """SIGKILL at start-up, inside a shard, while a shard file is being written, between shards, after the last
    commit and during the merge (each reached exactly through the engine's fault points), each run resuming the
    previous one; the final rerun is bit-identical to an uninterrupted run. Which batch and which shards are
    drawn from a printed seed (replay: ``SPK_TEST_SEED``)."""
    # The reference runs through the same CLI with the same thread count as the killed runs: float32 results
    # may differ in the last bit between 1 and 2 intra-op threads (seen on an AMD EPYC host).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    r = subprocess.run(cli(subset, ref), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    shards = json.loads((ref / "plan.json").read_text())["shards"]
    n_shards = len(shards)
    assert n_shards >= 6 and sum(len(s) > 1 for s in shards[: n_shards - 4]) >= 1, shards
    rng, seed = test_rng("sigkill")
    out = tmp_path / "run"
    kills = []

    def kill_at(point: str, how: str) -> int:
        proc = start_until(cli(subset, out), point, tmp_path, env=env, cwd=ROOT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _check_committed(out, subset)
        kills.append((how, point, done))
        assert not (out / "summary.json").exists(), (kills, seed)
        return done

    # 1. start-up: the lock is held, nothing else is written
    assert kill_at("startup", "start-up") == 0 and not (out / "plan.json").exists()
    # 2. inside a shard: after the k-th batch that leaves its shard unfinished (one utterance per batch)
    inside = [(j, b) for j, s in enumerate(shards[: n_shards - 4]) for b in range(len(s) - 1)]
    k = rng.randint(1, len(inside))
    assert kill_at(f"batch_consumed:{k}", "mid-shard") == inside[k - 1][0], (kills, seed)
    # 3. while the k-th shard of the rerun is written (complete under its temporary name, not renamed)
    before = kills[-1][2]
    k = rng.randint(1, n_shards - before - 3)
    assert kill_at(f"shard_writing:{k}", "writing a shard") == before + k - 1, (kills, seed)
    assert [p for p in (out / "shards").iterdir() if is_temporary(p.name)], "no partial shard left by the kill"
    # 4. between shards: right after the k-th commit of the rerun
    before = kills[-1][2]
    k = rng.randint(1, n_shards - before - 1)
    assert kill_at(f"shard_committed:{k}", "between shards") == before + k, (kills, seed)
    # 5. after the last commit, before the merge; 6. during the merge, after its first output file
    assert kill_at("shards_done", "after the last commit") == n_shards, (kills, seed)
    assert kill_at("merge_output:1", "during the merge") == n_shards, (kills, seed)
    print("kills:", kills)
    p = subprocess.run(cli(subset, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"({n_shards} resumed from a previous run)" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_resumed"] == n_shards and s["shards"] == n_shards, (kills, seed)
    # bit-identical to the uninterrupted run, no duplicate and no missing utterance
    got, want = load_npz(out / "embeddings.npz"), load_npz(ref / "embeddings.npz")
    assert list(got) == list(want) == [u.utt_id for u in load_kaldi_dir(subset)]
    for key in want:
        assert got[key].tobytes() == want[key].tobytes(), (key, kills, seed)
    assert (out / "embeddings.ark").read_bytes() == (ref / "embeddings.ark").read_bytes()
    g, w = load_npz(out / "spk_embeddings.npz"), load_npz(ref / "spk_embeddings.npz")
    assert list(g) == list(w) and all(g[key].tobytes() == w[key].tobytes() for key in w)
    assert (out / "errors.tsv").read_text() == (ref / "errors.tsv").read_text()
    keys = [key for z in sorted((out / "shards").glob("shard-*.npz")) for key in read_shard(z, int(z.stem[6:])).keys]
    assert sorted(keys) == sorted(want) and len(keys) == len(set(keys))
    assert not [p for p in (out / "shards").iterdir() if is_temporary(p.name)]  # partial shards were cleaned up


def _moments(rng, shards, done: int) -> str:
    """A fault point the next run reaches for sure, given ``done`` committed shards (one utterance per batch)."""
    rest = shards[done:]
    inner = sum(len(s) - 1 for s in rest)
    choices = ["startup"]
    if rest:  # small steps, so most of the 20 moments fall inside or between shards
        choices += ["shard_committed:1"]
        if inner:
            choices += [f"batch_consumed:{rng.randint(1, min(inner, 2))}"] * 2
    else:
        choices += ["shards_done", "merge_output:1"]
    return rng.choice(choices)


@pytest.mark.slow
def test_sigterm_at_20_random_moments_exit_143_one_line_and_the_rerun_is_bit_identical(subset, tmp_path):
    """SIGTERM at 20 moments drawn from a printed seed (replay: ``SPK_TEST_SEED``), with a decoding worker running,
    each run resuming the previous one: every time exit 143 and exactly one stderr line (no stray traceback from a
    child process); the final rerun equals an uninterrupted run bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [*cli(subset, out), "--num_workers", "1"]  # the last --num_workers wins

    ref = tmp_path / "ref"
    r = subprocess.run(cmd(ref), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    shards = json.loads((ref / "plan.json").read_text())["shards"]
    rng, seed = test_rng("sigterm")
    out = tmp_path / "run"
    moments = []
    for _ in range(20):
        done = n_shard_files(out)
        point = _moments(rng, shards, done)
        proc = start_until(cmd(out), point, tmp_path, env=env, cwd=ROOT)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        err = Path(proc.stderr_path).read_text(errors="replace")
        moments.append((point, done, proc.returncode))
        assert proc.returncode == 143, (moments, seed, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines == ["spk_inference: error: terminated (SIGTERM); finished shards are kept: rerun the same "
                         "command to resume"], (moments, seed, err)
    print("moments:", moments)
    p = subprocess.run(cmd(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("embeddings.npz", "spk_embeddings.npz"):
        got, want = load_npz(out / name), load_npz(ref / name)
        assert list(got) == list(want) and all(got[k].tobytes() == want[k].tobytes() for k in want), (name, seed)
    assert (out / "embeddings.ark").read_bytes() == (ref / "embeddings.ark").read_bytes()
