"""Running shards on one worker: batch planning, the batch loop, and the shard accumulator.

Every executor's worker (this process, a torchrun rank, a Dask worker) calls :func:`run_shards`, which is built
from three parts:

* :func:`plan_batches` (pure): the length-bucketed batches of a set of shards, bounded by padded samples;
* :func:`batch_outputs`: one loop yielding ``(batch, outputs)`` in batch order, whatever the decoding set-up
  (main thread, DataLoader workers, or decoding inside concurrent model streams);
* :class:`ShardAccumulator`: per-utterance rows and the error policy; a shard is committed the moment its last
  batch is consumed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import socket
import time
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from spk_toolkit.backends.base import EmbeddingModel, OutputKind
from spk_toolkit.backends.batch import compute_batch, nonfinite_reason, stored_kinds
from spk_toolkit.data import Batch, TaggedBatchDataset, UtteranceDataset, batch_loader, bucket_batches
from spk_toolkit.engine.faults import fault_point
from spk_toolkit.engine.options import ErrorPolicy, ExtractOptions
from spk_toolkit.engine.plan import Plan
from spk_toolkit.engine.shards import ShardData, write_shard

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ShardReport:
    """What a worker tells the driver about one finished shard (picklable: crosses torchrun and Dask).

    Attributes
    ----------
    shard : int
    embedded : int
        Utterances stored.
    errors : list of (utt_id, path, reason)
    audio_seconds : float
        Planned audio of the stored utterances.
    true_samples, padded_samples : int
        Estimated samples and padded samples (``B * T_max``) of the shard's batches (padding waste).
    decoded : int
        Utterances decoded for this shard (with its errors).
    wall : float
        Seconds from the shard's first batch to its commit.
    worker : str
        ``"in-process"``, ``"rank R (host)"`` or the Dask worker.
    clipped : int
        Stored segments that ran past the end of their file and were clipped (``segment_overrun="clip"``).
    """

    shard: int
    embedded: int
    errors: List[tuple]
    audio_seconds: float
    true_samples: int
    padded_samples: int
    decoded: int
    wall: float
    worker: str
    clipped: int = 0


@contextlib.contextmanager
def stream_threads(torch_threads: int = 0, streams: int = 1):
    """Inside the block, give each of ``streams`` concurrent model forwards ``max(1, T // streams)`` intra-op threads.

    ``T`` is ``torch_threads``, or torch's current setting when 0; with one stream and ``torch_threads=0`` nothing
    changes. torch's intra-op thread count is process-wide and inherited by new threads, so every stream's
    forward uses it. The previous count is restored on exit, also after an exception.

    Parameters
    ----------
    torch_threads : int
        Intra-op threads shared by all streams (0 = torch's current setting).
    streams : int
        Concurrent forwards that will run inside the block (``ExtractOptions.model_streams``).

    Raises
    ------
    ValueError
        ``streams < 1``.
    """
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    prev = torch.get_num_threads()
    if streams > 1 or torch_threads > 0:
        torch.set_num_threads(max(1, (torch_threads if torch_threads > 0 else prev) // streams))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def plan_batches(plan: Plan, shard_ids: Sequence[int], sample_rate: int, batch_bins: int, max_batch_size: int = 0
                 ) -> Tuple[List[List[int]], List[int], List[int]]:
    """Length-bucketed batches of the given shards (pure; a batch never spans two shards).

    Parameters
    ----------
    plan : Plan
    shard_ids : sequence of int
        Shards to run, in order.
    sample_rate : int
        The model's rate in Hz (lengths are estimated from the planned durations at this rate).
    batch_bins : int
        Bound on padded samples ``B * T`` per batch.
    max_batch_size : int
        Bound on ``B`` (0 = none).

    Returns
    -------
    batches : list of list of int
        Utterance indices (into ``plan.utts``) per batch.
    tags : list of int
        The shard of each batch.
    est_len : list of int
        Estimated samples per utterance of the plan (indexed like ``plan.utts``).
    """
    est_len = [int(round((u.duration or 0.0) * sample_rate)) for u in plan.utts]
    batches, tags = [], []
    for k in shard_ids:
        members = plan.shards[k]
        for b in bucket_batches([est_len[i] for i in members], batch_bins, max_batch_size):
            batches.append([members[j] for j in b])
            tags.append(k)
    return batches, tags, est_len


def batch_outputs(ds: UtteranceDataset, batches: List[List[int]], tags: List[int],
                  compute: Callable[[Batch], Optional[Dict[str, List[np.ndarray]]]], opts: ExtractOptions
                  ) -> Iterator[Tuple[Batch, Optional[Dict[str, List[np.ndarray]]]]]:
    """Yield ``(batch, outputs)`` in batch order, for every decoding / stream set-up.

    ``opts.model_streams == 1``: batches come from a DataLoader (``opts.num_workers`` decoding workers, or the
    main thread) and are computed one at a time. ``model_streams > 1``: that many forwards run concurrently in
    threads, each with ``torch_threads // model_streams`` intra-op threads; with ``num_workers == 0`` each stream
    decodes the batch it computes (soundfile and soxr release the GIL: exactly one runnable thread per core and no
    batch pickled through shared memory, the fastest way on 2 cores, docs/benchmarks.md). Results are yielded in
    batch order either way, so bookkeeping, errors and shard writes are those of one stream.
    """
    with stream_threads(opts.torch_threads, opts.model_streams):
        if opts.model_streams == 1:
            for batch in batch_loader(ds, batches, tags, num_workers=opts.num_workers,
                                      worker_timeout=opts.worker_timeout):
                yield batch, compute(batch)
            return
        if opts.num_workers > 0:
            def loaded_job(b: Batch):
                return b, compute(b)

            jobs = ((loaded_job, b) for b in batch_loader(ds, batches, tags, num_workers=opts.num_workers,
                                                          worker_timeout=opts.worker_timeout))
        else:
            in_stream = TaggedBatchDataset(ds, batches, tags)

            def stream_job(k: int):
                batch = in_stream[k]  # decoded and collated in this stream's thread
                return batch, compute(batch)

            jobs = ((stream_job, k) for k in range(len(batches)))
        with concurrent.futures.ThreadPoolExecutor(opts.model_streams, thread_name_prefix="spk-model") as pool:
            pending: Deque = collections.deque()
            try:
                # streams running and one queued: a stream that finishes early starts the next job at once
                for fn, arg in jobs:
                    pending.append(pool.submit(fn, arg))
                    while len(pending) > opts.model_streams:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for fut in pending:
                    fut.cancel()


class ShardAccumulator:
    """Collects the rows of each shard in flight and commits a shard when its last batch is consumed.

    Parameters
    ----------
    plan : Plan
    output_dir : path
    kinds : dict
        ``name -> OutputKind``.
    n_batches : dict
        ``shard -> number of batches`` still to consume.
    policy : ErrorPolicy
        Worker-side error policy (``on_error``, and ``max_errors`` on this worker's own errors).
    worker : str
        Recorded in the shard and its report.

    Raises
    ------
    ExtractionError
        From :meth:`consume`, as the policy says (names the utterance, its path and the reason). Shards
        committed before stay on disk.
    """

    def __init__(self, plan: Plan, output_dir, kinds: Dict[str, OutputKind], n_batches: Dict[int, int],
                 policy: ErrorPolicy, worker: str):
        self.plan, self.output_dir, self.kinds, self.policy, self.worker = plan, output_dir, kinds, policy, worker
        self.remaining = dict(n_batches)
        self.open: Dict[int, dict] = {}
        self._t = time.perf_counter()

    def _shard(self, k: int) -> dict:
        if k not in self.open:
            self.open[k] = {"keys": [], "rows": {n: [] for n in self.kinds}, "errors": [], "seconds": 0.0,
                            "decoded": 0, "t0": self._t, "clipped": []}
        return self.open[k]

    def consume(self, batch: Batch, outputs: Optional[Dict[str, List[np.ndarray]]]) -> Optional[ShardReport]:
        """Account one computed batch (in batch order); returns the shard's report when it was committed."""
        k = batch.tag
        a = self._shard(k)
        utts = self.plan.utts
        for i, reason in batch.errors:
            self._error(a, i, reason)
        a["decoded"] += len(batch.errors) + len(batch.indices)
        clipped = dict(getattr(batch, "clipped", None) or [])
        if outputs is not None:
            for row, i in enumerate(batch.indices):
                vals = {n: outputs[n][row] for n in self.kinds}
                reason = nonfinite_reason(vals)
                if reason:
                    self._error(a, i, reason)
                    continue
                a["keys"].append(utts[i].utt_id)
                for n, v in vals.items():
                    a["rows"][n].append(v)
                # input audio (plan durations, or what a clipped segment really had), not the length after the
                # backend's preparation (e.g. VAD)
                if i in clipped:
                    u = utts[i]
                    logger.warning("utterance %s (%s): segment %s-%s s runs past the end of the file; embedded the "
                                   "%.3f s that exist (--segment_overrun clip)", u.utt_id, u.path, u.start, u.end,
                                   clipped[i])
                    a["clipped"].append([u.utt_id, clipped[i]])
                    a["seconds"] += clipped[i]
                else:
                    a["seconds"] += float(utts[i].duration or 0.0)
        self.remaining[k] -= 1
        if self.remaining[k] == 0:
            return self._commit(k)
        fault_point("batch_consumed")
        return None

    def _error(self, a: dict, i: int, reason: str) -> None:
        u = self.plan.utts[i]
        rec = (u.utt_id, u.path, reason)
        a["errors"].append(rec)
        self.policy.record(rec)

    def _commit(self, k: int) -> ShardReport:
        a = self.open.pop(k)
        now = time.perf_counter()
        data = ShardData(k, a["keys"], a["rows"], {n: kd.as_dict() for n, kd in self.kinds.items()},
                         [list(e) for e in a["errors"]], a["seconds"], now - a["t0"], self.worker, a["clipped"])
        write_shard(self.output_dir, data, self.plan.fingerprint, self.plan.shard_fingerprint(k))
        fault_point("shard_committed")
        self._t = now
        return ShardReport(k, len(a["keys"]), [tuple(e) for e in a["errors"]], a["seconds"], 0, 0, a["decoded"],
                           now - a["t0"], self.worker, len(a["clipped"]))


def default_worker_name() -> str:
    """``"in-process (host)"``: the worker name of the in-process executor."""
    return f"in-process ({socket.gethostname()})"


def run_shards(plan: Plan, shard_ids: Sequence[int], model: EmbeddingModel, output_dir, opts: ExtractOptions,
               on_progress: Optional[Callable[[float], None]] = None, worker: Optional[str] = None
               ) -> Iterator[ShardReport]:
    """Compute the given shards of ``plan`` with ``model``; yield a report as each shard is committed.

    All the shards' batches go through one loop (decoding workers run ahead across shard boundaries). This is
    the whole of a worker's job, for every executor; the driver decides which shards (never finished ones).

    Parameters
    ----------
    plan : Plan
    shard_ids : sequence of int
        Shards to compute (each is written, replacing any file under its name).
    model : EmbeddingModel
    output_dir : path
    opts : ExtractOptions
    on_progress : callable, optional
        ``on_progress(seconds)`` after each batch with the batch's planned audio.
    worker : str, optional
        Name recorded in the shards and reports.

    Yields
    ------
    ShardReport
        In commit order.

    Raises
    ------
    ExtractionError
        ``opts.on_error == "raise"`` and an utterance failed, or this worker alone has more than
        ``opts.max_errors`` failed utterances (the message names the first). Committed shards stay on disk.
    """
    shard_ids = list(shard_ids)
    if not shard_ids:
        return
    worker = worker or default_worker_name()
    sr = model.sample_rate
    kinds = model.output_kinds()
    ds = UtteranceDataset(plan.utts, sr, prepare=model.prepare,
                          min_samples=max(model.min_samples, int(round(opts.min_duration * sr))),
                          allow_pipes=opts.allow_pipes, segment_overrun=opts.segment_overrun,
                          pipe_timeout=opts.pipe_timeout)
    batches, tags, est_len = plan_batches(plan, shard_ids, sr, opts.batch_bins, opts.max_batch_size)
    n_batches = collections.Counter(tags)
    waste = {k: [0, 0] for k in shard_ids}  # shard -> [true samples, padded samples] (estimated)
    for b, k in zip(batches, tags):
        waste[k][0] += sum(est_len[i] for i in b)
        waste[k][1] += len(b) * max((est_len[i] for i in b), default=0)
    policy = ErrorPolicy(opts.on_error, opts.max_errors,
                         warn=lambda r: logger.warning("skipping utterance %s (%s): %s", *r))
    # what a shard stores: with crops not averaged, each (vector) output is (n_crops, *shape) per utterance
    acc = ShardAccumulator(plan, output_dir, stored_kinds(kinds, opts), n_batches, policy, worker)

    def compute(batch: Batch):
        return compute_batch(model, kinds, batch, opts) if batch.indices else None

    for batch, outputs in batch_outputs(ds, batches, tags, compute, opts):
        report = acc.consume(batch, outputs)
        if on_progress is not None:
            on_progress(float(sum(plan.utts[i].duration or 0.0 for i in batch.indices)
                              + sum(plan.utts[i].duration or 0.0 for i, _ in batch.errors)))
        if report is not None:
            report.true_samples, report.padded_samples = waste[report.shard]
            yield report
