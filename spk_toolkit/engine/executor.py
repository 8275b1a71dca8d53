"""The executor protocol and its registry: how a set of shards runs (DESIGN.md property 5).

The driver (:func:`spk_toolkit.engine.extract`) plans, verifies finished shards, accounts errors / progress /
statistics, and merges; an executor only builds the model where the work happens and runs the shards it is given,
yielding one :class:`~spk_toolkit.engine.run.ShardReport` per committed shard. Every worker runs the same
:func:`spk_toolkit.engine.run.run_shards`.

The engine owns the contract it calls and runs in this process by itself (:class:`InProcessExecutor`, the default).
Executors of the layer above (``spk_toolkit.parallel``: ``torchrun``, ``dask``) register into this registry; the
engine never imports them by name. A name it does not know yet is looked up among

* the modules announced with :func:`register_lazy_executor` (``spk_toolkit.parallel`` announces its own), and
* the entry points of the group :data:`ENTRY_POINT_GROUP` (``setup.cfg`` declares the built-in ones; a plug-in
  package declares its own),

and the module it names is imported, which registers the class (``@register_executor``).
"""
from __future__ import annotations

import abc
import importlib
import logging
from typing import Callable, Dict, Iterator, Optional, Sequence, Type

logger = logging.getLogger(__name__)

#: name -> class, filled by :func:`register_executor`
EXECUTORS: Dict[str, Type["Executor"]] = {}
#: name -> module whose import registers it (:func:`register_lazy_executor`, entry points)
LAZY_EXECUTORS: Dict[str, str] = {}
#: the entry-point group where packages declare executors: ``<name> = <module>`` (:mod:`spk_toolkit.plugins`)
ENTRY_POINT_GROUP = "spk_toolkit.executors"
#: the executor a parallel config alone selects (``--parallel`` implies it)
PARALLEL_CONFIG_EXECUTOR = "dask"


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

    @classmethod
    def create(cls, toolkit: str = "resemblyzer", model=None, model_kwargs: Optional[dict] = None,
               parallel=None) -> "Executor":
        """Build this executor for one call of the driver (what :func:`make_executor` does by name).

        Raises
        ------
        ValueError
            ``parallel`` given to an executor that takes no parallel config (only Dask does).
        """
        if parallel:
            raise ValueError(f"--parallel configures the Dask executor; it cannot be combined with --executor "
                             f"{cls.name}")
        return cls(toolkit, model, model_kwargs)


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


def register_lazy_executor(name: str, module: str) -> None:
    """Announce that importing ``module`` registers the executor ``name`` (imported on first use).

    Raises
    ------
    ValueError
        ``name`` already announced for another module.
    """
    if LAZY_EXECUTORS.get(name, module) != module:
        raise ValueError(f"executor {name!r} is announced by {LAZY_EXECUTORS[name]} and {module}")
    LAZY_EXECUTORS[name] = module


def _discover_entry_points() -> None:
    from spk_toolkit.plugins import entry_points_of

    for name, value in entry_points_of(ENTRY_POINT_GROUP).items():
        LAZY_EXECUTORS.setdefault(name, value.split(":")[0])


def executor_names() -> list:
    """Names accepted by ``--executor`` (sorted): registered, announced and declared as entry points."""
    _discover_entry_points()
    return sorted(set(EXECUTORS) | set(LAZY_EXECUTORS))


def get_executor(name: str) -> Type[Executor]:
    """The executor class registered under ``name`` (importing the module that registers it on first use).

    Raises
    ------
    ValueError
        Unknown name (the message lists the known names).
    """
    if name not in EXECUTORS and name not in LAZY_EXECUTORS:
        _discover_entry_points()
    if name not in EXECUTORS and name in LAZY_EXECUTORS:
        importlib.import_module(LAZY_EXECUTORS[name])
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
    name = executor or (PARALLEL_CONFIG_EXECUTOR if parallel else InProcessExecutor.name)
    return get_executor(name).create(toolkit, model, model_kwargs, parallel)


@register_executor
class InProcessExecutor(Executor):
    """All shards in plan order in this process, one DataLoader across shard boundaries (the default)."""

    name = "inprocess"

    def start(self) -> None:
        if self.model is None:
            from spk_toolkit.backends.base import load_model

            self.model = load_model(self.toolkit, **self.model_kwargs)

    def model_info(self) -> dict:
        return self.model.describe()

    def run(self, plan, shard_ids, output_dir, opts, on_progress=None):
        from spk_toolkit.engine.run import run_shards

        yield from run_shards(plan, shard_ids, self.model, output_dir, opts, on_progress=on_progress)

    def info(self) -> dict:
        # a subclass (a plug-in) reports its own name
        return {"executor": "in-process" if type(self) is InProcessExecutor else self.name, "world_size": 1}
