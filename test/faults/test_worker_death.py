"""Contract 5 of docs/bad_input.md: a decoding worker that dies or cannot write shared memory never hangs the run.

A DataLoader worker SIGKILLs itself at its 6th batch (as the OOM killer would), blocks forever there (a hung read:
the watchdog, ``--worker_timeout``, stops the run), or runs under a 4 KiB file-size limit (as with a full
``/dev/shm``: torch's shared-memory file cannot grow). Either way ``spk_inference`` exits 1 within
60 s with one line naming the cause, keeps the shards committed before, and a rerun without the fault gives outputs
bit-identical to a clean run. The faults are injected deterministically by the worker itself
(``spk_toolkit.data.WORKER_FAULT_ENV``, read only in DataLoader workers).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from spk_toolkit.data import WORKER_FAULT_ENV
from spk_toolkit.testing import load_npz

ARGS = ["--num_workers", "1", "--shard_duration", "20", "--progress", "false"]


def _run(data, out, fault=None, extra=()):
    env = {k: v for k, v in os.environ.items() if k != WORKER_FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[WORKER_FAULT_ENV] = fault
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data),
                        "--output_dir", str(out), *ARGS, *extra], env=env, capture_output=True, text=True, timeout=300)
    return p, time.monotonic() - t0


@pytest.fixture(scope="module")
def clean(fillets_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("worker_clean") / "out"
    p, _ = _run(fillets_small, out)
    assert p.returncode == 0, p.stderr
    return load_npz(out / "embeddings.npz"), load_npz(out / "spk_embeddings.npz")


CASES = {
    "sigkill": ("kill:6", "decoding worker (pid ", "was killed by signal Killed"),  # or "exited unexpectedly"
    "shared_memory_full": ("fsize", "a decoding worker could not put a batch into shared memory", "File too large"),
    "stalled": ("stall:6", "no batch from the decoding workers for 5.0 s", "--worker_timeout"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dead_decoding_worker_ends_the_run_in_one_line_and_a_rerun_is_bit_identical(fillets_small, tmp_path,
                                                                                       clean, case):
    fault, start, detail = CASES[case]
    out = tmp_path / "out"
    p, seconds = _run(fillets_small, out, fault, ["--worker_timeout", "5"] if case == "stalled" else [])
    assert p.returncode == 1, p.stderr
    assert seconds < 60, seconds
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"spk_inference: error: {start}"), lines[0]
    # torch reports a SIGKILLed worker from its SIGCHLD handler (the signal named) or, when its status check sees
    # the dead pid first, as having exited
    assert detail in lines[0] or (case == "sigkill" and "exited unexpectedly" in lines[0]), lines[0]
    kept = len(list((out / "shards").glob("shard-*.npz"))) if (out / "shards").is_dir() else 0
    p2, _ = _run(fillets_small, out)
    assert p2.returncode == 0, p2.stderr
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == kept  # nothing committed was lost
    for name, ref in zip(("embeddings.npz", "spk_embeddings.npz"), clean):
        got = load_npz(out / name)
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert np.array_equal(got[k], ref[k]), (name, k)
