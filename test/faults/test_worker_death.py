"""Contract 5 of docs/bad_input.md: a decoding worker that dies or cannot write shared memory never hangs the run.

A DataLoader worker SIGKILLs itself at its 6th batch (as the OOM killer would), or runs under a 4 KiB file-size limit
(as with a full ``/dev/shm``: torch's shared-memory file cannot grow). Either way ``spk_inference`` exits 1 within
60 s with one line naming the cause, keeps the shards committed before, and a rerun without the fault gives outputs
bit-identical to a clean run. The faults are injected deterministically by the worker itself
(``spk_toolkit.data.WORKER_FAULT_ENV``, read only in DataLoader workers).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from spk_toolkit.data import WORKER_FAULT_ENV
from spk_toolkit.testing import load_npz

ARGS = ["--num_workers", "1", "--shard_duration", "20", "--progress", "false"]


def _run(data, out, fault=None):
    env = {k: v for k, v in os.environ.items() if k != WORKER_FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[WORKER_FAULT_ENV] = fault
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data),
                        "--output_dir", str(out), *ARGS], env=env, capture_output=True, text=True, timeout=300)
    return p, time.monotonic() - t0


@pytest.fixture(scope="module")
def clean(fillets_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("worker_clean") / "out"
    p, _ = _run(fillets_small, out)
    assert p.returncode == 0, p.stderr
    return load_npz(out / "embeddings.npz"), load_npz(out / "spk_embeddings.npz")


CASES = {
    "sigkill": ("kill:6", "decoding worker (pid ", "was killed by signal Killed"),
    "shared_memory_full": ("fsize", "a decoding worker could not put a batch into shared memory", "File too large"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dead_decoding_worker_ends_the_run_in_one_line_and_a_rerun_is_bit_identical(fillets_small, tmp_path,
                                                                                       clean, case):
    fault, start, detail = CASES[case]
    out = tmp_path / "out"
    p, seconds = _run(fillets_small, out, fault)
    assert p.returncode == 1, p.stderr
    assert seconds < 60, seconds
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"spk_inference: error: {start}") and detail in lines[0], lines[0]
    kept = sorted((out / "shards").glob("shard-*.npz")) if (out / "shards").is_dir() else []
    if case == "sigkill":
        assert kept, "the shards committed before the worker died were lost"
    p2, _ = _run(fillets_small, out)
    assert p2.returncode == 0, p2.stderr
    for name, ref in zip(("embeddings.npz", "spk_embeddings.npz"), clean):
        got = load_npz(out / name)
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert np.array_equal(got[k], ref[k]), (name, k)
