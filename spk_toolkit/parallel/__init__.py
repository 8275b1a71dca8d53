"""Executors: where the engine's shards run (DESIGN.md property 5).

Every executor runs the same :func:`spk_toolkit.engine.prepare_run` -> :func:`~spk_toolkit.engine.run_shards`
-> :func:`~spk_toolkit.engine.merge`; they only decide which process embeds which shard.

========== ====================================================== ================================================
executor   entry point                                             shard assignment
========== ====================================================== ================================================
in-process ``spk_inference`` / :func:`spk_toolkit.engine.extract`  all shards, in plan order
torchrun   ``torchrun --nproc_per_node=N -m spk_toolkit.bin.       static longest-processing-time-first over the
           spk_inference ...`` (:mod:`spk_toolkit.parallel.dist`)  unfinished shards, by audio duration
Dask       ``spk_inference --parallel conf/parallel_local.yaml``   dynamic: one task per shard, Dask's scheduler
           (:mod:`spk_toolkit.parallel.dask`)                      hands the next shard to the first free worker
========== ====================================================== ================================================

Heavy imports (torch.distributed, dask, dask_cuda, dask_jobqueue) happen inside the executor that needs them.
"""
from __future__ import annotations

import os


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


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
