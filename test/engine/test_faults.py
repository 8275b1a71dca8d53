"""Fault points (spk_toolkit.engine.faults): where the fault-injection tests stop a run, deterministically."""
from __future__ import annotations

import signal
import sys

import pytest
from faults_helpers import start_until

from spk_toolkit.engine.faults import POINT_ENV, POINTS, _seen, fault_point, parse_fault_point


@pytest.mark.parametrize("spec, want", [("startup", ("startup", 1)), ("shard_committed:3", ("shard_committed", 3))])
def test_parse(spec, want):
    assert parse_fault_point(spec) == want


@pytest.mark.parametrize("spec, match", [("nowhere", "unknown fault point 'nowhere'"),
                                         ("startup:0", "positive integer"), ("startup:x", "positive integer")])
def test_parse_refuses(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_fault_point(spec)


def test_without_the_variable_nothing_happens(monkeypatch):
    monkeypatch.delenv(POINT_ENV, raising=False)
    for p in POINTS:
        assert fault_point(p) is None


def test_other_points_and_earlier_visits_pass(monkeypatch):
    """Only the n-th visit of the named point stops; other points and visits 1..n-1 return."""
    monkeypatch.setenv(POINT_ENV, "shard_committed:3")
    _seen.clear()
    try:
        fault_point("startup")
        fault_point("shard_committed")
        fault_point("shard_committed")
        assert _seen["shard_committed"] == 2 and "startup" not in _seen
    finally:
        _seen.clear()


def test_stops_at_the_nth_visit_and_sigint_unwinds(tmp_path):
    """A child stops at its 2nd visit (marker written), not its 1st; SIGINT there raises KeyboardInterrupt."""
    code = ("import sys\nfrom spk_toolkit.engine.faults import fault_point\n"
            "fault_point('shard_committed'); print('first passed', flush=True)\n"
            "try:\n    fault_point('shard_committed')\nexcept KeyboardInterrupt:\n    sys.exit(42)\n")
    proc = start_until([sys.executable, "-c", code], "shard_committed:2", tmp_path)
    marker = next(tmp_path.glob("fault-*.reached")).read_text().split()
    assert marker == ["shard_committed:2", str(proc.pid)]
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=600) == 42
    finally:  # a child left blocked at its fault point would sleep forever
        if proc.poll() is None:
            proc.kill()
