"""Recovery: SIGKILL the CLI at random moments, resume, and get bit-identical outputs; plan reuse and refusal."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spk_toolkit.engine import ExtractionError, ExtractOptions, prepare_run, read_shard, remove_run, shard_path
from spk_toolkit.io.atomic import is_temporary
from spk_toolkit.io.datadir import load_kaldi_dir
from spk_toolkit.testing import load_npz, make_subset

ROOT = Path(__file__).resolve().parents[1]
SHARD_S = 2.5  # ~1 short utterance per shard: many shards, so kills land between and inside shards


def cli(data: Path, out: Path) -> list:
    return [sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data), "--output_dir", str(out),
            "--shard_duration", str(SHARD_S), "--num_workers", "0", "--output_format", "npz,kaldi_ark",
            "--progress", "false"]


def n_shard_files(out: Path) -> int:
    d = out / "shards"
    return len(list(d.glob("shard-*.npz"))) if d.is_dir() else 0


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    return make_subset(fillets_small, tmp_path_factory.mktemp("sub") / "data")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(subset, tmp_path):
    # The reference runs through the same CLI with the same thread count as the killed runs: float32 results
    # may differ in the last bit between 1 and 2 intra-op threads (seen on an AMD EPYC host).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    r = subprocess.run(cli(subset, ref), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n_shards = json.loads((ref / "summary.json").read_text())["shards"]
    assert n_shards >= 8
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out = tmp_path / "run"
    kills = []
    # kill 1: a random moment of start-up (imports, model load, header reads, planning);
    # kills 2-5: at random points of the shard sequence, a random few ms into the next shard
    targets = [None] + sorted(rng.sample(range(1, n_shards), 4))
    for attempt, target in enumerate(targets):
        proc = subprocess.Popen(cli(subset, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if target is None:
            deadline = time.monotonic() + rng.uniform(0.1, 1.5)  # within imports + model load
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            how = "start-up"
        else:
            while n_shard_files(out) < target and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.03))
            how = f"{target} shard(s) done"
        assert proc.poll() is None, f"run {attempt} finished before the kill (seed {seed})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((how, n_shard_files(out)))
        # whatever is under a final shard name is complete (written under a temporary name, then renamed)
        plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else None
        utts = load_kaldi_dir(subset)
        for p in (out / "shards").glob("shard-*.npz") if (out / "shards").is_dir() else []:
            k = int(p.stem.split("-")[1])  # verifies keys against the plan and the checksum of the data
            sd = read_shard(p, k, [utts[i].utt_id for i in plan["shards"][k]])
            assert len(sd.keys) + len(sd.errors) == len(plan["shards"][k])
        assert not (out / "summary.json").exists()
    done_before = n_shard_files(out)
    assert done_before < n_shards, f"kills {kills} (seed {seed})"
    p = subprocess.run(cli(subset, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"({done_before} resumed from a previous run)" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_resumed"] == done_before and s["shards"] == n_shards, (kills, seed)
    # bit-identical to the uninterrupted run, no duplicate and no missing utterance
    got, want = load_npz(out / "embeddings.npz"), load_npz(ref / "embeddings.npz")
    assert list(got) == list(want) == [u.utt_id for u in load_kaldi_dir(subset)]
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), (k, kills, seed)
    assert (out / "embeddings.ark").read_bytes() == (ref / "embeddings.ark").read_bytes()
    g, w = load_npz(out / "spk_embeddings.npz"), load_npz(ref / "spk_embeddings.npz")
    assert list(g) == list(w) and all(g[k].tobytes() == w[k].tobytes() for k in w)
    assert (out / "errors.tsv").read_text() == (ref / "errors.tsv").read_text()
    keys = [k for z in sorted((out / "shards").glob("shard-*.npz")) for k in read_shard(z, int(z.stem[6:])).keys]
    assert sorted(keys) == sorted(want) and len(keys) == len(set(keys))
    assert not [p for p in (out / "shards").iterdir() if is_temporary(p.name)]  # partial shards were cleaned up


def test_plan_reused_changed_input_refused_overwrite_starts_fresh(subset, tmp_path):
    info = {"toolkit": "fake", "embed_dim": 4}
    opts = ExtractOptions(shard_duration=SHARD_S, progress=False)
    p1 = prepare_run(subset, tmp_path, info, opts)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["shards"] == p1.shards and saved["fingerprint"] == p1.fingerprint
    # each shard holds about SHARD_S of audio; every utterance exactly once
    assert sorted(i for s in p1.shards for i in s) == list(range(len(p1.utts)))
    assert max(p1.shard_duration(k) for k in range(len(p1.shards))) < 2 * SHARD_S + 1
    assert prepare_run(subset, tmp_path, info, opts).shards == p1.shards  # reloaded
    with pytest.raises(ExtractionError, match="different run.*--overwrite"):
        prepare_run(subset, tmp_path, {**info, "embed_dim": 8}, opts)  # model changed
    changed = tmp_path / "changed"
    changed.mkdir()
    lines = (subset / "wav.scp").read_text().splitlines()
    (changed / "wav.scp").write_text("\n".join(lines[:-1]) + "\n")  # corpus changed
    with pytest.raises(ExtractionError, match="corpus, model or options changed"):
        prepare_run(changed, tmp_path, info, opts)
    with pytest.raises(ExtractionError):
        prepare_run(subset, tmp_path, info, ExtractOptions(shard_duration=60, progress=False))  # options changed
    # --overwrite: old shards are discarded, a new plan is written
    shard_path(tmp_path, 0).parent.mkdir(exist_ok=True)
    shard_path(tmp_path, 0).write_bytes(b"stale")
    assert "shards/" in remove_run(tmp_path) and not (tmp_path / "plan.json").exists()  # what --overwrite does first
    p2 = prepare_run(changed, tmp_path, info, ExtractOptions(shard_duration=SHARD_S, progress=False))
    assert len(p2.utts) == len(lines) - 1 and not shard_path(tmp_path, 0).exists()
    assert json.loads((tmp_path / "plan.json").read_text())["fingerprint"] == p2.fingerprint
