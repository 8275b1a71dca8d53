"""Fault points: named moments of a run where a test can stop the process deterministically.

The fault-injection tests (``test/faults/``) kill or interrupt a run at an exact moment (start-up, inside a shard,
between shards, after the last commit, during the merge) instead of sleeping and hoping the run is there. A test
sets two environment variables for the child process:

``SPK_TOOLKIT_FAULT_POINT=<name>[:<n>]``
    Stop at the ``n``-th time (1-based, default 1) this process reaches the point ``name``.
``SPK_TOOLKIT_FAULT_FILE=<path>``
    Where the process writes ``<name>:<n> <pid>`` when it stops there (the test waits for this file).

At the point the process blocks in an interruptible sleep: SIGKILL kills it there, SIGINT / SIGTERM unwind it
there as at any other moment. Without the variables :func:`fault_point` is one dictionary lookup.

========================= ==================================================================================
point                     where
========================= ==================================================================================
``startup``               the driver holds the output directory's lock; no model loaded, no plan written
``batch_consumed``        a batch was added to its shard and the shard still waits for more batches
``shard_writing``         a shard's file is complete under its temporary name, not yet renamed
``shard_committed``       a shard's file was committed under its final name (the next batch not yet started)
``shards_done``           every shard of the run is committed; the merge has not started
``merge_output``          the merge committed one output file (``embeddings.<fmt>``, ...); more are to come
========================= ==================================================================================
"""
from __future__ import annotations

import os
import time
from collections import Counter

from spk_toolkit.io.atomic import atomic_write_text

POINT_ENV = "SPK_TOOLKIT_FAULT_POINT"
FILE_ENV = "SPK_TOOLKIT_FAULT_FILE"
POINTS = ("startup", "batch_consumed", "shard_writing", "shard_committed", "shards_done", "merge_output")

_seen: Counter = Counter()


def parse_fault_point(spec: str) -> tuple:
    """``"name[:n]"`` -> ``(name, n)``.

    Raises
    ------
    ValueError
        An unknown point name or an ``n`` that is not a positive integer (both named).
    """
    name, _, n = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{POINT_ENV}={spec!r}: unknown fault point {name!r}; known: {', '.join(POINTS)}")
    try:
        count = int(n) if n else 1
        if count < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{POINT_ENV}={spec!r}: the count after ':' must be a positive integer") from None
    return name, count


def fault_point(name: str) -> None:
    """Block here forever if ``SPK_TOOLKIT_FAULT_POINT`` names this point and this is its ``n``-th visit.

    Parameters
    ----------
    name : str
        One of :data:`POINTS`.

    Raises
    ------
    ValueError
        ``SPK_TOOLKIT_FAULT_POINT`` is malformed (see :func:`parse_fault_point`).
    KeyboardInterrupt
        SIGINT while blocked (as anywhere else in a run).
    """
    spec = os.environ.get(POINT_ENV)
    if not spec:
        return
    want, count = parse_fault_point(spec)
    if name != want:
        return
    _seen[name] += 1
    if _seen[name] != count:
        return
    marker = os.environ.get(FILE_ENV)
    if marker:  # committed atomically: the test never sees a half-written marker
        atomic_write_text(marker, f"{name}:{count} {os.getpid()}\n", fsync=False)
    while True:
        time.sleep(3600)
