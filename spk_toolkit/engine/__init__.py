"""The extraction engine: corpus -> shard plan -> shards (atomic, verified, resumable) -> merged outputs + summary.

One driver (:func:`extract`, in :mod:`spk_toolkit.engine.driver`) for every entry point and executor:

* :mod:`~spk_toolkit.engine.options`: :class:`ExtractOptions`, the one :class:`~spk_toolkit.engine.options.ErrorPolicy`;
* :mod:`~spk_toolkit.engine.plan`: the duration-balanced shard plan and its fingerprints (``plan.json``);
* :mod:`~spk_toolkit.engine.run`: batch planning, the batch loop and the shard accumulator (what workers run);
* :mod:`~spk_toolkit.engine.shards`: the shard file format, its verification;
* :mod:`~spk_toolkit.engine.merge`: verify + merge into the storage formats, ``summary.json``.

* :mod:`~spk_toolkit.engine.executor`: the executor protocol, its registry and the in-process executor (torchrun and
  Dask register from :mod:`spk_toolkit.parallel`);
* :mod:`~spk_toolkit.engine.faults`: named fault points where the fault-injection tests stop a run.

docs/architecture.md has the picture.
"""
import importlib

# name -> submodule; imported on first use, so `from spk_toolkit.engine import ExtractOptions` (a CLI's --help)
# does not import torch
_EXPORTS = {
    "extract": "driver", "verify_finished": "driver",
    "Export": "export",
    "Executor": "executor", "make_executor": "executor", "register_executor": "executor",
    "format_summary": "merge", "merge": "merge", "remove_run": "merge",
    "ErrorPolicy": "options", "ExtractionError": "options", "ExtractOptions": "options",
    "Plan": "plan", "make_shards": "plan", "prepare_run": "plan",
    "ShardReport": "run", "plan_batches": "run", "run_shards": "run", "stream_threads": "run",
    "ShardInvalid": "shards", "read_shard": "shards", "shard_path": "shards", "write_shard": "shards",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"spk_toolkit.engine.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spk_toolkit.engine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
