"""Verify every shard and merge them into the final outputs, in input order, with the run summary.

Memory stays bounded by the largest shard: each shard is read once and its rows are spilled to one flat
temporary file per output (``np.memmap``), from which the writers are fed in input order (ESPnet TTS needs
``text`` order). Speaker means are accumulated in float64 per speaker.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Dict, List, Optional

import numpy as np

from spk_toolkit.engine.faults import fault_point
from spk_toolkit.engine.options import ExtractionError, ExtractOptions
from spk_toolkit.engine.plan import Plan
from spk_toolkit.engine.shards import ShardInvalid, read_shard, shard_path
from spk_toolkit.io.datadir import spk2utt_from
from spk_toolkit.io.preflight import naming
from spk_toolkit.io.rundir import (  # noqa: F401  (errors_tsv, read_errors_tsv: re-exported)
    EMBEDDING, EMBEDDING_STEM, SPEAKER_MEANS, RunDir, errors_tsv, output_stem, read_errors_tsv)
from spk_toolkit.io.storage import WRITERS, get_writer, load_plugins
from spk_toolkit.scoring import average_embeddings

logger = logging.getLogger(__name__)



def remove_run(out: Path) -> List[str]:
    """Remove every file a previous run wrote in ``out`` (``--overwrite``); returns what was removed.

    :meth:`spk_toolkit.io.rundir.RunDir.remove` with every registered storage format's writer.
    """
    load_plugins()  # a plug-in format's files are removed through its own writer too
    return RunDir(out).remove(WRITERS.values())


class _Spill:
    """The rows of every shard, spilled to one flat temporary file per output (``np.memmap`` at merge time), so
    the merge holds one shard in memory at a time at any corpus size."""

    def __init__(self, out: Path):
        self.out = out
        self.index: Dict[str, int] = {}  # utt_id -> row in the spill files
        self.kinds: Dict[str, dict] = {}
        self.files: Dict[str, object] = {}
        self.offsets: Dict[str, List[int]] = {}
        self.lengths: Dict[str, List[int]] = {}  # first-axis length per utterance (1 for vectors)
        self.flat: Dict[str, np.ndarray] = {}
        self._layouts: Dict[str, tuple] = {}

    def path(self, name: str) -> Path:
        return self.out / f".merge-{name}.tmp{os.getpid()}.bin"

    def add_shard(self, sd, k: int, errors: Dict[str, tuple]) -> None:
        """Append shard ``k``'s rows (``sd``: :class:`spk_toolkit.engine.shards.ShardData`).

        Raises
        ------
        ExtractionError
            The shard's outputs differ from the others', or one of its utterances was already seen.
        """
        if not self.kinds:
            self.kinds = sd.kinds
        elif sd.kinds != self.kinds and sd.keys:
            raise ExtractionError(f"cannot merge: {shard_path(self.out, k)} holds outputs {sd.kinds}, other shards "
                                  f"{self.kinds}")
        for name in self.kinds:
            if name not in self.files:
                self.files[name] = open(self.path(name), "wb")
                self.offsets[name], self.lengths[name] = [], []
        with naming(self.out):  # the spill files are temporaries in out: name the directory
            for row, key in enumerate(sd.keys):
                if key in self.index or key in errors:
                    raise ExtractionError(f"utterance {key!r} appears twice (shard {k})")
                self.index[key] = len(self.index)
                for name, kind in self.kinds.items():
                    a = np.ascontiguousarray(sd.outputs[name][row], dtype=np.dtype(kind["dtype"]))
                    self.offsets[name].append(self.files[name].tell())
                    self.files[name].write(a.tobytes())
                    self.lengths[name].append(len(a) if kind["kind"] == "sequence" else 1)

    def finish(self) -> None:
        """Close the spill files and map them for reading."""
        with naming(self.out):
            for name, f in self.files.items():
                f.close()
                p = self.path(name)
                self.flat[name] = np.memmap(p, dtype=np.uint8, mode="r") if os.path.getsize(p) else np.zeros(0, np.uint8)

    def _layout(self, name: str) -> tuple:
        """``(dtype, tail shape, bytes per row, is sequence)`` of output ``name`` (computed once per output)."""
        if name not in self._layouts:
            kind = self.kinds[name]
            dtype, tail = np.dtype(kind["dtype"]), tuple(kind["shape"])
            self._layouts[name] = (dtype, tail, int(np.prod(tail, dtype=np.int64)) * dtype.itemsize,
                                   kind["kind"] == "sequence")
        return self._layouts[name]

    def row(self, name: str, key: str) -> np.ndarray:
        """Output ``name`` of utterance ``key``, as stored in its shard."""
        dtype, tail, size, sequence = self._layout(name)
        r = self.index[key]
        n = self.lengths[name][r]
        buf = self.flat[name][self.offsets[name][r]: self.offsets[name][r] + n * size]
        return np.frombuffer(buf, dtype=dtype).reshape((n, *tail) if sequence else tail).copy()

    def view(self, name: str) -> Mapping[str, np.ndarray]:
        """A read-only ``utt_id -> array`` mapping of output ``name`` (for :func:`average_embeddings`)."""
        spill = self

        class _View(Mapping):
            def __getitem__(self, key):
                return spill.row(name, key)

            def __iter__(self):
                return iter(spill.index)

            def __len__(self):
                return len(spill.index)

        return _View()

    def close(self) -> None:
        """Close and remove the spill files (also after a failure)."""
        self.flat.clear()
        for name, f in self.files.items():
            f.close()
            self.path(name).unlink(missing_ok=True)


def _read_shards(plan: Plan, out: Path, spill: _Spill, errors: Dict[str, tuple]) -> dict:
    """Verify every shard and spill its rows; returns the shard accounting (audio, clipped, wall, workers).

    Raises
    ------
    ExtractionError
        A shard is missing or does not verify (named), or an utterance appears twice.
    """
    acct = {"audio_s": 0.0, "clipped": 0, "wall": [], "workers": {}}
    for k in range(len(plan.shards)):
        p = shard_path(out, k)
        if not p.is_file():
            raise ExtractionError(f"cannot merge: {p} is missing (shard {k} not finished)")
        try:
            sd = read_shard(p, k, plan.shard_keys(k), plan.shard_fingerprint(k))
        except ShardInvalid as e:
            raise ExtractionError(f"cannot merge: {e}") from None
        spill.add_shard(sd, k, errors)
        for key, path, reason in sd.errors:
            if key in spill.index or key in errors:
                raise ExtractionError(f"utterance {key!r} appears twice (shard {k})")
            errors[key] = (key, path, reason)
        acct["audio_s"] += sd.audio_seconds
        acct["clipped"] += len(sd.clipped)
        acct["wall"].append(sd.wall)
        acct["workers"][sd.worker] = acct["workers"].get(sd.worker, 0) + 1
    return acct


def _write_outputs(plan: Plan, out: Path, opts: ExtractOptions, spill: _Spill) -> tuple:
    """Write every output in every format, in input order, and the speaker means; returns
    ``(outputs, outputs_by_name)`` as the summary records them."""
    order = [u.utt_id for u in plan.utts if u.utt_id in spill.index]
    spk2utt = spk2utt_from(u for u in plan.utts if u.utt_id in spill.index)
    outputs, by_name = {}, {}
    for name, kind in spill.kinds.items():
        stem = output_stem(name, opts.output_stem)
        by_name[name] = {}
        for fmt in opts.output_format:
            with naming(get_writer(fmt).output_path(out, stem)), \
                    get_writer(fmt)(out, stem, **opts.writer_options.get(fmt, {})) as w:
                for key in order:
                    w.write(key, spill.row(name, key))
            by_name[name][fmt] = str(w.path)
            fault_point("merge_output")
            if name == EMBEDDING:
                outputs[fmt] = str(w.path)
        if name == EMBEDDING and kind["kind"] == "vector" and spk2utt:
            means = average_embeddings(spill.view(name), spk2utt)
            rd = RunDir(out)
            with naming(rd.speaker_means_path()), get_writer("npz")(out, SPEAKER_MEANS) as w:
                for spk in spk2utt:
                    w.write(spk, means[spk].astype(np.float32))
            outputs["spk_npz"] = str(w.path)
    return outputs, by_name


def merge(plan: Plan, output_dir, opts: ExtractOptions, extra_summary: Optional[dict] = None) -> dict:
    """Verify and merge all shards into the final outputs; returns the summary (also ``summary.json``).

    Outputs are written in the corpus' input order through the storage registry (``opts.output_format``), one
    set of files per output name (:func:`spk_toolkit.io.rundir.output_stem`, ``opts.output_stem`` for the
    ``embedding`` output). Speaker means (``spk_embeddings``, npz) are the arithmetic mean of the speaker's raw
    utterance embeddings in float64 (:func:`spk_toolkit.scoring.average_embeddings`; not L2-normalised first,
    not re-normalised), written when the corpus has speaker labels and the model has an ``embedding`` output.

    Raises
    ------
    ExtractionError
        A shard is missing or does not verify (named), an utterance appears twice, or an utterance is neither
        stored nor in the errors.
    """
    out, rd = Path(output_dir), RunDir(output_dir)
    path_of = {u.utt_id: u.path for u in plan.utts}
    errors: Dict[str, tuple] = {u: (u, path_of[u], r) for u, r in plan.pre_errors.items()}
    spill = _Spill(out)
    try:
        acct = _read_shards(plan, out, spill, errors)
        spill.finish()
        lost = [u.utt_id for u in plan.utts if u.utt_id not in spill.index and u.utt_id not in errors]
        if lost:
            raise ExtractionError(f"{len(lost)} utterance(s) neither embedded nor in errors.tsv, e.g. {lost[:5]}")
        outputs, by_name = _write_outputs(plan, out, opts, spill)
    finally:
        spill.close()
    err_lines = [errors[u.utt_id] for u in plan.utts if u.utt_id in errors]
    with naming(rd.errors_path):
        outputs["errors"] = str(rd.write_errors(err_lines))
    summary = _summary(plan, opts, spill, acct, len(err_lines), outputs, by_name, extra_summary)
    with naming(rd.summary_path):
        rd.write_summary(summary)
    rd.remove_temporaries()
    return summary


def _summary(plan: Plan, opts: ExtractOptions, spill: _Spill, acct: dict, n_errors: int, outputs: dict,
             by_name: dict, extra: Optional[dict]) -> dict:
    """The run summary (``summary.json``'s schema: :mod:`spk_toolkit.io.rundir`)."""
    kinds = spill.kinds
    emb_kind = kinds.get(EMBEDDING) or plan.model_info.get("outputs", {}).get(EMBEDDING)
    dim = int(emb_kind["shape"][-1]) if emb_kind and emb_kind.get("shape") else int(plan.model_info.get("embed_dim", 0))
    spk2utt = spk2utt_from(u for u in plan.utts if u.utt_id in spill.index)
    summary = {
        "utterances": len(plan.utts), "embedded": len(spill.index), "errors": n_errors,
        "speakers": len(spk2utt), "audio_hours": acct["audio_s"] / 3600.0, "embedding_dim": dim,
        "segments_clipped": acct["clipped"],
        "model": plan.model_info, "kinds": kinds, "shards": len(plan.shards),
        "shard_wall_seconds_mean": float(np.mean(acct["wall"])) if acct["wall"] else 0.0,
        "output_formats": opts.output_format, "outputs": outputs, "outputs_by_name": by_name,
        "shard_workers": acct["workers"],
    }
    if opts.output_stem != EMBEDDING_STEM:
        summary["output_stem"] = opts.output_stem
    if extra:
        summary.update(extra)
    if summary.get("wall_seconds"):
        computed = summary.get("computed_audio_seconds", acct["audio_s"])
        summary["throughput_x_realtime"] = computed / summary["wall_seconds"]
        summary["utterances_per_second"] = summary.get("computed_utterances", len(spill.index)) / summary["wall_seconds"]
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
    """A one-screen human summary (humanfriendly sizes and durations), in the words of what the run made: a speaker
    model's utterances are "embedded", a feature extractor's (no ``embedding`` output) have features "computed"."""
    import humanfriendly as hf

    features = EMBEDDING not in (summary.get("kinds") or {})
    done, verb = ("with features computed", "computed") if features else ("embedded", "embedded")
    lines = [
        f"utterances : {summary['utterances']} ({summary['embedded']} {done}, {summary['errors']} errors"
        + (f", see {summary['outputs']['errors']})" if summary["errors"] else ")"),
        f"speakers   : {summary['speakers']}",
        f"audio      : {hf.format_timespan(summary['audio_hours'] * 3600)}",
        f"model      : {_model_line(summary)}",
    ]
    # what this run did, apart from what a previous run had finished (shards verified and reused)
    computed = summary.get("computed_utterances")
    resumed = summary.get("shards_resumed", 0)
    if computed is not None:
        lines.append(f"this run   : {computed} {verb} ({hf.format_timespan(summary.get('computed_audio_seconds', 0))}"
                     f" of audio) in {summary.get('shards_run', 0)} shard(s)"
                     + (f"; {resumed} shard(s) resumed from a previous run" if resumed else ""))
    if summary.get("wall_seconds"):
        speed = (f"{summary.get('throughput_x_realtime', 0):.1f}x real time, "
                 f"{summary.get('utterances_per_second', 0):.1f} utt/s" if computed is None or computed > 0
                 else f"nothing left to {'compute' if features else 'embed'}")
        lines.append(f"wall time  : {hf.format_timespan(summary['wall_seconds'])} ({speed})")
    ex = summary.get("executor")
    if ex:
        lines.append(f"executor   : {ex} (world size {summary.get('world_size', 1)})")
    lines.append(f"shards     : {summary['shards']} ({resumed} resumed from a previous run"
                 + (f", {summary['shards_recomputed']} recomputed" if summary.get("shards_recomputed") else "")
                 + ")")
    if summary.get("segments_clipped"):
        lines.append(f"clipped    : {summary['segments_clipped']} segment(s) ran past the end of their file; {verb} "
                     "what exists (--segment_overrun clip)")
    for k, v in summary["outputs"].items():
        lines.append(f"{k:<11}: {v}")
    return "\n".join(lines)
