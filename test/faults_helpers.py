"""Deterministic fault injection for the tests: start a CLI and wait until it stands at a named fault point.

The engine blocks at the point named by ``SPK_TOOLKIT_FAULT_POINT`` (``spk_toolkit.engine.faults``), so a test kills
or interrupts the run at an exact moment whatever the machine's speed or load, never by sleeping and hoping.
Random choices of a test (which shard, which batch) come from :func:`test_rng`, whose seed is printed and can be
replayed with ``SPK_TEST_SEED=<seed>``.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

from spk_toolkit.engine.faults import FILE_ENV, POINT_ENV

#: a hang guard only (a run that never reaches its point is a failure); never a condition of the test's logic
REACH_TIMEOUT_S = 900


def test_rng(name: str) -> tuple:
    """``(random.Random, seed)`` for a test: ``SPK_TEST_SEED`` if set, else a fresh seed; the seed is printed."""
    raw = os.environ.get("SPK_TEST_SEED")
    seed = int(raw) if raw else int.from_bytes(os.urandom(4), "little")
    print(f"{name}: random seed {seed} (replay with SPK_TEST_SEED={seed})")
    return random.Random(seed), seed


test_rng.__test__ = False  # not a test, despite its name


def default_signals() -> None:
    """In a child before exec: SIGINT and SIGTERM back to their default dispositions.

    A process started in the background by a non-interactive shell (``cmd &``, a CI runner, ``nohup``) has SIGINT
    ignored, and children inherit that: Python then installs no KeyboardInterrupt handler and a test's Ctrl-C would
    do nothing. The child of a test gets what a terminal gives a command, whoever started pytest.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_until(cmd, point: str, tmp_path: Path, env=None, cwd=None) -> subprocess.Popen:
    """Start ``cmd`` and return once it blocks at fault point ``point`` (``"name"`` or ``"name:n"``).

    The child's stderr goes to a file under ``tmp_path``, named by the returned process' ``stderr_path``; it starts
    with the default SIGINT / SIGTERM dispositions (:func:`default_signals`).

    Raises
    ------
    AssertionError
        The process exited before reaching the point (its exit code and stderr tail in the message), or it did
        not reach it within :data:`REACH_TIMEOUT_S` (it is killed).
    """
    tag = uuid.uuid4().hex[:8]
    marker = tmp_path / f"fault-{tag}.reached"
    err = tmp_path / f"fault-{tag}.stderr"
    child_env = {**(os.environ if env is None else env), POINT_ENV: point, FILE_ENV: str(marker)}
    with open(err, "wb") as ef:
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=subprocess.DEVNULL, stderr=ef,
                                preexec_fn=default_signals)
    deadline = time.monotonic() + REACH_TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before fault point {point}:\n"
                                 f"{err.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the run did not reach fault point {point} in {REACH_TIMEOUT_S} s")
        time.sleep(0.02)
    proc.stderr_path = err
    return proc


def cli_in_process(main, argv) -> tuple:
    """``(exit code, stderr)`` of a CLI's ``main(argv)`` run in this process (argparse's ``SystemExit`` included;
    stdout discarded). The run's ``run.log`` handler is closed afterwards, so runs do not log into each other."""
    import contextlib
    import io
    import logging

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h).__name__ == "RunLogHandler":
            root.removeHandler(h)
            h.close()
    return rc, err.getvalue()
