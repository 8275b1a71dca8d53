"""Verify every shard and merge them into the final outputs, in input order, with the run summary.

Memory stays bounded by the largest shard: each shard is read once and its rows are spilled to one flat
temporary file per output (``np.memmap``), from which the writers are fed in input order (ESPnet TTS needs
``text`` order). Speaker means are accumulated in float64 per speaker.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from spk_toolkit.engine.faults import fault_point
from spk_toolkit.engine.options import ExtractionError, ExtractOptions
from spk_toolkit.engine.plan import PLAN_NAME, Plan
from spk_toolkit.engine.shards import ShardInvalid, read_shard, shard_path
from spk_toolkit.io.atomic import atomic_write_text, is_temporary
from spk_toolkit.io.datadir import spk2utt_from
from spk_toolkit.io.preflight import naming
from spk_toolkit.io.writers import get_writer

logger = logging.getLogger(__name__)

EMBEDDING = "embedding"  # the output name of speaker-embedding backends


def output_stem(name: str) -> str:
    """File stem of an output: ``embeddings`` for the ``embedding`` output (ESPnet's and our name), else ``name``."""
    return "embeddings" if name == EMBEDDING else name


#: Files and directories of a run, besides the outputs' storage files (removed by ``--overwrite``).
RUN_FILES = (PLAN_NAME, "summary.json", "errors.tsv", "run.log")
RUN_DIRS = ("shards", "ranks", "scores")
STORAGE_SUFFIXES = (".npz", ".ark", ".scp", ".h5", ".hdf5")


def remove_run(out: Path) -> List[str]:
    """Remove every file a previous run wrote in ``out`` (``--overwrite``); returns what was removed.

    That is the run files (:data:`RUN_FILES`, :data:`RUN_DIRS`), the storage files of every output the previous
    summary or plan names and of the default stems (``embeddings``, ``spk_embeddings``) in every registered
    format, and temporary files of killed runs. Nothing else in ``out`` is touched.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    stems = {"embeddings", "spk_embeddings"}
    paths = set()
    try:
        old = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        for name in old.get("kinds", {}):
            stems.add(output_stem(name))
        for v in old.get("outputs", {}).values():
            if isinstance(v, str):
                paths.add(Path(v).name)
    except (OSError, ValueError, AttributeError):
        pass
    removed = []
    for stem in stems:
        for suf in STORAGE_SUFFIXES:
            paths.add(stem + suf)
            paths.add(f".{stem}{suf}.lock")  # commit-group lock of multi-file formats (io.atomic.commit_together)
        paths.add(stem)  # npy_dir
    for name in sorted(paths | set(RUN_FILES) | set(RUN_DIRS)):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            if name in RUN_DIRS or name in stems:
                shutil.rmtree(p)
                removed.append(name + "/")
        elif p.exists() or p.is_symlink():
            p.unlink()
            removed.append(name)
    for p in out.iterdir():
        if is_temporary(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return removed


def errors_tsv(records) -> str:
    """The text of ``errors.tsv``: a header and one ``utt_id<TAB>path<TAB>reason`` row per record.

    Written with the :mod:`csv` module (TAB delimiter, ``\n`` line ends, minimal quoting), so a path holding a
    TAB, a newline or a double quote is quoted and every row has exactly three columns; read it back with
    :func:`read_errors_tsv` (or ``csv.reader(f, delimiter="\t")``). Whitespace runs in a reason become one space.

    Parameters
    ----------
    records : iterable of (utt_id, path, reason)

    Returns
    -------
    str
    """
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(["utt_id", "path", "reason"])
    for uid, path, reason in records:
        w.writerow([uid, path, " ".join(str(reason).split())])
    return buf.getvalue()


def read_errors_tsv(path) -> List[tuple]:
    """Rows of an ``errors.tsv`` written by :func:`errors_tsv`: ``[(utt_id, path, reason), ...]``.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    list of (str, str, str)

    Raises
    ------
    ValueError
        A row without exactly three columns (names file and row).
    OSError
        The file cannot be read.
    """
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    for n, r in enumerate(rows[1:], 2):
        if len(r) != 3:
            raise ValueError(f"{path}: row {n} has {len(r)} columns, expected utt_id, path, reason")
    return [tuple(r) for r in rows[1:]]


def _spill_path(out: Path, name: str) -> Path:
    return out / f".merge-{name}.tmp{os.getpid()}.bin"


def merge(plan: Plan, output_dir, opts: ExtractOptions, extra_summary: Optional[dict] = None) -> dict:
    """Verify and merge all shards into the final outputs; returns the summary (also ``summary.json``).

    Outputs are written in the corpus' input order through the storage registry (``opts.output_format``), one
    set of files per output name (:func:`output_stem`). Speaker means (``spk_embeddings``, npz) are the
    arithmetic mean of the speaker's raw utterance embeddings (not L2-normalised first, not re-normalised),
    written when the corpus has speaker labels and the model has an ``embedding`` output.

    Raises
    ------
    ExtractionError
        A shard is missing or does not verify (named), an utterance appears twice, or an utterance is neither
        stored nor in the errors.
    """
    out = Path(output_dir)
    path_of = {u.utt_id: u.path for u in plan.utts}
    errors: Dict[str, tuple] = {u: (u, path_of[u], r) for u, r in plan.pre_errors.items()}
    index: Dict[str, int] = {}  # utt_id -> row in the spill files
    lengths: Dict[str, List[int]] = {}  # per output, first-axis length per utterance (1 for vectors)
    kinds: Dict[str, dict] = {}
    spills: Dict[str, object] = {}
    offsets: Dict[str, List[int]] = {}
    audio_s, shard_wall, workers, clipped = 0.0, [], {}, 0
    try:
        for k in range(len(plan.shards)):
            p = shard_path(out, k)
            if not p.is_file():
                raise ExtractionError(f"cannot merge: {p} is missing (shard {k} not finished)")
            try:
                sd = read_shard(p, k, plan.shard_keys(k), plan.shard_fingerprint(k))
            except ShardInvalid as e:
                raise ExtractionError(f"cannot merge: {e}") from None
            if not kinds:
                kinds = sd.kinds
            elif sd.kinds != kinds and sd.keys:
                raise ExtractionError(f"cannot merge: {p} holds outputs {sd.kinds}, other shards {kinds}")
            for name in kinds:
                if name not in spills:
                    spills[name] = open(_spill_path(out, name), "wb")
                    offsets[name], lengths[name] = [], []
            with naming(out):  # the spill files are temporaries in out: name the directory
                for row, key in enumerate(sd.keys):
                    if key in index or key in errors:
                        raise ExtractionError(f"utterance {key!r} appears twice (shard {k})")
                    index[key] = len(index)
                    for name in kinds:
                        a = np.ascontiguousarray(sd.outputs[name][row], dtype=np.dtype(kinds[name]["dtype"]))
                        f = spills[name]
                        offsets[name].append(f.tell())
                        f.write(a.tobytes())
                        lengths[name].append(len(a) if kinds[name]["kind"] == "sequence" else 1)
            for key, path, reason in sd.errors:
                if key in index or key in errors:
                    raise ExtractionError(f"utterance {key!r} appears twice (shard {k})")
                errors[key] = (key, path, reason)
            audio_s += sd.audio_seconds
            clipped += len(sd.clipped)
            shard_wall.append(sd.wall)
            workers.setdefault(sd.worker, 0)
            workers[sd.worker] += 1
        with naming(out):
            for f in spills.values():
                f.close()
        lost = [u.utt_id for u in plan.utts if u.utt_id not in index and u.utt_id not in errors]
        if lost:
            raise ExtractionError(f"{len(lost)} utterance(s) neither embedded nor in errors.tsv, e.g. {lost[:5]}")
        order = [u.utt_id for u in plan.utts if u.utt_id in index]
        outputs, by_name = {}, {}
        for name, kind in kinds.items():
            dtype, tail = np.dtype(kind["dtype"]), tuple(kind["shape"])
            size = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
            flat = (np.memmap(_spill_path(out, name), dtype=np.uint8, mode="r")
                    if os.path.getsize(_spill_path(out, name)) else np.zeros(0, np.uint8))
            offs, lens = offsets[name], lengths[name]

            def row_of(key: str) -> np.ndarray:
                r = index[key]
                n = lens[r]
                buf = flat[offs[r]: offs[r] + n * size]
                arr = np.frombuffer(buf, dtype=dtype)
                return arr.reshape((n, *tail) if kind["kind"] == "sequence" else tail).copy()

            by_name[name] = {}
            for fmt in opts.output_format:
                with naming(get_writer(fmt).output_path(out, output_stem(name))), \
                        get_writer(fmt)(out, output_stem(name), **opts.writer_options.get(fmt, {})) as w:
                    for key in order:
                        w.write(key, row_of(key))
                by_name[name][fmt] = str(w.path)
                fault_point("merge_output")
                if name == EMBEDDING:
                    outputs[fmt] = str(w.path)
            spk2utt = spk2utt_from(u for u in plan.utts if u.utt_id in index)
            if name == EMBEDDING and kind["kind"] == "vector" and spk2utt:
                with naming(out / "spk_embeddings.npz"), get_writer("npz")(out, "spk_embeddings") as w:
                    for spk, keys in spk2utt.items():
                        mean = np.mean(np.stack([row_of(k).astype(np.float64) for k in keys]), axis=0)
                        w.write(spk, mean.astype(np.float32))
                outputs["spk_npz"] = str(w.path)
            del flat
    finally:
        for name, f in spills.items():
            f.close()
            _spill_path(out, name).unlink(missing_ok=True)
    err_lines = [errors[u.utt_id] for u in plan.utts if u.utt_id in errors]
    with naming(out / "errors.tsv"):
        atomic_write_text(out / "errors.tsv", errors_tsv(err_lines))
    outputs["errors"] = str(out / "errors.tsv")
    emb_kind = kinds.get(EMBEDDING) or plan.model_info.get("outputs", {}).get(EMBEDDING)
    dim = int(emb_kind["shape"][-1]) if emb_kind and emb_kind.get("shape") else int(plan.model_info.get("embed_dim", 0))
    spk2utt = spk2utt_from(u for u in plan.utts if u.utt_id in index)
    summary = {
        "utterances": len(plan.utts), "embedded": len(index), "errors": len(err_lines),
        "speakers": len(spk2utt), "audio_hours": audio_s / 3600.0, "embedding_dim": dim,
        "segments_clipped": clipped,
        "model": plan.model_info, "kinds": kinds, "shards": len(plan.shards),
        "shard_wall_seconds_mean": float(np.mean(shard_wall)) if shard_wall else 0.0,
        "output_formats": opts.output_format, "outputs": outputs, "outputs_by_name": by_name,
        "shard_workers": workers,
    }
    if extra_summary:
        summary.update(extra_summary)
    if summary.get("wall_seconds"):
        computed = summary.get("computed_audio_seconds", audio_s)
        summary["throughput_x_realtime"] = computed / summary["wall_seconds"]
        summary["utterances_per_second"] = summary.get("computed_utterances", len(index)) / summary["wall_seconds"]
    with naming(out / "summary.json"):
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    sdir = out / "shards"
    for stale in (list(sdir.iterdir()) if sdir.is_dir() else []) + list(out.iterdir()):
        if is_temporary(stale.name):  # partial files of killed runs (never read)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return summary


def _model_line(summary: dict) -> str:
    """``resemblyzer (dim 256)``, or for a feature extractor ``fbank (fbank: sequence float32 (T', 80))``."""
    name = summary["model"].get("toolkit")
    if summary.get("embedding_dim"):
        return f"{name} (dim {summary['embedding_dim']})"
    outs = [f"{n}: {k.get('kind')} {k.get('dtype')} ("
            + ", ".join((["T'"] if k.get("kind") == "sequence" else []) + [str(d) for d in k.get("shape", [])]) + ")"
            for n, k in summary.get("kinds", {}).items()]
    return f"{name} ({'; '.join(outs)})" if outs else str(name)


def format_summary(summary: dict) -> str:
    """A one-screen human summary (humanfriendly sizes and durations)."""
    import humanfriendly as hf

    lines = [
        f"utterances : {summary['utterances']} ({summary['embedded']} embedded, {summary['errors']} errors"
        + (f", see {summary['outputs']['errors']})" if summary["errors"] else ")"),
        f"speakers   : {summary['speakers']}",
        f"audio      : {hf.format_timespan(summary['audio_hours'] * 3600)}",
        f"model      : {_model_line(summary)}",
    ]
    # what this run did, apart from what a previous run had finished (shards verified and reused)
    computed = summary.get("computed_utterances")
    resumed = summary.get("shards_resumed", 0)
    if computed is not None:
        lines.append(f"this run   : {computed} embedded ({hf.format_timespan(summary.get('computed_audio_seconds', 0))}"
                     f" of audio) in {summary.get('shards_run', 0)} shard(s)"
                     + (f"; {resumed} shard(s) resumed from a previous run" if resumed else ""))
    if summary.get("wall_seconds"):
        speed = (f"{summary.get('throughput_x_realtime', 0):.1f}x real time, "
                 f"{summary.get('utterances_per_second', 0):.1f} utt/s" if computed is None or computed > 0
                 else "nothing left to embed")
        lines.append(f"wall time  : {hf.format_timespan(summary['wall_seconds'])} ({speed})")
    ex = summary.get("executor")
    if ex:
        lines.append(f"executor   : {ex} (world size {summary.get('world_size', 1)})")
    lines.append(f"shards     : {summary['shards']} ({resumed} resumed from a previous run"
                 + (f", {summary['shards_recomputed']} recomputed" if summary.get("shards_recomputed") else "")
                 + ")")
    if summary.get("segments_clipped"):
        lines.append(f"clipped    : {summary['segments_clipped']} segment(s) ran past the end of their file; embedded "
                     "what exists (--segment_overrun clip)")
    for k, v in summary["outputs"].items():
        lines.append(f"{k:<11}: {v}")
    return "\n".join(lines)
