"""The extraction engine: corpus -> shard plan -> shards (atomic, resumable) -> merged outputs + summary.

Every entry point (``spk_inference`` CLI, the Python API, the trainer's ``extract_embed``, torchrun ranks and
Dask workers) runs the same three steps:

1. :func:`prepare_run` reads the corpus, measures durations, builds (or reloads and checks) the shard plan.
2. :func:`run_shards` embeds a set of shards; each finished shard is written to ``shards/`` under a temporary
   name and renamed (atomic), so ``kill -9`` loses at most the shard in flight, and a rerun skips it.
3. :func:`merge` verifies that every utterance of the plan is present exactly once (embedded, or listed in
   ``errors.tsv``), then writes the outputs in input order, speaker means and ``summary.json``.

Output directory layout::

    plan.json            shard plan + fingerprint of corpus, model and options (resume check)
    shards/shard-00000.npz  one per shard: keys, embeddings (N, D) float32, error records
    embeddings.npz       np.savez_compressed, keys = utt ids, float32 (D,)  [--output_format npz]
    embeddings.ark/.scp  kaldiio Kaldi float vectors                          [--output_format kaldi_ark]
    spk_embeddings.npz   speaker means (mean of the raw utterance embeddings, not re-normalised)
    errors.tsv           utt_id <TAB> path <TAB> reason
    summary.json         counts, audio hours, wall time, throughput, model, embedding dim, outputs
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from spk_toolkit.backends.base import EmbeddingModel, load_model
from spk_toolkit.data import Batch, TaggedBatchDataset, UtteranceDataset, batch_loader, bucket_batches, padding_waste
from spk_toolkit.io.audio import is_pipe
from spk_toolkit.io.datadir import CorpusError, Utterance, load_corpus, measure_durations, spk2utt_from
from spk_toolkit.io.writers import get_writer, parse_formats

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


class ExtractionError(RuntimeError):
    """Extraction stopped: ``--on_error raise`` met a bad utterance, ``--max_errors`` was exceeded, or the
    output directory holds a plan for a different corpus/model."""


@dataclasses.dataclass
class ExtractOptions:
    """Options of an extraction run (every field is a CLI flag of ``spk_inference``).

    Attributes
    ----------
    batch_bins : int
        Bound on padded samples per batch ``B * T`` at the model's rate (default 16 kHz x 240 s).
    num_workers : int
        DataLoader decoding workers (processes that decode ahead of the model). 0 = decode in this process: in
        the main thread with one model stream, or, with ``model_streams > 1``, each stream decodes its own next
        batch before its forward (on a 2-core CPU the fastest setting for an ESPnet model: no decoding process
        preempts the model threads; docs/benchmarks.md). On a GPU, give decoding workers most cores.
    output_format : list of str
        Writer registry names (``npz``, ``kaldi_ark``, ``hdf5``, ``npy_dir``).
    on_error : str
        ``skip`` (record in ``errors.tsv``, warn, continue) or ``raise`` (stop at the first bad utterance).
    max_errors : int
        Stop when more than this many utterances failed (-1 = no limit).
    min_duration : float
        Utterances shorter than this (seconds) are errors (default 0.1 s).
    allow_pipes : bool
        Run ``wav.scp`` pipe commands.
    shard_duration : float
        Target audio per shard in seconds (default 600 s: a lost shard costs well under a minute on a GPU).
    overwrite : bool
        Discard an existing plan/shards in ``output_dir`` instead of resuming.
    progress : bool
        Show a tqdm bar.
    torch_threads : int
        Intra-op threads for the model while embedding (0 = leave torch's setting). On a small CPU box, cores
        minus ``num_workers`` avoids oversubscription (decoding workers and model threads competing).
    model_streams : int
        Concurrent forwards on different batches (Python threads; torch releases the GIL inside operators), each
        with ``torch_threads // model_streams`` intra-op threads (torch's setting when ``torch_threads`` is 0;
        default 1 = one forward at a time; :func:`stream_threads`). On a CPU,
        2 streams x 1 thread ran the ECAPA-TDNN forward 7-12 % faster than 1 stream x 2 threads on our 2-core
        machine, and a stream that a decoding worker preempts stalls alone instead of holding every OpenMP
        thread at the next barrier (docs/benchmarks.md). Results are consumed in batch order, so outputs, errors
        and shard writes are those of one stream; embeddings agree to float32 rounding. Keep 1 on a GPU.
    """

    batch_bins: int = 16000 * 240
    num_workers: int = 1
    output_format: List[str] = dataclasses.field(default_factory=lambda: ["npz"])
    on_error: str = "skip"
    max_errors: int = -1
    min_duration: float = 0.1
    allow_pipes: bool = False
    shard_duration: float = 600.0
    overwrite: bool = False
    progress: bool = True
    torch_threads: int = 0
    model_streams: int = 1

    def __post_init__(self):
        self.output_format = parse_formats(self.output_format)
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.batch_bins < 1:
            raise ValueError(f"batch_bins must be >= 1, got {self.batch_bins}")
        if self.model_streams < 1:
            raise ValueError(f"model_streams must be >= 1, got {self.model_streams}")
        if self.shard_duration <= 0:
            raise ValueError(f"shard_duration must be > 0 s, got {self.shard_duration}")


@dataclasses.dataclass
class Plan:
    """A deterministic shard plan.

    Attributes
    ----------
    utts : list of Utterance
        The corpus in input order.
    shards : list of list of int
        Indices into ``utts`` per shard (each index exactly once over all shards).
    pre_errors : dict
        ``utt_id -> reason`` for utterances refused before decoding (unreadable header, refused pipe).
    fingerprint : str
        sha256 over corpus, model description and output-affecting options.
    """

    utts: List[Utterance]
    shards: List[List[int]]
    pre_errors: Dict[str, str]
    fingerprint: str
    model_info: dict

    def shard_duration(self, k: int) -> float:
        """Audio in shard ``k``, in seconds (sum of the planned utterance durations; unknown counts as 0)."""
        return float(sum(self.utts[i].duration or 0.0 for i in self.shards[k]))


def _fingerprint(utts: Sequence[Utterance], model_info: dict, opts: ExtractOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(model_info, sort_keys=True, default=str).encode())
    h.update(json.dumps({"min_duration": opts.min_duration, "shard_duration": opts.shard_duration,
                         "allow_pipes": opts.allow_pipes, "v": PLAN_VERSION}, sort_keys=True).encode())
    for u in utts:
        h.update(f"{u.utt_id}\t{u.path}\t{u.start}\t{u.end}\n".encode())
    return h.hexdigest()


def make_shards(durations: Sequence[float], shard_duration: float) -> List[List[int]]:
    """Split utterances into shards of about ``shard_duration`` seconds of audio each.

    Utterances are sorted by duration (longest first, ties by index) and cut into consecutive runs, so a shard
    holds utterances of similar length (little padding when batched) and every shard has about the same audio
    (balanced by duration, DESIGN.md property 4). Deterministic.

    Parameters
    ----------
    durations : sequence of float, length N
        Seconds per utterance (unknown = 0).
    shard_duration : float
        Target seconds of audio per shard.

    Returns
    -------
    list of list of int
        Utterance indices per shard, each index exactly once.
    """
    order = sorted(range(len(durations)), key=lambda i: (-float(durations[i] or 0.0), i))
    total = float(sum(d or 0.0 for d in durations))
    n_shards = max(1, int(np.ceil(total / shard_duration))) if total > 0 else 1
    target = total / n_shards if total > 0 else 1.0
    shards: List[List[int]] = [[]]
    acc = 0.0
    for i in order:
        if shards[-1] and acc >= target * len(shards) - 1e-9 and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(i)
        acc += float(durations[i] or 0.0)
    return shards


def prepare_run(
    data: str | os.PathLike | Sequence[Utterance],
    output_dir: str | os.PathLike,
    model_info: dict,
    opts: ExtractOptions,
    write_plan: bool = True,
) -> Plan:
    """Read the corpus and build the shard plan, or reload the saved plan when the fingerprint matches.

    Parameters
    ----------
    data : path or sequence of Utterance
        Kaldi data dir, manifest TSV, audio tree, or records.
    output_dir : path
        Where ``plan.json`` lives.
    model_info : dict
        ``EmbeddingModel.describe()`` (part of the fingerprint).
    opts : ExtractOptions
    write_plan : bool
        Save ``plan.json`` (rank 0 only in multi-process runs).

    Raises
    ------
    CorpusError
        Malformed corpus (duplicate ids, lines without a path) — before any work starts.
    ExtractionError
        ``output_dir`` holds a plan for a different corpus/model/options and ``opts.overwrite`` is False.
    """
    out = Path(output_dir)
    utts = list(data) if not isinstance(data, (str, os.PathLike)) else load_corpus(data)
    if not utts:
        raise CorpusError(f"{data}: no utterances")
    seen = set()
    for u in utts:
        if u.utt_id in seen:
            raise CorpusError(f"duplicate utterance id {u.utt_id!r} ({u.path})")
        seen.add(u.utt_id)
    fp = _fingerprint(utts, model_info, opts)
    plan_path = out / "plan.json"
    if plan_path.is_file() and not opts.overwrite:
        saved = json.loads(plan_path.read_text())
        if saved.get("fingerprint") != fp:
            raise ExtractionError(
                f"{out} holds results of a different run (corpus, model or options changed: "
                f"plan fingerprint {saved.get('fingerprint', '?')[:12]} != {fp[:12]}); "
                "use another --output_dir or pass --overwrite to start fresh"
            )
        for u, d in zip(utts, saved["durations"]):
            u.duration = d
        return Plan(utts, saved["shards"], saved["pre_errors"], fp, model_info)
    if opts.overwrite and out.exists():
        import shutil

        shutil.rmtree(out / "shards", ignore_errors=True)
        for name in ("plan.json", "summary.json", "errors.tsv"):
            (out / name).unlink(missing_ok=True)
    cache_dir = Path(data) if isinstance(data, (str, os.PathLike)) and Path(data).is_dir() else None
    pre_errors = measure_durations(utts, allow_pipes=opts.allow_pipes, cache_dir=cache_dir)
    for u in utts:  # the same plan whether durations came from the utt2dur cache (4 decimals) or from headers
        if u.duration is not None:
            u.duration = round(u.duration, 4)
    path_of = {u.utt_id: u.path for u in utts}
    for uid, reason in pre_errors.items():  # header-level failures follow the same --on_error policy
        if opts.on_error == "raise":
            raise ExtractionError(f"utterance {uid!r} ({path_of[uid]}): {reason}")
        logger.warning("skipping utterance %s (%s): %s", uid, path_of[uid], reason)
    if 0 <= opts.max_errors < len(pre_errors):
        raise ExtractionError(f"{len(pre_errors)} utterances have unreadable audio headers, more than "
                              f"--max_errors {opts.max_errors}; see the log")
    keep = [i for i, u in enumerate(utts) if u.utt_id not in pre_errors]
    sub = make_shards([utts[i].duration for i in keep], opts.shard_duration)
    shards = [[keep[j] for j in s] for s in sub if s]
    plan = Plan(utts, shards, pre_errors, fp, model_info)
    if write_plan:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(plan_path, json.dumps({
            "version": PLAN_VERSION, "fingerprint": fp, "model": model_info,
            "n_utterances": len(utts), "durations": [u.duration for u in utts],
            "shards": shards, "pre_errors": pre_errors,
        }))
    return plan


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_path(output_dir: str | os.PathLike, k: int) -> Path:
    """Path of shard ``k``'s result file."""
    return Path(output_dir) / "shards" / f"shard-{k:05d}.npz"


