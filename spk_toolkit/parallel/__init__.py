"""Executors: how a set of shards runs (DESIGN.md property 5). The driver is :func:`spk_toolkit.engine.extract`.

The driver plans, verifies finished shards, accounts errors / progress / statistics, and merges; an executor only
builds the model where the work happens and runs the shards it is given, yielding one
:class:`~spk_toolkit.engine.run.ShardReport` per committed shard. Every worker runs the same
:func:`spk_toolkit.engine.run.run_shards`.

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
:class:`Executor` subclass registered with :func:`register_executor`, plus its name in :data:`BUILTIN_MODULES`.
Heavy imports (torch.distributed, dask, dask_cuda, dask_jobqueue) happen inside the executor that needs them.
"""
from __future__ import annotations

import abc
import importlib
import logging
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Type

logger = logging.getLogger(__name__)

EXECUTORS: Dict[str, Type["Executor"]] = {}
BUILTIN_MODULES = {"inprocess": "spk_toolkit.parallel.inprocess", "torchrun": "spk_toolkit.parallel.dist",
                   "dask": "spk_toolkit.parallel.dask"}


class Executor(abc.ABC):
    """How shards run. Used by the driver as a context manager::

        with executor:                 # start: build the model(s) where the work happens
            if not executor.is_driver:  # e.g. torchrun ranks > 0
                executor.serve(data, output_dir, opts); return
            info = executor.model_info()
            for report in executor.run(plan, todo, output_dir, opts, on_progress): ...
        # __exit__ tells the workers how the run ended and releases them

    Parameters
    ----------
    toolkit : str
        Backend registry name.
    model : EmbeddingModel, optional
        A built backend (only executors that run in this process accept one).
    model_kwargs : dict, optional
        Backend constructor arguments.
    config : dict, optional
        Executor-specific settings (the Dask parallel config).
    """

    name = ""
    #: False in processes that only work for a driver elsewhere (torchrun ranks > 0).
    is_driver = True

    def __init__(self, toolkit: str = "resemblyzer", model=None, model_kwargs: Optional[dict] = None,
                 config: Optional[dict] = None):
        self.toolkit, self.model, self.model_kwargs = toolkit, model, dict(model_kwargs or {})
        self.config = config

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc)
        return False

    def start(self) -> None:
        """Build the model where the work happens (once per worker)."""

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Release workers; ``exc`` is the driver's exception when the run failed (None on success)."""

    @abc.abstractmethod
    def model_info(self) -> dict:
        """The backend's ``describe()`` (part of the plan fingerprint)."""

    @abc.abstractmethod
    def run(self, plan, shard_ids: Sequence[int], output_dir, opts,
            on_progress: Optional[Callable[[float], None]] = None) -> Iterator:
        """Run ``shard_ids`` of ``plan``; yield a :class:`~spk_toolkit.engine.run.ShardReport` per committed shard.

        Raises
        ------
        spk_toolkit.engine.ExtractionError
            A worker failed (``on_error raise``, its own ``max_errors``, a crash): the message names the worker
            and, for a bad utterance, the utterance, its path and the reason.
        """

    def serve(self, data, output_dir, opts) -> None:
        """Work for a driver in another process (only where :attr:`is_driver` is False)."""
        raise NotImplementedError(f"the {self.name} executor has no serving processes")

    def info(self) -> dict:
        """Summary fields of this executor (``executor``, ``world_size``, ...)."""
        return {"executor": self.name, "world_size": 1}


def register_executor(cls: Type[Executor]) -> Type[Executor]:
    """Class decorator: register ``cls`` under ``cls.name``.

    Raises
    ------
    ValueError
        Empty name, or a name registered by another class.
    """
    if not cls.name or EXECUTORS.get(cls.name, cls) is not cls:
        raise ValueError(f"executor name {cls.name!r} is empty or registered twice")
    EXECUTORS[cls.name] = cls
    return cls


def executor_names() -> list:
    """Names accepted by ``--executor`` (sorted)."""
    return sorted(set(EXECUTORS) | set(BUILTIN_MODULES))


def get_executor(name: str) -> Type[Executor]:
    """The executor class registered under ``name`` (importing the built-in module on first use).

    Raises
    ------
    ValueError
        Unknown name (the message lists the registered names).
    """
    if name not in EXECUTORS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; registered: {', '.join(executor_names())}")
    return EXECUTORS[name]


def make_executor(executor: Optional[str] = None, parallel=None, toolkit: str = "resemblyzer", model=None,
                  model_kwargs: Optional[dict] = None) -> Executor:
    """Build the executor a call asks for, explicitly: ``executor`` by name; ``parallel`` alone means Dask.

    Parameters
    ----------
    executor : str, optional
        ``inprocess`` (default), ``torchrun``, ``dask`` or any registered name.
    parallel : path or dict, optional
        Dask parallel config (``conf/parallel_*.yaml``); only with ``executor`` None or ``dask``.
    toolkit, model, model_kwargs
        The backend (see :class:`Executor`).

    Raises
    ------
    ValueError
        Unknown executor, ``parallel`` with a non-Dask executor, a built ``model`` given to an executor that
        builds its models on other processes.
    """
    name = executor or ("dask" if parallel else "inprocess")
    if parallel and name != "dask":
        raise ValueError(f"--parallel configures the Dask executor; it cannot be combined with --executor {name}")
    cls = get_executor(name)
    if name == "dask":
        if model is not None:
            raise ValueError("the Dask executor builds the model on each worker; pass toolkit/model_kwargs, "
                             "not a built model")
        from spk_toolkit.parallel.dask import load_parallel_config

        return cls(toolkit, None, model_kwargs, load_parallel_config(parallel or {}))
    return cls(toolkit, model, model_kwargs)


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
