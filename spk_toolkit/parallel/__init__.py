"""Executors above the engine: how a set of shards runs on several processes (DESIGN.md property 5).

The protocol, the registry and the default in-process executor belong to the engine
(:mod:`spk_toolkit.engine.executor`, re-exported here); this package adds the executors of other processes and
announces them to the engine's registry (also declared as entry points of ``spk_toolkit.executors`` in setup.cfg, so
``engine.extract(executor="dask")`` finds them before this package is imported).

============ ============================================================ ==============================================
executor     how it is chosen                                              shard assignment
============ ============================================================ ==============================================
``inprocess`` default                                                      all shards, in plan order, in this process
``torchrun``  ``--executor torchrun`` (the CLIs choose it, and log it, when  static longest-processing-time-first over the
              launched by torchrun: ``RANK``/``WORLD_SIZE`` set)            unfinished shards, by audio duration
``dask``      ``--executor dask --parallel conf/parallel_*.yaml``          dynamic: one task per shard, the first free
              (``--parallel`` alone implies it)                             worker takes the next
============ ============================================================ ==============================================

A library call never switches executor by itself: ``extract(...)`` runs in-process unless ``executor=`` (or
``parallel=``) says otherwise, also inside a torchrun training script. A new executor is one module defining an
:class:`Executor` subclass registered with :func:`register_executor`, announced with
:func:`register_lazy_executor` here or as an entry point of its own package.
Heavy imports (torch.distributed, dask, dask_cuda, dask_jobqueue) happen inside the executor that needs them.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from spk_toolkit.engine.executor import (  # noqa: F401 (the protocol and registry, re-exported)
    EXECUTORS, Executor, InProcessExecutor, executor_names, get_executor, make_executor, register_executor,
    register_lazy_executor)

logger = logging.getLogger(__name__)

register_lazy_executor("torchrun", "spk_toolkit.parallel.dist")
register_lazy_executor("dask", "spk_toolkit.parallel.dask")


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_launch() -> Optional[dict]:
    """The torchrun environment of this process, or None when it was not launched by torchrun.

    Returns
    -------
    dict or None
        ``{"rank", "world_size", "local_rank"}`` when ``RANK`` and ``WORLD_SIZE`` are set.

    Raises
    ------
    ValueError
        ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set but not non-negative integers (named), or
        ``RANK >= WORLD_SIZE``.
    """
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    vals = {}
    for var, dflt in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0")):
        raw = os.environ.get(var, dflt)
        try:
            vals[var] = int(raw)
            if vals[var] < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"environment variable {var}={raw!r} is not a non-negative integer (torchrun sets "
                             "RANK, WORLD_SIZE and LOCAL_RANK)") from None
    if vals["WORLD_SIZE"] < 1 or vals["RANK"] >= vals["WORLD_SIZE"]:
        raise ValueError(f"RANK={vals['RANK']} is not below WORLD_SIZE={vals['WORLD_SIZE']}")
    return {"rank": vals["RANK"], "world_size": vals["WORLD_SIZE"], "local_rank": vals["LOCAL_RANK"]}


def assign_shards(durations, todo, world_size: int):
    """Longest-processing-time-first assignment of shards to ranks.

    Shards are taken longest first (ties by index) and each goes to the rank with the least audio so far (ties to
    the lowest rank). Deterministic, so every rank computes the same answer; the final load of any two ranks
    differs by at most one shard's duration (and the plan makes shards about equal).

    Parameters
    ----------
    durations : sequence of float
        Seconds of audio per shard of the plan (indexed by shard id).
    todo : iterable of int
        Shard ids still to run (finished shards of a resumed run are left out, so ranks stay balanced on resume).
    world_size : int
        Number of ranks (>= 1).

    Returns
    -------
    list of list of int
        ``world_size`` lists of shard ids, each sorted ascending; every id of ``todo`` exactly once.

    Raises
    ------
    ValueError
        ``world_size`` < 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    out = [[] for _ in range(world_size)]
    for k in sorted(todo, key=lambda k: (-float(durations[k]), k)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[r].append(k)
        load[r] += float(durations[k])
    return [sorted(s) for s in out]
