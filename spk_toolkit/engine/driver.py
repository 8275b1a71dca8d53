"""The one driver: plan -> verify finished shards -> assign and run (any executor) -> account -> merge -> summary.

Every entry point calls :func:`extract`: the ``spk_inference`` CLI, the Python API, the trainer's
``extract_embed``; torchrun ranks and Dask workers only ever run :func:`spk_toolkit.engine.run.run_shards` for
it. Output directory layout (see docs/architecture.md)::

    plan.json                 shard plan + fingerprint of corpus, model and options
    shards/shard-KKKKK.npz    one per shard: outputs, keys, errors, fingerprints, checksum (spk_toolkit.engine.shards)
    embeddings.npz|.ark/.scp|.h5|/   the embedding output in each --output_format (input order)
    <name>.*                  other named outputs of a feature extractor
    spk_embeddings.npz        speaker means (mean of the raw utterance embeddings, not re-normalised)
    errors.tsv                utt_id <TAB> path <TAB> reason
    summary.json              counts, audio, wall time, throughput, model, kinds, outputs, executor, workers
    .spk_toolkit.lock(.owner) one run at a time (spk_toolkit.io.lock)
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from spk_toolkit.engine.executor import make_executor
from spk_toolkit.engine.export import clear_exports, write_exports
from spk_toolkit.engine.faults import fault_point
from spk_toolkit.engine.merge import merge, remove_run
from spk_toolkit.engine.options import ErrorPolicy, ExtractionError, ExtractOptions
from spk_toolkit.engine.plan import Plan, prepare_run, read_corpus
from spk_toolkit.engine.shards import ShardInvalid, read_shard, shard_path
from spk_toolkit.io.datadir import Utterance
from spk_toolkit.io.lock import OutputDirLocked, output_dir_lock
from spk_toolkit.io.preflight import check_output_dir, estimate_output_bytes

logger = logging.getLogger(__name__)


def verify_finished(plan: Plan, output_dir) -> Dict[int, list]:
    """The shards of ``plan`` already on disk that verify, with their error records.

    A shard file that does not verify (unreadable, truncated, another plan's, a changed source, bad checksum) is
    removed with a warning naming it, so it is recomputed.

    Returns
    -------
    dict
        ``shard -> [[utt_id, path, reason], ...]`` for every verified shard.
    """
    done = {}
    for k in range(len(plan.shards)):
        p = shard_path(output_dir, k)
        if not p.is_file():
            continue
        try:
            sd = read_shard(p, k, plan.shard_keys(k), plan.shard_fingerprint(k))
        except ShardInvalid as e:
            logger.warning("%s; recomputing shard %d", e, k)
            p.unlink(missing_ok=True)
            continue
        done[k] = sd.errors
    return done


class Accounting:
    """The driver's bookkeeping of one run: errors (one policy for every executor), progress, statistics.

    Parameters
    ----------
    plan : Plan
    opts : ExtractOptions
    label : str
        Progress bar description.
    """

    def __init__(self, plan: Plan, opts: ExtractOptions, label: str = "embedding audio"):
        self.plan, self.opts = plan, opts
        self.policy = ErrorPolicy(opts.on_error, opts.max_errors)
        self.workers: Dict[str, dict] = {}
        self.true_samples = self.padded_samples = 0
        self.computed_seconds = 0.0
        self.computed_utts = 0
        self.pbar = None
        self.label = label

    def start_progress(self, todo: Sequence[int]) -> None:
        """Open the tqdm bar over the audio of the shards ``todo`` (seconds; only with ``opts.progress``)."""
        if self.opts.progress and todo:
            from tqdm import tqdm

            self.pbar = tqdm(total=round(sum(self.plan.shard_duration(k) for k in todo)), unit="s",
                             unit_scale=True, desc=self.label, dynamic_ncols=True, mininterval=1.0)

    def progress(self, seconds: float) -> None:
        """Advance the bar by ``seconds`` of planned audio (the executors' ``on_progress`` callback)."""
        if self.pbar is not None:
            self.pbar.update(round(seconds))

    def close(self) -> None:
        """Close the bar (also after an error)."""
        if self.pbar is not None:
            self.pbar.close()

    def add(self, rep) -> None:
        """Account one :class:`~spk_toolkit.engine.run.ShardReport` (raises as the error policy says)."""
        w = self.workers.setdefault(rep.worker, {"shards": [], "utterances": 0, "errors": 0, "decoded": 0,
                                                 "wall_seconds": 0.0})
        w["shards"].append(rep.shard)
        w["utterances"] += rep.embedded
        w["errors"] += len(rep.errors)
        w["decoded"] += rep.decoded
        w["wall_seconds"] += rep.wall
        self.true_samples += rep.true_samples
        self.padded_samples += rep.padded_samples
        self.computed_seconds += rep.audio_seconds
        self.computed_utts += rep.embedded
        self.policy.record_many(rep.errors)

    @property
    def padding_waste(self) -> float:
        """Fraction of padded samples over the batches computed in this run: ``1 - true / padded`` (0 = none)."""
        return 1.0 - self.true_samples / self.padded_samples if self.padded_samples else 0.0


def extract(
    data: str | os.PathLike | Sequence[Utterance],
    output_dir: str | os.PathLike,
    toolkit: str = "resemblyzer",
    model=None,
    model_kwargs: Optional[dict] = None,
    executor: Optional[str] = None,
    parallel=None,
    exports: Sequence = (),
    **options,
) -> Optional[dict]:
    """Compute every output of a model for every utterance of a corpus (resumable, any executor).

    Parameters
    ----------
    data : path or sequence of Utterance
        Kaldi data dir, ESPnet3 manifest TSV, audio tree ``root/<dataset>/<speaker>/<utt>.<ext>``, or records.
    output_dir : path
        Output directory (layout in the module docstring). A previous run there is resumed: its shards are
        verified and kept, those that do not verify are recomputed with a warning.
    toolkit : str
        Backend name (``resemblyzer`` = offline default, ``espnet``) used when ``model`` is None.
    model : EmbeddingModel, optional
        A built backend (in-process and torchrun executors).
    model_kwargs : dict, optional
        Backend constructor arguments (``device``, ``train_config``, ``model_file`` ...).
    executor : str, optional
        ``inprocess`` (default), ``torchrun``, ``dask`` or any registered name (:mod:`spk_toolkit.engine.executor`;
        the last two live in :mod:`spk_toolkit.parallel`). Never chosen from the
        environment here: the CLIs detect a torchrun launch and pass ``executor="torchrun"``.
    parallel : path or dict, optional
        Dask parallel config (implies ``executor="dask"``).
    exports : sequence of Export
        Files derived from the outputs (:mod:`spk_toolkit.engine.export`): removed once the lock is taken,
        written after the merge under the same lock and named in ``summary.json``'s ``outputs``.
    **options
        Fields of :class:`ExtractOptions`.

    Returns
    -------
    dict or None
        The summary (also written to ``summary.json``); None in processes that serve a driver elsewhere
        (torchrun ranks > 0).

    Raises
    ------
    CorpusError
        Malformed corpus, before any work starts.
    ExtractionError
        ``on_error="raise"`` met a bad utterance; more than ``max_errors`` failed (resumed shards and header
        refusals count); the output directory holds another run's plan or is in use by another run; a worker
        failed. Finished shards stay on disk for a rerun.
    ValueError
        An option out of range (:class:`ExtractOptions`, before the corpus is read).
    OSError
        The output directory is not a directory, cannot be created, is not writable or lacks the space the
        outputs need (checked before the model loads, :func:`spk_toolkit.io.preflight.check_output_dir`); or a
        later write failed (``filename`` names the file). No temporary file is left; a rerun resumes.
    KeyboardInterrupt
        Ctrl-C: the shards committed so far stay on disk, so a rerun resumes.
    """
    opts = ExtractOptions(**options)
    t0 = time.perf_counter()
    out = Path(output_dir)
    device = (model_kwargs or {}).get("device")
    if model is None and device is not None and parallel is None and executor in (None, "inprocess", "torchrun"):
        from spk_toolkit.backends.device import check_device

        check_device(device)  # a device that is not here fails before the corpus is read (Dask workers: their own)
    utts = read_corpus(data)  # a malformed corpus fails here: no model loaded, nothing written
    ex = make_executor(executor, parallel, toolkit=toolkit, model=model, model_kwargs=model_kwargs)
    if not ex.is_driver:
        with ex:
            ex.serve(utts, out, opts)
        return None
    # the output side, before the model loads: a directory (or creatable), writable, with room for the outputs
    check_output_dir(out, estimate_output_bytes(len(utts), len(opts.output_format)))
    try:  # one run per output directory; taken before the model is loaded, so a second run refuses at once
        lock = output_dir_lock(out, opts.lock_timeout)
        lock.__enter__()
    except OutputDirLocked as e:
        raise ExtractionError(str(e)) from None
    try:
        fault_point("startup")
        clear_exports(out, exports)
        with ex:
            summary = _drive(ex, utts, out, opts, t0)
        check_outcome(summary)  # before the exports: none is derived from a run that stored nothing
        summary = write_exports(out, summary, exports)  # still under the one lock
        check_outcome(summary)
    finally:
        lock.__exit__(None, None, None)
    return summary


def check_outcome(summary: dict) -> None:
    """Refuse a run that stored nothing, or that did not write an output it was asked for (exit 1 in the CLIs).

    Kaldi's tools exit 1 when no utterance succeeded; so does every command here. ``summary.json`` and
    ``errors.tsv`` are written first, so the reasons can be read.

    Parameters
    ----------
    summary : dict
        What :func:`spk_toolkit.engine.merge.merge` returned (``utterances``, ``embedded``, ``errors``,
        ``outputs``, ``output_formats``).

    Raises
    ------
    ExtractionError
        No utterance was stored (the count and the first reason of ``errors.tsv`` named), or an output file
        named in the summary is missing.
    """
    n, stored = int(summary.get("utterances", 0)), int(summary.get("embedded", 0))
    outputs = summary.get("outputs", {})
    if n and not stored:
        from spk_toolkit.io.rundir import read_errors_tsv

        errors_tsv = outputs.get("errors")
        rows = read_errors_tsv(errors_tsv) if errors_tsv and Path(errors_tsv).is_file() else []
        first = f" (first: {rows[0][0]!r}: {rows[0][2]})" if rows and len(rows[0]) > 2 else ""
        raise ExtractionError(f"nothing was stored: all {n} utterance(s) failed; the reasons are in "
                              f"{errors_tsv}{first}")
    missing = [f"{k}: {v}" for k, v in outputs.items() if isinstance(v, str) and not Path(v).exists()]
    if missing:
        raise ExtractionError(f"outputs asked for were not written: {', '.join(missing[:5])}")


def _drive(ex, data, out: Path, opts: ExtractOptions, t0: float) -> dict:
    if opts.overwrite:
        removed = remove_run(out)
        if removed:
            logger.info("--overwrite: removed %d files of the previous run in %s", len(removed), out)
    model_info = ex.model_info()
    plan = prepare_run(data, out, model_info, opts, write_plan=True)
    acct = Accounting(plan, opts)
    path_of = {u.utt_id: u.path for u in plan.utts}
    # header-pass refusals, then errors recorded by resumed shards: the same policy as new errors
    for uid, reason in plan.pre_errors.items():
        if opts.on_error == "skip":
            logger.warning("skipping utterance %s (%s): %s", uid, path_of[uid], reason)
    acct.policy.record_many([(u, path_of[u], r) for u, r in plan.pre_errors.items()])
    done = verify_finished(plan, out)
    for k in sorted(done):
        acct.policy.record_many([tuple(e) for e in done[k]])
    todo = [k for k in range(len(plan.shards)) if k not in done]
    logger.info("model %s; %d utterances in %d shard(s) of ~%g s: %d finished and verified, %d to run (%s executor)",
                model_info.get("toolkit"), len(plan.utts), len(plan.shards), opts.shard_duration, len(done),
                len(todo), ex.name)
    acct.start_progress(todo)
    try:
        for rep in ex.run(plan, todo, out, opts, on_progress=acct.progress):
            acct.add(rep)
    finally:
        acct.close()
    fault_point("shards_done")
    missing = [k for k in todo if not shard_path(out, k).is_file()]
    if missing:
        raise ExtractionError(f"the {ex.name} executor finished without shards {missing[:5]} "
                              f"({len(missing)} missing); rerun to compute them")
    info = ex.info()
    known = info.pop("workers", {})  # executor-side facts per worker (pid, model loads), by worker name
    workers = {w: {**known.get(w, {}), **v, "shards": sorted(v["shards"])} for w, v in acct.workers.items()}
    for w, v in known.items():  # workers that ran no shard this time
        workers.setdefault(w, {**v, "shards": [], "utterances": 0, "errors": 0, "decoded": 0, "wall_seconds": 0.0})
    return merge(plan, out, opts, {
        "wall_seconds": time.perf_counter() - t0, "shards_resumed": len(done), "shards_run": len(todo),
        "computed_audio_seconds": acct.computed_seconds, "computed_utterances": acct.computed_utts,
        "padding_waste": acct.padding_waste, **info, "workers": dict(sorted(workers.items())),
    })
