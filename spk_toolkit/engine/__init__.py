"""The extraction engine: corpus -> shard plan -> shards (atomic, verified, resumable) -> merged outputs + summary.

One driver (:func:`extract`, in :mod:`spk_toolkit.engine.driver`) for every entry point and executor:

* :mod:`~spk_toolkit.engine.options`: :class:`ExtractOptions`, the one :class:`~spk_toolkit.engine.options.ErrorPolicy`;
* :mod:`~spk_toolkit.engine.plan`: the duration-balanced shard plan and its fingerprints (``plan.json``);
* :mod:`~spk_toolkit.engine.run`: batch planning, the batch loop and the shard accumulator (what workers run);
* :mod:`~spk_toolkit.engine.shards`: the shard file format, its verification;
* :mod:`~spk_toolkit.engine.merge`: verify + merge into the storage formats, ``summary.json``.

Executors (in-process, torchrun, Dask) are in :mod:`spk_toolkit.parallel`; docs/architecture.md has the picture.
"""
from spk_toolkit.engine.driver import extract, verify_finished
from spk_toolkit.engine.merge import format_summary, merge, remove_run
from spk_toolkit.engine.options import ErrorPolicy, ExtractionError, ExtractOptions
from spk_toolkit.engine.plan import Plan, make_shards, prepare_run
from spk_toolkit.engine.run import ShardReport, plan_batches, run_shards, stream_threads
from spk_toolkit.engine.shards import ShardInvalid, read_shard, shard_path, write_shard

__all__ = ["extract", "verify_finished", "format_summary", "merge", "remove_run", "ErrorPolicy", "ExtractionError",
           "ExtractOptions", "Plan", "make_shards", "prepare_run", "ShardReport", "plan_batches", "run_shards",
           "stream_threads", "ShardInvalid", "read_shard", "shard_path", "write_shard"]