def finished_shards(output_dir: str | os.PathLike, n_shards: int) -> set:
    """Indices of shards whose result file exists (complete by construction: written then renamed)."""
    return {k for k in range(n_shards) if shard_path(output_dir, k).is_file()}


def _write_shard(output_dir, k: int, keys: List[str], embs: List[np.ndarray], errors: List[tuple], dim: int,
                 seconds: float, wall: float) -> None:
    path = shard_path(output_dir, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    emb = np.stack(embs).astype(np.float32) if embs else np.zeros((0, dim), np.float32)
    np.savez(tmp, keys=np.array(keys, dtype=str), emb=emb,
             err_keys=np.array([e[0] for e in errors], dtype=str),
             err_paths=np.array([e[1] for e in errors], dtype=str),
             err_reasons=np.array([e[2] for e in errors], dtype=str),
             count=np.int64(len(keys) + len(errors)), audio_seconds=np.float64(seconds), wall=np.float64(wall))
    os.replace(tmp, path)


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


def run_shards(
    plan: Plan,
    shard_ids: Iterable[int],
    model: EmbeddingModel,
    output_dir: str | os.PathLike,
    opts: ExtractOptions,
    on_shard_done: Optional[Callable[[int], None]] = None,
    progress_position: int = 0,
) -> dict:
    """Embed the given shards of ``plan`` with ``model``; skip shards already finished.

    All the shards' batches go through one DataLoader (workers decode ahead across shard boundaries); a shard is
    written atomically as soon as its last batch is embedded.
    With ``opts.model_streams > 1`` that many forwards run concurrently (:func:`stream_threads`); results are
    still consumed in batch order by this thread. With ``opts.num_workers == 0`` as well, each stream decodes the
    batch it embeds.

    Returns
    -------
    dict
        ``{"shards_run", "shards_skipped", "utterances", "errors", "decoded", "padding_waste"}`` for this call.

    Raises
    ------
    ExtractionError
        ``opts.on_error == "raise"`` and an utterance failed (message names utterance, path and reason), or more
        than ``opts.max_errors`` utterances failed. Shards finished before stay on disk.
    """
    todo = [k for k in shard_ids if not shard_path(output_dir, k).is_file()]
    skipped = len(list(shard_ids)) - len(todo) if isinstance(shard_ids, (list, tuple, range, set)) else 0
    stats = {"shards_run": 0, "shards_skipped": skipped, "utterances": 0, "errors": 0, "decoded": 0,
             "padding_waste": 0.0}
    if not todo:
        return stats
    sr = model.sample_rate
    ds = UtteranceDataset(plan.utts, sr, prepare=model.prepare,
                          min_samples=max(model.min_samples, int(round(opts.min_duration * sr))),
                          allow_pipes=opts.allow_pipes)
    batches, tags, remaining = [], [], {}
    est_len = [int(round((u.duration or 0.0) * sr)) for u in plan.utts]
    for k in todo:
        bs = bucket_batches([est_len[i] for i in plan.shards[k]], opts.batch_bins)
        bs = [[plan.shards[k][j] for j in b] for b in bs]
        batches += bs
        tags += [k] * len(bs)
        remaining[k] = len(bs)
    stats["padding_waste"] = padding_waste(est_len, batches)
    acc: Dict[int, dict] = {}
    pbar = None
    if opts.progress:
        from tqdm import tqdm

        total_s = sum(plan.shard_duration(k) for k in todo)
        pbar = tqdm(total=round(total_s), unit="s", unit_scale=True, desc="embedding audio", position=progress_position,
                    dynamic_ncols=True, mininterval=1.0)
    n_err_total = 0
    t0 = time.perf_counter()

    def consume(batch: Batch, emb: Optional[np.ndarray]) -> None:
        """Bookkeeping of one embedded batch (main thread, in batch order): errors, rows, finished shards."""
        nonlocal n_err_total, t0
        k = batch.tag
        a = acc.setdefault(k, {"keys": [], "embs": [], "errors": [], "seconds": 0.0, "t0": t0})
        for i, reason in batch.errors:
            u = plan.utts[i]
            n_err_total += 1
            if opts.on_error == "raise":
                raise ExtractionError(f"utterance {u.utt_id!r} ({u.path}): {reason}")
            logger.warning("skipping utterance %s (%s): %s", u.utt_id, u.path, reason)
            a["errors"].append((u.utt_id, u.path, reason))
        if emb is not None:
            bad = ~np.isfinite(emb).all(axis=1)
            for row, i in enumerate(batch.indices):
                u = plan.utts[i]
                if bad[row]:
                    n_err_total += 1
                    reason = "model produced a non-finite embedding"
                    if opts.on_error == "raise":
                        raise ExtractionError(f"utterance {u.utt_id!r} ({u.path}): {reason}")
                    logger.warning("skipping utterance %s (%s): %s", u.utt_id, u.path, reason)
                    a["errors"].append((u.utt_id, u.path, reason))
                else:
                    a["keys"].append(u.utt_id)
                    a["embs"].append(emb[row])
            # input audio (plan durations), not the length after the backend's preparation (e.g. VAD)
            a["seconds"] += float(sum(plan.utts[i].duration or 0.0 for i in batch.indices))
        if 0 <= opts.max_errors < n_err_total:
            raise ExtractionError(f"more than --max_errors {opts.max_errors} utterances failed; see the log")
        if pbar is not None:
            pbar.update(round(sum(plan.utts[i].duration or 0 for i in batch.indices) + sum(
                plan.utts[i].duration or 0 for i, _ in batch.errors)))
        remaining[k] -= 1
        if remaining[k] == 0:
            a = acc.pop(k)
            _write_shard(output_dir, k, a["keys"], a["embs"], a["errors"], model.embed_dim, a["seconds"],
                         time.perf_counter() - a["t0"])
            t0 = time.perf_counter()
            stats["shards_run"] += 1
            stats["utterances"] += len(a["keys"])
            stats["errors"] += len(a["errors"])
            if on_shard_done is not None:
                on_shard_done(k)

    def embed(batch: Batch) -> Optional[np.ndarray]:
        if not len(batch.indices):
            return None
        return model.embed(batch.wav, batch.lengths).detach().float().cpu().numpy()

    def embed_loaded(batch: Batch) -> tuple:
        return batch, embed(batch)

    def decode_and_embed(k: int) -> tuple:
        batch = in_stream[k]  # decoded and collated in this stream's thread (soundfile and soxr release the GIL)
        return batch, embed(batch)

    with stream_threads(opts.torch_threads, opts.model_streams):
        if opts.model_streams == 1:
            for batch in batch_loader(ds, batches, tags, num_workers=opts.num_workers):
                consume(batch, embed(batch))
        else:
            # Concurrent forwards on different batches, each with threads // streams intra-op threads: a stream
            # preempted by a decoding worker stalls alone, where one multi-threaded forward waits at every
            # barrier for its preempted thread. With num_workers=0 each stream decodes its own next batch
            # before its forward: exactly one runnable thread per stream, no process competing with the model
            # threads and no batch pickled through shared memory (on 2 cores the fastest way, docs/benchmarks.md).
            # Results are consumed in batch order, so bookkeeping, errors and shard writes behave exactly as
            # with one stream.
            if opts.num_workers > 0:
                jobs = ((embed_loaded, b) for b in batch_loader(ds, batches, tags, num_workers=opts.num_workers))
            else:
                in_stream = TaggedBatchDataset(ds, batches, tags)
                jobs = ((decode_and_embed, k) for k in range(len(batches)))
            with concurrent.futures.ThreadPoolExecutor(opts.model_streams, thread_name_prefix="spk-model") as pool:
                pending: Deque = collections.deque()
                try:
                    # streams running and one queued: a stream that finishes early starts the next job at once
                    for fn, arg in jobs:
                        pending.append(pool.submit(fn, arg))
                        while len(pending) > opts.model_streams:
                            consume(*pending.popleft().result())
                    while pending:
                        consume(*pending.popleft().result())
                finally:
                    for fut in pending:
                        fut.cancel()
        if pbar is not None:
            pbar.close()
    # items decoded: the dataset counts them itself only when one thread of this process decodes
    single = opts.num_workers == 0 and opts.model_streams == 1
    stats["decoded"] = ds.decoded if single else sum(len(b) for b in batches)
    return stats


def _read_shard(path: Path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def merge(plan: Plan, output_dir: str | os.PathLike, opts: ExtractOptions, extra_summary: Optional[dict] = None) -> dict:
    """Verify and merge all shards into the final outputs; returns the summary (also ``summary.json``).

    Outputs are written in the corpus' input order (ESPnet TTS needs ``text`` order). Speaker means
    (``spk_embeddings.npz``) are the arithmetic mean of the speaker's raw utterance embeddings (not
    L2-normalised first, not re-normalised), written when the corpus has speaker labels.

    Raises
    ------
    ExtractionError
        A shard is missing, an utterance appears twice, or an utterance is neither embedded nor in the errors.
    """
    out = Path(output_dir)
    missing = [k for k in range(len(plan.shards)) if not shard_path(out, k).is_file()]
    if missing:
        raise ExtractionError(f"cannot merge: {len(missing)} shard(s) not finished, e.g. {missing[:5]}")
    emb: Dict[str, np.ndarray] = {}
    path_of = {u.utt_id: u.path for u in plan.utts}
    errors: Dict[str, tuple] = {u: (u, path_of[u], r) for u, r in plan.pre_errors.items()}
    audio_s, shard_wall = 0.0, []
    for k in range(len(plan.shards)):
        z = _read_shard(shard_path(out, k))
        if int(z["count"]) != len(plan.shards[k]):
            raise ExtractionError(f"shard {k} holds {int(z['count'])} records, plan says {len(plan.shards[k])}")
        for key, vec in zip(z["keys"].tolist(), z["emb"]):
            if key in emb or key in errors:
                raise ExtractionError(f"utterance {key!r} appears twice (shard {k})")
            emb[key] = vec
        for key, path, reason in zip(z["err_keys"].tolist(), z["err_paths"].tolist(), z["err_reasons"].tolist()):
            if key in emb or key in errors:
                raise ExtractionError(f"utterance {key!r} appears twice (shard {k})")
            errors[key] = (key, path, reason)
        audio_s += float(z["audio_seconds"])
        shard_wall.append(float(z["wall"]))
    lost = [u.utt_id for u in plan.utts if u.utt_id not in emb and u.utt_id not in errors]
    if lost:
        raise ExtractionError(f"{len(lost)} utterance(s) neither embedded nor in errors.tsv, e.g. {lost[:5]}")
    order = [u.utt_id for u in plan.utts if u.utt_id in emb]
    outputs = {}
    for fmt in opts.output_format:
        with get_writer(fmt)(out, "embeddings") as w:
            for key in order:
                w.write(key, emb[key])
        outputs[fmt] = str(w.path)
    spk2utt = spk2utt_from(u for u in plan.utts if u.utt_id in emb)
    if spk2utt:
        with get_writer("npz")(out, "spk_embeddings") as w:
            for spk, keys in spk2utt.items():
                w.write(spk, np.mean(np.stack([emb[k] for k in keys]).astype(np.float64), axis=0).astype(np.float32))
        outputs["spk_npz"] = str(w.path)
    err_lines = [errors[u.utt_id] for u in plan.utts if u.utt_id in errors]
    _atomic_write_text(out / "errors.tsv", "utt_id\tpath\treason\n" + "".join(
        f"{a}\t{b}\t{' '.join(c.split())}\n" for a, b, c in err_lines))
    outputs["errors"] = str(out / "errors.tsv")
    dim = next(iter(emb.values())).shape[-1] if emb else plan.model_info.get("embed_dim", 0)
    summary = {
        "utterances": len(plan.utts), "embedded": len(emb), "errors": len(err_lines),
        "speakers": len(spk2utt), "audio_hours": audio_s / 3600.0, "embedding_dim": int(dim),
        "model": plan.model_info, "shards": len(plan.shards), "shard_wall_seconds_mean": float(np.mean(shard_wall)) if shard_wall else 0.0,
        "output_formats": opts.output_format, "outputs": outputs,
    }
    if extra_summary:
        summary.update(extra_summary)
    if summary.get("wall_seconds"):
        summary["throughput_x_realtime"] = audio_s / summary["wall_seconds"]
        summary["utterances_per_second"] = len(emb) / summary["wall_seconds"]
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    for stale in (out / "shards").glob(".shard-*.tmp*"):  # partial shards of killed runs (never read)
        stale.unlink(missing_ok=True)
    return summary


def format_summary(summary: dict) -> str:
    """A one-screen human summary (humanfriendly sizes and durations)."""
    import humanfriendly as hf

    lines = [
        f"utterances : {summary['utterances']} ({summary['embedded']} embedded, {summary['errors']} errors"
        + (f", see {summary['outputs']['errors']})" if summary["errors"] else ")"),
        f"speakers   : {summary['speakers']}",
        f"audio      : {hf.format_timespan(summary['audio_hours'] * 3600)}",
        f"model      : {summary['model'].get('toolkit')} (dim {summary['embedding_dim']})",
    ]
    if summary.get("wall_seconds"):
        lines.append(f"wall time  : {hf.format_timespan(summary['wall_seconds'])} "
                     f"({summary.get('throughput_x_realtime', 0):.1f}x real time, "
                     f"{summary.get('utterances_per_second', 0):.1f} utt/s)")
    lines.append(f"shards     : {summary['shards']} ({summary.get('shards_resumed', 0)} resumed from a previous run)")
    for k, v in summary["outputs"].items():
        lines.append(f"{k:<11}: {v}")
    return "\n".join(lines)


def extract(
    data: str | os.PathLike | Sequence[Utterance],
    output_dir: str | os.PathLike,
    toolkit: str = "resemblyzer",
    model: Optional[EmbeddingModel] = None,
    model_kwargs: Optional[dict] = None,
    **options,
) -> dict:
    """Extract one embedding per utterance of a corpus, in this process (resumable).

    Parameters
    ----------
    data : path or sequence of Utterance
        Kaldi data dir, ESPnet3 manifest TSV, audio tree ``root/<dataset>/<speaker>/<utt>.<ext>``, or records.
    output_dir : path
        Output directory (layout in the module docstring). An existing run there is resumed.
    toolkit : str
        Backend name (``resemblyzer`` = offline default, ``espnet``) used when ``model`` is None.
    model : EmbeddingModel, optional
        A backend instance (reused, e.g. by the trainer).
    model_kwargs : dict, optional
        Backend constructor arguments (``device``, ``train_config``, ``model_file`` ...).
    **options
        Fields of :class:`ExtractOptions`.

    Returns
    -------
    dict
        The summary (also written to ``summary.json``).

    Raises
    ------
    CorpusError, ExtractionError
        See :func:`prepare_run`, :func:`run_shards`, :func:`merge`.
    """
    opts = ExtractOptions(**options)
    t0 = time.perf_counter()
    if model is None:
        model = load_model(toolkit, **(model_kwargs or {}))
    plan = prepare_run(data, output_dir, model.describe(), opts)
    done_before = finished_shards(output_dir, len(plan.shards))
    stats = run_shards(plan, range(len(plan.shards)), model, output_dir, opts)
    wall = time.perf_counter() - t0
    return merge(plan, output_dir, opts, {"wall_seconds": wall, "shards_resumed": len(done_before),
                                          "padding_waste": stats["padding_waste"],
                                          "executor": "in-process", "world_size": 1})
