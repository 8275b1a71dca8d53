"""The run directory: the one module that names its files and reads or writes its summary and ``errors.tsv``.

Every run of the engine (:func:`spk_toolkit.engine.extract`: ``spk_inference``, ``cache_features``, the trainer's
``extract_embed``, ``spk_embed_extract``, the TTS tools, the 3D-Speaker pipeline) leaves one directory::

    plan.json                 the plan (spk_toolkit.engine.plan): corpus, model and option fingerprints, shards
    shards/shard-NNNNN.npz    committed shards (the unit of resume)
    ranks/                    torchrun rank reports
    <stem>.<format>           each output in each --output_format; stem ``embeddings`` for the ``embedding``
                              output (or the run's ``output_stem``), else the output's name (``fbank``, ...)
    spk_embeddings.npz        speaker means (mean of the raw utterance embeddings)
    errors.tsv                utt_id <TAB> path <TAB> reason (csv module, TAB delimiter)
    summary.json              counts, model, kinds, ``output_formats``, ``outputs`` (every file of the run)
    run.log                   the CLIs' log
    scores/                   spk_inference's scoring stage

``summary.json``'s ``outputs`` maps a name to a path for every file the run and the tools after it wrote
(``npz``, ``kaldi_ark``, ... for the main output, ``spk_npz``, ``errors``, and what a tool adds with
:meth:`RunDir.add_outputs`: ``<set>_embeddings.npz``, ``<tag>.scp``). That is what :func:`open_reader` on the
directory, a resuming run and ``--overwrite`` (:meth:`RunDir.remove`) go by. The engine is the only writer of
the plan, shards and summary; this module sits in the ``io`` layer because readers below the engine
(:func:`spk_toolkit.io.storage.open_reader` on a directory, scoring) read the layout too.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from spk_toolkit.io.atomic import atomic_write_text, is_temporary

__all__ = ["EMBEDDING", "ERRORS", "LOG", "PLAN", "RANKS", "RUN_DIRS", "RUN_FILES", "RunDir", "SCORES", "SHARDS",
           "SPEAKER_MEANS", "SUMMARY", "errors_tsv", "output_stem", "read_errors_tsv"]

PLAN = "plan.json"
SUMMARY = "summary.json"
ERRORS = "errors.tsv"
LOG = "run.log"
SHARDS = "shards"
RANKS = "ranks"
SCORES = "scores"
#: Files and directories of a run besides its storage outputs (removed by ``--overwrite``).
RUN_FILES = (PLAN, SUMMARY, ERRORS, LOG)
RUN_DIRS = (SHARDS, RANKS, SCORES)
#: The output name of speaker-embedding backends, and the stem of its files unless a run names another.
EMBEDDING = "embedding"
EMBEDDING_STEM = "embeddings"
#: Stem of the speaker means (npz).
SPEAKER_MEANS = "spk_embeddings"


def output_stem(name: str, embedding_stem: str = EMBEDDING_STEM) -> str:
    """File stem of an output: ``embedding_stem`` (default ``embeddings``, ESPnet's name) for the ``embedding``
    output, else ``name`` itself (``fbank``, ``hidden``, ``tokens``)."""
    return embedding_stem if name == EMBEDDING else name


def errors_tsv(records: Iterable[tuple]) -> str:
    """The text of ``errors.tsv``: a header and one ``utt_id<TAB>path<TAB>reason`` row per record.

    Written with the :mod:`csv` module (TAB delimiter, ``\\n`` line ends, minimal quoting), so a path holding a
    TAB, a newline or a double quote is quoted and every row has exactly three columns; read it back with
    :func:`read_errors_tsv` (or ``csv.reader(f, delimiter="\\t")``). Whitespace runs in a reason become one space.

    Parameters
    ----------
    records : iterable of (utt_id, path, reason)

    Returns
    -------
    str
    """
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(["utt_id", "path", "reason"])
    for uid, path, reason in records:
        w.writerow([uid, path, " ".join(str(reason).split())])
    return buf.getvalue()


def read_errors_tsv(path) -> List[tuple]:
    """Rows of an ``errors.tsv`` written by :func:`errors_tsv`: ``[(utt_id, path, reason), ...]``.

    Raises
    ------
    ValueError
        A row without exactly three columns (names file and row).
    OSError
        The file cannot be read.
    """
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    for n, r in enumerate(rows[1:], 2):
        if len(r) != 3:
            raise ValueError(f"{path}: row {n} has {len(r)} columns, expected utt_id, path, reason")
    return [tuple(r) for r in rows[1:]]


class RunDir:
    """One run directory: its paths, its summary, its errors, its outputs, its removal.

    Parameters
    ----------
    path : path-like
        The directory (need not exist yet).

    Examples
    --------
    >>> rd = RunDir("exp/fillets")                    # doctest: +SKIP
    >>> rd.read_summary()["embedded"]                 # doctest: +SKIP
    48
    >>> rd.main_output()                              # doctest: +SKIP
    ('npz', PosixPath('exp/fillets/embeddings.npz'))
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # ---------------------------------------------------------------------------------------------- paths
    @property
    def plan_path(self) -> Path:
        return self.path / PLAN

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def errors_path(self) -> Path:
        return self.path / ERRORS

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def shards_dir(self) -> Path:
        return self.path / SHARDS

    @property
    def ranks_dir(self) -> Path:
        return self.path / RANKS

    @property
    def scores_dir(self) -> Path:
        return self.path / SCORES

    def shard_path(self, k: int) -> Path:
        """``shards/shard-NNNNN.npz`` of shard ``k`` (0-based)."""
        return self.shards_dir / f"shard-{k:05d}.npz"

    def speaker_means_path(self) -> Path:
        """``spk_embeddings.npz``."""
        return self.path / f"{SPEAKER_MEANS}.npz"

    # -------------------------------------------------------------------------------------------- summary
    def read_summary(self) -> Optional[dict]:
        """The run's ``summary.json``, or None when there is none (the run has not finished).

        Raises
        ------
        ValueError
            The file is not a JSON object (names the file).
        """
        try:
            text = self.summary_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            s = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.summary_path}: not valid JSON ({e})") from None
        if not isinstance(s, dict):
            raise ValueError(f"{self.summary_path}: not a JSON object")
        return s

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` atomically (indented JSON; non-JSON values as ``str``)."""
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, default=str))

    def add_outputs(self, **named: str | os.PathLike) -> dict:
        """Name extra files of this run in ``summary.json``'s ``outputs`` (a tool's export: ``<set>_embeddings.npz``,
        ``<tag>.scp``), so that :meth:`remove` (``--overwrite``) and readers know them. Returns the summary.

        Raises
        ------
        FileNotFoundError
            The run has no summary yet (add outputs after the engine's merge).
        """
        s = self.read_summary()
        if s is None:
            raise FileNotFoundError(f"{self.summary_path} not found: the run has not finished")
        s.setdefault("outputs", {}).update({k: str(v) for k, v in named.items()})
        self.write_summary(s)
        return s

    # --------------------------------------------------------------------------------------------- errors
    def write_errors(self, records: Iterable[tuple]) -> Path:
        """Write ``errors.tsv`` atomically from ``(utt_id, path, reason)`` records; returns its path."""
        atomic_write_text(self.errors_path, errors_tsv(records))
        return self.errors_path

    def read_errors(self) -> List[tuple]:
        """``errors.tsv``'s rows ``(utt_id, path, reason)``; ``[]`` when the file does not exist."""
        if not self.errors_path.is_file():
            return []
        return read_errors_tsv(self.errors_path)

    def error_reasons(self) -> Dict[str, str]:
        """``utt_id -> reason`` of ``errors.tsv`` (empty when there is none)."""
        return {u: r for u, _, r in self.read_errors()}

    # -------------------------------------------------------------------------------------------- outputs
    def main_output(self, readable: Iterable[str], aliases: Optional[Dict[str, str]] = None,
                    only: Optional[str] = None) -> Optional[Tuple[str, Path]]:
        """``(format, path)`` of the main output the summary names, in ``output_formats`` order, or None.

        Paths are taken relative to the directory (the run directory may have moved since it was written).

        Parameters
        ----------
        readable : iterable of str
            The formats that have a reader (the storage registry's).
        aliases : dict, optional
            Other spellings of format names.
        only : str, optional
            The one format wanted.

        Raises
        ------
        FileNotFoundError
            The summary names outputs of a readable format, none of which exists (names them).
        ValueError
            ``summary.json`` is not valid JSON.
        """
        summary = self.read_summary()
        outputs = summary.get("outputs") if summary else None
        if not isinstance(outputs, dict):
            return None
        readable, aliases = set(readable), aliases or {}
        named = []
        for fmt in summary.get("output_formats") or list(outputs):
            fmt = aliases.get(fmt, fmt)
            if fmt not in readable or fmt not in outputs or (only is not None and fmt != only):
                continue
            cand = self.path / Path(outputs[fmt]).name
            named.append(str(cand))
            if cand.exists():
                return fmt, cand
        if named:
            raise FileNotFoundError(f"{self.summary_path} names {', '.join(named)}, none of which exists")
        return None

    def output_stems(self) -> set:
        """Stems of every output the summary records (``kinds``), with the default ones."""
        stems = {EMBEDDING_STEM, SPEAKER_MEANS}
        try:
            s = self.read_summary() or {}
        except ValueError:
            return stems
        for name in s.get("kinds", {}) or {}:
            stems.add(output_stem(name, s.get("output_stem", EMBEDDING_STEM)))
        return stems

    # ------------------------------------------------------------------------------------------- removal
    def remove(self, writers: Iterable) -> List[str]:
        """Remove every file a previous run wrote here (``--overwrite``); returns the names removed.

        That is the run files (:data:`RUN_FILES`, :data:`RUN_DIRS`), every file the summary's ``outputs`` names
        (so the extras a tool added), each output stem's files in every format as the format's writer lists them
        (``writers``: the storage registry's Writer classes, :meth:`Writer.owned_paths`), and the temporary
        files of killed runs. Nothing else in the directory is touched.
        """
        out = self.path
        if not out.is_dir():
            return []
        names, tree_names = set(RUN_FILES), set(RUN_DIRS)
        try:
            for v in ((self.read_summary() or {}).get("outputs") or {}).values():
                if isinstance(v, str) and Path(v).name:
                    names.add(Path(v).name)
        except (ValueError, AttributeError):
            pass
        stems = self.output_stems()
        writers = list(writers)
        for stem in stems:
            for w in writers:
                for p in w.owned_paths(out, stem):
                    (tree_names if w.makes_directory else names).add(Path(p).name)
        removed = []
        for name in sorted(names | tree_names):
            p = out / name
            if p.is_dir() and not p.is_symlink():
                if name in tree_names:
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

    def remove_temporaries(self) -> None:
        """Remove the partial files of killed runs (never read) in the directory and in ``shards/``."""
        sdir = self.shards_dir
        for stale in (list(sdir.iterdir()) if sdir.is_dir() else []) + list(self.path.iterdir()):
            if is_temporary(stale.name):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
