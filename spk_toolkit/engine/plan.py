"""The shard plan: corpus -> duration-balanced shards, with the fingerprints that make resume safe.

``plan.json`` (written atomically by the driver) holds the plan fingerprint (corpus ids/paths/segments, model
description, options), the durations, the shards and the header-pass refusals. Each shard also has its own
fingerprint (:meth:`Plan.shard_fingerprint`) over the model, the output-affecting options and, per utterance,
id, source, segment and the source file's size and modification time: a finished shard whose fingerprint no
longer matches (a source file changed, the model changed) is recomputed, even when ``plan.json`` was removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from spk_toolkit.io.rundir import PLAN
from spk_toolkit.engine.options import ExtractionError, ExtractOptions
from spk_toolkit.io.atomic import atomic_write_text
from spk_toolkit.io.preflight import naming
from spk_toolkit.io.audio import is_pipe
from spk_toolkit.io.datadir import CorpusError, Utterance, load_corpus, measure_durations

logger = logging.getLogger(__name__)

PLAN_VERSION = 2
PLAN_NAME = PLAN  # spk_toolkit.io.rundir names the run's files


@dataclasses.dataclass
class Plan:
    """A deterministic shard plan.

    Attributes
    ----------
    utts : list of Utterance
        The corpus in input order.
    shards : list of list of int
        Indices into ``utts`` per shard (each index exactly once over all shards, header-pass refusals excepted).
    pre_errors : dict
        ``utt_id -> reason`` for utterances refused before decoding (unreadable header, refused pipe).
    fingerprint : str
        sha256 over corpus, model description and options (``plan.json``).
    model_info : dict
        The backend's ``describe()``.
    stamps : list of str
        Per utterance, ``"size:mtime_ns"`` of its source file when the plan was made (``"pipe"`` for commands,
        ``"missing"`` when it cannot be stat'ed); part of the shard fingerprints.
    options : dict
        :meth:`ExtractOptions.output_affecting` (part of the shard fingerprints).
    """

    utts: List[Utterance]
    shards: List[List[int]]
    pre_errors: Dict[str, str]
    fingerprint: str
    model_info: dict
    stamps: List[str] = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=dict)

    def shard_duration(self, k: int) -> float:
        """Audio in shard ``k``, in seconds (sum of the planned utterance durations; unknown counts as 0)."""
        return float(sum(self.utts[i].duration or 0.0 for i in self.shards[k]))

    def shard_keys(self, k: int) -> List[str]:
        """Utterance ids of shard ``k`` in plan order."""
        return [self.utts[i].utt_id for i in self.shards[k]]

    def shard_fingerprint(self, k: int) -> str:
        """sha256 over model, output-affecting options and shard ``k``'s utterances with their source stamps."""
        h = hashlib.sha256()
        h.update(json.dumps({"model": self.model_info, "options": self.options, "v": PLAN_VERSION},
                            sort_keys=True, default=str).encode())
        for i in self.shards[k]:
            u = self.utts[i]
            stamp = self.stamps[i] if self.stamps else ""
            h.update(f"{u.utt_id}\t{u.path}\t{u.start}\t{u.end}\t{stamp}\n".encode())
        return h.hexdigest()


def source_stamp(u: Utterance) -> str:
    """``"size:mtime_ns"`` of an utterance's audio file, ``"pipe"`` for a ``cmd |`` entry, ``"missing"`` if it
    cannot be stat'ed, ``"mem:<sha256>"`` of the samples of an in-memory utterance."""
    if u.audio is not None:
        a = np.ascontiguousarray(u.audio, dtype=np.float32)
        return f"mem:{u.sample_rate}:{hashlib.sha256(a.tobytes()).hexdigest()}"
    path = u.path
    if is_pipe(path):
        return "pipe"
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def plan_fingerprint(utts: Sequence[Utterance], model_info: dict, opts: ExtractOptions) -> str:
    """sha256 over the model description, the plan-affecting options and each utterance's id, source and segment."""
    h = hashlib.sha256()
    h.update(json.dumps(model_info, sort_keys=True, default=str).encode())
    h.update(json.dumps({**opts.output_affecting(), "shard_duration": float(opts.shard_duration),
                         "v": PLAN_VERSION}, sort_keys=True).encode())
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
        Target seconds of audio per shard (> 0).

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


def read_corpus(data) -> List[Utterance]:
    """The corpus as records, every field checked (files by :func:`spk_toolkit.io.datadir.load_corpus`, records
    given in memory here): no model is loaded and nothing is written before this passes.

    Parameters
    ----------
    data : path or sequence of Utterance

    Returns
    -------
    list of Utterance

    Raises
    ------
    CorpusError
        No utterances; a duplicate utterance id; an id that is empty or holds whitespace; a segment start, end
        or duration that is not a finite number >= 0 (end -1 = end of file), or ``start >= end`` (all named).
    """
    utts = list(data) if not isinstance(data, (str, os.PathLike)) else load_corpus(data)
    if not utts:
        raise CorpusError(f"{data}: no utterances")
    seen = set()
    for u in utts:
        if not isinstance(u.utt_id, str) or not u.utt_id or any(c.isspace() for c in u.utt_id):
            raise CorpusError(f"utterance id {u.utt_id!r} ({u.path}) is empty or contains whitespace")
        if u.utt_id in seen:
            raise CorpusError(f"duplicate utterance id {u.utt_id!r} ({u.path})")
        seen.add(u.utt_id)
        _check_times(u)
    return utts


def _check_times(u: Utterance) -> None:
    for name in ("start", "end", "duration"):
        v = getattr(u, name)
        if v is None:
            continue
        try:
            ok = math.isfinite(float(v)) and (float(v) >= 0 or (name == "end" and float(v) == -1))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CorpusError(f"utterance {u.utt_id!r} ({u.path}): {name} {v!r} is not a finite number of seconds "
                              ">= 0" + (" (or -1)" if name == "end" else ""))
    if u.start is not None and u.end is not None and u.end != -1 and u.end > 0 and u.start >= u.end:
        raise CorpusError(f"utterance {u.utt_id!r} ({u.path}): segment start {u.start} >= end {u.end}")


def describe_changes(old, new, prefix: str = "") -> List[str]:
    """What differs between two JSON-like descriptions (a model's ``describe()`` then and now), one line each.

    Parameters
    ----------
    old, new : dict, list or scalar
        JSON values (nested dicts are compared key by key, everything else by equality).
    prefix : str
        Dotted path of ``old`` / ``new`` inside a larger description.

    Returns
    -------
    list of str
        ``"path: old -> new"`` (``(absent)`` for a missing key), sorted by path; empty when equal.

    Examples
    --------
    >>> describe_changes({"config": {"num_mel_bins": 80}}, {"config": {"num_mel_bins": 64}})
    ['config.num_mel_bins: 80 -> 64']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{path}: (absent) -> {_short(new[k])}")
            elif k not in new:
                out.append(f"{path}: {_short(old[k])} -> (absent)")
            else:
                out += describe_changes(old[k], new[k], path)
        return out
    return [] if old == new else [f"{prefix or '(value)'}: {_short(old)} -> {_short(new)}"]


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def load_saved_plan(out: Path) -> Optional[dict]:
    """``plan.json`` of ``out`` as a dict, or None when absent.

    Raises
    ------
    ExtractionError
        The file exists but is not a plan this version wrote (corrupt, truncated, foreign): names the file.
    """
    p = Path(out) / PLAN_NAME
    if not p.is_file():
        return None
    try:
        saved = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.get("version") != PLAN_VERSION:
            raise ValueError(f"version {saved.get('version') if isinstance(saved, dict) else '?'} != {PLAN_VERSION}")
        for key in ("fingerprint", "durations", "shards", "pre_errors"):
            if key not in saved:
                raise ValueError(f"no {key!r}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExtractionError(f"{p} is not a valid shard plan ({e}); remove it, or pass --overwrite to start "
                              "fresh (finished shards are verified and reused)") from None
    return saved


def prepare_run(data, output_dir, model_info: dict, opts: ExtractOptions, write_plan: bool = True) -> Plan:
    """Read the corpus and build the shard plan, or reload the saved plan when its fingerprint matches.

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
        Save ``plan.json`` (the driver only).

    Returns
    -------
    Plan

    Raises
    ------
    CorpusError
        Malformed corpus (duplicate ids, lines without a path), before any work starts.
    ExtractionError
        ``output_dir`` holds a plan for a different corpus/model/options, or a corrupt ``plan.json`` (named).
        Header-pass refusals under ``on_error="raise"`` are raised by the driver, not here.
    """
    out = Path(output_dir)
    utts = read_corpus(data)
    fp = plan_fingerprint(utts, model_info, opts)
    saved = load_saved_plan(out)
    stamps = [source_stamp(u) for u in utts]
    if saved is not None:
        if saved["fingerprint"] != fp:
            changes = describe_changes(saved.get("model"), json.loads(json.dumps(model_info, default=str)))
            what = (f"the model changed: {'; '.join(changes[:8])}" + (" ..." if len(changes) > 8 else "")
                    if changes else "corpus, model or options changed")
            raise ExtractionError(
                f"{out} holds results of a different run ({what}; "
                f"plan fingerprint {str(saved['fingerprint'])[:12]} != {fp[:12]}); "
                "use another --output_dir or pass --overwrite to start fresh"
            )
        for u, d in zip(utts, saved["durations"]):
            u.duration = d
        shards, pre_errors = saved["shards"], dict(saved["pre_errors"])
        if write_plan and pre_errors:  # the driver: a refused source may have been fixed since
            shards, pre_errors = _recheck_refused(utts, shards, pre_errors, opts, out, fp, model_info)
        return Plan(utts, shards, pre_errors, fp, model_info, stamps, opts.output_affecting())
    cache_dir = Path(data) if isinstance(data, (str, os.PathLike)) and Path(data).is_dir() else None
    pre_errors = measure_durations(utts, allow_pipes=opts.allow_pipes, cache_dir=cache_dir,
                                   header_timeout=opts.header_timeout, pipe_timeout=opts.pipe_timeout)
    for u in utts:  # the same plan whether durations came from the utt2dur cache (4 decimals) or from headers
        if u.duration is not None:
            u.duration = round(u.duration, 4)
    keep = [i for i, u in enumerate(utts) if u.utt_id not in pre_errors]
    sub = make_shards([utts[i].duration for i in keep], opts.shard_duration)
    shards = [[keep[j] for j in s] for s in sub if s]
    plan = Plan(utts, shards, pre_errors, fp, model_info, stamps, opts.output_affecting())
    if write_plan:
        _write_plan(out, fp, model_info, utts, shards, pre_errors)
    return plan


def _write_plan(out: Path, fp: str, model_info: dict, utts: List[Utterance], shards, pre_errors) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with naming(out / PLAN_NAME):
        atomic_write_text(out / PLAN_NAME, json.dumps({
            "version": PLAN_VERSION, "fingerprint": fp, "model": model_info,
            "n_utterances": len(utts), "durations": [u.duration for u in utts],
            "shards": shards, "pre_errors": pre_errors,
        }))


def _recheck_refused(utts: List[Utterance], shards, pre_errors: Dict[str, str], opts: ExtractOptions, out: Path,
                     fp: str, model_info: dict):
    """Read the headers refused by the saved plan again; utterances that now read go into new shards.

    The shards of the saved plan keep their members (and so their fingerprints: finished ones stay valid); the
    recovered utterances form shards appended after them, so a rerun after fixing a file (a FIFO replaced by the
    recording, a permission fixed, a pipe allowed) resumes to the result of a clean run. ``plan.json`` is
    rewritten when anything changed.
    """
    index = {u.utt_id: i for i, u in enumerate(utts)}
    retry = [utts[index[k]] for k in pre_errors if k in index]
    for u in retry:
        u.duration = None
    failures = measure_durations(retry, allow_pipes=opts.allow_pipes, header_timeout=opts.header_timeout,
                                 pipe_timeout=opts.pipe_timeout)
    recovered = [index[u.utt_id] for u in retry if u.utt_id not in failures]
    new_pre = {k: failures[k] for k in pre_errors if k in failures}
    if not recovered and new_pre == pre_errors:
        return shards, pre_errors
    for i in recovered:
        utts[i].duration = round(utts[i].duration, 4)
    sub = make_shards([utts[i].duration for i in recovered], opts.shard_duration) if recovered else []
    shards = list(shards) + [[recovered[j] for j in s] for s in sub if s]
    if recovered:
        logger.info("%d utterance(s) refused when %s was planned now read (e.g. %s): %d shard(s) added",
                    len(recovered), out / PLAN_NAME, utts[recovered[0]].utt_id, len(sub))
    _write_plan(out, fp, model_info, utts, shards, new_pre)
    return shards, new_pre

