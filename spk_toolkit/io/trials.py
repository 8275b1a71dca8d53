"""Trial lists of every peer's format, and matching their keys to embedding keys.

Formats (see REFERENCE.md, "Trial lists"):

* ``voxceleb``: ``label enroll test`` with label 1/0 (``veri_test2.txt``, ``list_test_*2.txt``).
* ``kaldi``: ``enroll test target|nontarget|1|0`` (Kaldi, WeSpeaker, 3D-Speaker).
* ``espnet``: ``trial.scp`` (``enr*tst enroll_wav``), ``trial2.scp`` (``enr*tst test_wav``) and
  ``trial_label`` (``enr*tst 0|1``) in one directory; the enrollment and test keys come from splitting the
  trial key on ``*``.
* ``unlabelled``: ``enroll test`` (scores only, no metrics).

:func:`read_trials` detects the format (``fmt="auto"``) unless told. :func:`resolve_keys` maps the trial
keys onto embedding keys, normalising them (stripping an audio extension and/or a root prefix) when they do
not match as they are, reports what it did, and raises :class:`MissingKeysError` with a count and examples
for keys that still do not match.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "Trials",
    "TRIAL_FORMATS",
    "read_trials",
    "detect_format",
    "resolve_keys",
    "KeyResolution",
    "MissingKeysError",
    "write_scores",
    "find_duplicates",
    "read_scores",
]

TRIAL_FORMATS = ("voxceleb", "kaldi", "espnet", "unlabelled")

_KALDI_LABELS = {"target": 1, "nontarget": 0, "1": 1, "0": 0}
_ESPNET_FILES = ("trial.scp", "trial2.scp", "trial_label")
_EXT_RE = re.compile(r"\.(wav|flac|mp3|m4a|ogg|opus|sph|aac|npy)$", re.IGNORECASE)


class MissingKeysError(ValueError):
    """Trial keys without an embedding. ``.missing`` holds every missing key (sorted)."""

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


def _str_array(x) -> np.ndarray:
    """A 1-D object array of ``str`` (shared string objects stay shared: 8 bytes per trial, not 4 per character)."""
    if isinstance(x, np.ndarray) and x.dtype == object:
        return x
    if isinstance(x, np.ndarray) and x.dtype.kind == "U":
        return x.astype(object)
    vals = list(x)
    out = np.empty(len(vals), dtype=object)
    out[:] = [v if isinstance(v, str) else str(v) for v in vals]
    return out


@dataclass
class Trials:
    """A trial list.

    Attributes
    ----------
    enroll : ndarray of str (object dtype), shape (n_trials,)
        Enrollment keys as written in the list (equal keys share one ``str`` object).
    test : ndarray of str (object dtype), shape (n_trials,)
        Test keys as written in the list.
    labels : ndarray of int8, shape (n_trials,), or None
        1 = target, 0 = nontarget; None for an unlabelled list.
    fmt : str
        One of :data:`TRIAL_FORMATS`.
    path : str or None
        Where it was read from.
    notes : list of str
        What reading found worth saying (duplicate trials, dropped repeats).
    lines : ndarray of int32, shape (n_trials,), or None
        Line number of each trial in ``path`` (None when not read from a file).

    Raises
    ------
    ValueError
        ``enroll`` and ``test`` of different lengths or not 1-D, ``labels`` of another length.
    """

    enroll: np.ndarray
    test: np.ndarray
    labels: Optional[np.ndarray] = None
    fmt: str = "unlabelled"
    path: Optional[str] = None
    notes: list = field(default_factory=list)
    lines: Optional[np.ndarray] = None

    def __post_init__(self):
        self.enroll = _str_array(self.enroll)
        self.test = _str_array(self.test)
        if self.enroll.shape != self.test.shape or self.enroll.ndim != 1:
            raise ValueError(
                f"enroll and test must be 1-D of equal length, got {self.enroll.shape} and {self.test.shape}"
            )
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int8)
            if self.labels.shape != self.enroll.shape:
                raise ValueError(
                    f"labels length {self.labels.shape[0]} differs from the number of trials {self.enroll.shape[0]}"
                )

    def __len__(self) -> int:
        return int(self.enroll.shape[0])

    def subset(self, mask: np.ndarray) -> "Trials":
        """The trials where ``mask`` (bool, (n_trials,)) is True, in order.

        Raises
        ------
        ValueError
            ``mask`` of another shape.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.enroll.shape:
            raise ValueError(f"mask shape {mask.shape} does not match {len(self)} trials")
        labels = None if self.labels is None else self.labels[mask]
        lines = None if self.lines is None else self.lines[mask]
        return Trials(self.enroll[mask], self.test[mask], labels, self.fmt, self.path, list(self.notes), lines)

    def where(self, i: int) -> str:
        """``path:line`` of trial ``i`` (or ``trial i+1`` for a list in memory)."""
        if self.path and self.lines is not None:
            return f"{self.path}:{int(self.lines[i])}"
        return f"trial {i + 1}"

    @property
    def name(self) -> str:
        """A short name for output files (the list's file name without extension, or the ESPnet dir name)."""
        if not self.path:
            return "trials"
        p = self.path.rstrip("/")
        base = os.path.basename(p)
        if base in _ESPNET_FILES:
            base = os.path.basename(os.path.dirname(p)) or "trials"
        return os.path.splitext(base)[0] or "trials"


class _Table:
    """A whitespace-separated text file read in one pass into compact columns.

    Every distinct field is one ``str`` in :attr:`strings`; rows hold int32 codes into it (up to 3 columns,
    -1 where a row is shorter), so ten million trials take ~17 bytes each plus the distinct keys.
    """

    def __init__(self, path: str, what: str = "trial list", max_cols: int = 3):
        from array import array

        self.path = path
        self.strings: list = []
        index: dict = {}
        cols = [array("i") for _ in range(max_cols)]
        ncols, lines = array("b"), array("i")
        self.extra: Optional[tuple] = None  # (line, n_fields) of the first row with more than max_cols fields
        code = index.get
        for n, line in _iter_lines(path, what):
            parts = line.split()
            k = len(parts)
            if k > max_cols:
                if self.extra is None:
                    self.extra = (n, k)
                parts = parts[:max_cols]
            for j in range(max_cols):
                if j < k:
                    c = code(parts[j])
                    if c is None:
                        c = index[parts[j]] = len(self.strings)
                        self.strings.append(parts[j])
                    cols[j].append(c)
                else:
                    cols[j].append(-1)
            ncols.append(min(k, 127))
            lines.append(n)
        if not lines:
            raise ValueError(f"trial list {path!r} is empty (no non-blank line)")
        self.cols = [np.frombuffer(c, dtype=np.int32) if len(c) else np.zeros(0, np.int32) for c in cols]
        self.ncols = np.frombuffer(ncols, dtype=np.int8)
        self.lines = np.frombuffer(lines, dtype=np.int32)
        self.index = index

    def __len__(self) -> int:
        return int(self.lines.shape[0])

    def flags(self, accept) -> np.ndarray:
        """Bool per distinct string: ``accept(s)``."""
        return np.fromiter((bool(accept(x)) for x in self.strings), dtype=bool, count=len(self.strings))

    def row_text(self, i: int) -> str:
        return " ".join(self.strings[c] for c in (int(col[i]) for col in self.cols) if c >= 0)

    def column(self, j: int) -> np.ndarray:
        """Column ``j`` as an object array of the shared strings."""
        strings = np.empty(len(self.strings), dtype=object)
        strings[:] = self.strings
        return strings[self.cols[j]]


def _iter_lines(path: str, what: str):
    from spk_toolkit.io.textio import TextFileError, iter_lines

    try:
        yield from iter_lines(path, what)
    except TextFileError as e:
        raise ValueError(str(e)) from None


def _espnet_dir(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return path if os.path.exists(os.path.join(path, "trial.scp")) else None
    if os.path.basename(path) in _ESPNET_FILES:
        return os.path.dirname(path) or "."
    return None


_VOX_LABELS = {"1": 1, "0": 0}
_FORMAT_HELP = {
    "voxceleb": "'label enroll test' with label 0/1",
    "kaldi": "'enroll test label' with label target/nontarget/1/0",
    "unlabelled": "'enroll test'",
}


def _fits(t: _Table) -> dict:
    """Per format, a bool per row: the row fits the format."""
    is01 = t.flags(lambda x: x in _VOX_LABELS)
    isk = t.flags(lambda x: x.lower() in _KALDI_LABELS)
    three = t.ncols == 3
    return {
        "voxceleb": three & is01[t.cols[0]],
        "kaldi": three & isk[np.maximum(t.cols[2], 0)],
        "unlabelled": t.ncols == 2,
    }


def _why_not(t: _Table, i: int, fmt: str) -> str:
    k = int(t.ncols[i])
    want = 2 if fmt == "unlabelled" else 3
    if k != want:
        return f"format {fmt!r} expects {want} columns, got {k}"
    lab = t.strings[int(t.cols[0 if fmt == "voxceleb" else 2][i])]
    labels = sorted(_VOX_LABELS) if fmt == "voxceleb" else sorted(_KALDI_LABELS)
    return f"label {lab!r} is not one of {labels} (format {fmt!r})"


def _detect(t: _Table, path: str) -> str:
    fits = _fits(t)
    full = [f for f, ok in fits.items() if ok.all()]
    if "voxceleb" in full and "kaldi" in full:
        raise ValueError(
            f"cannot tell whether {path!r} is 'voxceleb' (label enroll test) or 'kaldi' (enroll test label): "
            "both first and last columns are 0/1; pass fmt / --trials_format explicitly"
        )
    if full:
        return full[0]
    # the first row where no format fits every row so far: the format that lasts longest fails there
    first_bad = {f: int(np.argmin(ok)) for f, ok in fits.items()}
    best = max(first_bad, key=lambda f: (first_bad[f], f == "voxceleb"))
    r = first_bad[best]
    others = [f for f in fits if f != best and bool(fits[f][r])]
    before = f"rows 1-{r} fit {best!r}" if r > 1 else (f"row 1 fits {best!r}" if r == 1 else "")
    msg = (f"cannot detect the format of {path!r}: row {r + 1} ({path}:{int(t.lines[r])}) fits no trial format "
           f"that also fits the rows before it ({_why_not(t, r, best)}): {t.row_text(r)!r}")
    if before:
        msg += f"; {before}"
    if others:
        msg += f"; the row alone would fit {others[0]!r}"
    raise ValueError(msg + "; formats: " + "; ".join(f"{k} {v}" for k, v in _FORMAT_HELP.items())
                     + "; pass --trials_format to read it as one format")


def detect_format(path: str) -> str:
    """Guess the format of a trial list.

    Parameters
    ----------
    path : str
        A trial file, or an ESPnet directory / one of its ``trial.scp``, ``trial2.scp``, ``trial_label``.

    Returns
    -------
    fmt : str
        One of :data:`TRIAL_FORMATS`.

    Raises
    ------
    ValueError
        When the rows do not fit any one format (the message names the first row, by number and ``file:line``,
        after which no format fits every row, and why), fit two (then pass ``fmt`` explicitly), the file is empty
        or not UTF-8.
    FileNotFoundError
        ``path`` does not exist.
    """
    if _espnet_dir(path) is not None:
        return "espnet"
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory without trial.scp; expected a trial list file")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "trial list not found", path)
    return _detect(_Table(path), path)


def _read_espnet(path: str) -> Trials:
    d = _espnet_dir(path)
    if d is None:
        raise ValueError(f"{path!r} is not an ESPnet trial directory (needs trial.scp, trial2.scp, trial_label)")
    scp = os.path.join(d, "trial.scp")
    lab = os.path.join(d, "trial_label")
    if os.path.exists(scp):
        src = scp
    elif os.path.exists(lab):
        src = lab
    else:
        raise ValueError(f"ESPnet trial directory {d!r} has neither trial.scp nor trial_label")
    keys, lines = [], []
    for n, line in _iter_lines(src, "trial list"):
        keys.append(line.split()[0])
        lines.append(n)
    if not keys:
        raise ValueError(f"trial list {src!r} is empty (no non-blank line)")
    enroll, test = [], []
    bad = []
    for k, n in zip(keys, lines):
        parts = k.split("*")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            bad.append(f"{src}:{n} {k!r}")
        else:
            enroll.append(parts[0])
            test.append(parts[1])
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(keys)} ESPnet trial keys in {d!r} are not of the form 'enroll*test', e.g. {bad[:3]}"
        )
    labels = None
    if os.path.exists(lab):
        lab_map = {}
        for n, line in _iter_lines(lab, "trial labels"):
            r = line.split()
            if len(r) != 2 or r[1] not in ("0", "1"):
                raise ValueError(f"{lab}:{n}: expected rows 'enroll*test 0|1', got {line.strip()!r}")
            if r[0] in lab_map and lab_map[r[0]] != int(r[1]):
                raise ValueError(f"{lab}:{n}: trial {r[0]!r} labelled both 0 and 1")
            lab_map[r[0]] = int(r[1])
        missing = [k for k in keys if k not in lab_map]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(keys)} trials in {scp!r} have no label in {lab!r}, e.g. {missing[:3]}"
            )
        labels = np.fromiter((lab_map[k] for k in keys), dtype=np.int8, count=len(keys))
    return Trials(enroll, test, labels, "espnet", path, lines=np.asarray(lines, dtype=np.int32))


def find_duplicates(trials: Trials) -> tuple:
    """Trials that repeat an earlier trial's (enroll, test) pair (in that order).

    Parameters
    ----------
    trials : Trials

    Returns
    -------
    repeat : ndarray of bool, shape (n_trials,)
        True for every occurrence after the first.
    first : ndarray of int64, shape (n_repeats,)
        For each repeat (in trial order), the index of the first occurrence of its pair.
    """
    keys: dict = {}
    e = np.fromiter((keys.setdefault(k, len(keys)) for k in trials.enroll.tolist()), np.int64, len(trials))
    t = np.fromiter((keys.setdefault(k, len(keys)) for k in trials.test.tolist()), np.int64, len(trials))
    pair = e * max(len(keys), 1) + t
    del e, t
    order = np.argsort(pair, kind="stable")
    sp = pair[order]
    same = np.zeros(len(pair), dtype=bool)
    same[1:] = sp[1:] == sp[:-1]
    repeat = np.zeros(len(pair), dtype=bool)
    repeat[order[same]] = True
    rows = np.flatnonzero(repeat)
    first = order[np.searchsorted(sp, pair[rows], side="left")]
    return repeat, first


def _duplicates(tr: Trials, duplicates: str) -> Trials:
    repeat, first = find_duplicates(tr)
    if not repeat.any():
        return tr
    rows = np.flatnonzero(repeat)
    if tr.labels is not None:
        clash = tr.labels[rows] != tr.labels[first]
        if clash.any():
            ex = [f"{tr.where(int(r))} vs {tr.where(int(f))}" for r, f in zip(rows[clash][:3], first[clash][:3])]
            raise ValueError(f"{int(clash.sum())} trials of {tr.path or 'the list'!r} repeat an earlier pair with the "
                             f"other label (target and nontarget at once), e.g. {'; '.join(ex)}")
    def first_at(f) -> str:
        return f"line {int(tr.lines[f])}" if tr.lines is not None else f"trial {int(f) + 1}"

    ex = "; ".join(f"{tr.where(int(r))} repeats {first_at(f)} ({tr.enroll[r]} {tr.test[r]})"
                   for r, f in zip(rows[:3], first[:3]))
    what = (f"{len(rows)} duplicate trial(s) in {tr.path or 'the list'!r} (an enroll-test pair listed again), "
            f"e.g. {ex}")
    if duplicates == "drop":
        out = tr.subset(~repeat)
        out.notes.append(what + f"; dropped, {len(out)} trials left")
    else:
        out = tr
        out.notes.append(what + "; kept, each scored and counted (pass --duplicates drop to remove them)")
    logger.warning("%s", out.notes[-1])
    return out


def read_trials(path: str, fmt: str = "auto", duplicates: str = "keep") -> Trials:
    """Read a trial list.

    The file is read as UTF-8 (a byte-order mark stripped and logged once), ``\r\n`` accepted, blank lines
    skipped (:func:`spk_toolkit.io.textio.iter_lines`); ten million trials take a few hundred MB.

    Parameters
    ----------
    path : str
        Trial file, or ESPnet trial directory (or its ``trial.scp`` / ``trial_label``).
    fmt : {"auto", "voxceleb", "kaldi", "espnet", "unlabelled"}, default="auto"
        ``"auto"`` detects the format (:func:`detect_format`); any other value overrides detection.
    duplicates : {"keep", "drop"}, default="keep"
        Trials repeating an earlier (enroll, test) pair are reported (count and examples, in the log and in
        :attr:`Trials.notes`) and kept, or dropped (the first occurrence stays). Repeats with the other label are
        an error either way.

    Returns
    -------
    trials : Trials
        ``.enroll``, ``.test`` (object arrays of str, (n_trials,)), ``.labels`` (int8 0/1 or None), ``.lines``.

    Raises
    ------
    ValueError
        Unknown ``fmt`` or ``duplicates``; undetectable format (the first row that fits no format, by number and
        ``file:line``); a row that does not fit ``fmt`` (``file:line`` and why); an empty file, bytes that are not
        UTF-8; a repeated trial with the other label.
    FileNotFoundError
        ``path`` does not exist.
    """
    if fmt not in ("auto",) + TRIAL_FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {TRIAL_FORMATS}, got {fmt!r}")
    if duplicates not in ("keep", "drop"):
        raise ValueError(f"duplicates must be 'keep' or 'drop', got {duplicates!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "trial list not found", path)
    if fmt == "espnet" or (fmt == "auto" and _espnet_dir(path) is not None):
        return _duplicates(_read_espnet(path), duplicates)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; format {fmt!r} expects a file")
    t = _Table(path)
    if fmt == "auto":
        fmt = _detect(t, path)
    ok = _fits(t)[fmt]
    if t.extra is not None:
        n, k = t.extra
        raise ValueError(f"{path}:{n}: {k} columns; a trial list has 2 (unlabelled) or 3 (format {fmt!r})")
    if not ok.all():
        i = int(np.argmin(ok))
        raise ValueError(f"{path}:{int(t.lines[i])}: row {i + 1}: {_why_not(t, i, fmt)}: {t.row_text(i)!r} "
                         "(override with fmt / --trials_format if detection was wrong)")
    if fmt == "unlabelled":
        tr = Trials(t.column(0), t.column(1), None, fmt, path, lines=t.lines)
    else:
        e_col, t_col, lab_col = (1, 2, 0) if fmt == "voxceleb" else (0, 1, 2)
        labmap = _VOX_LABELS if fmt == "voxceleb" else _KALDI_LABELS
        lab_of = np.fromiter((labmap.get(x.lower() if fmt == "kaldi" else x, -1) for x in t.strings),
                             dtype=np.int8, count=len(t.strings))
        tr = Trials(t.column(e_col), t.column(t_col), lab_of[t.cols[lab_col]], fmt, path, lines=t.lines)
    return _duplicates(tr, duplicates)


# --------------------------------------------------------------------------------------------------
# key resolution
# --------------------------------------------------------------------------------------------------
@dataclass
class KeyResolution:
    """Result of :func:`resolve_keys`.

    Attributes
    ----------
    enroll_idx, test_idx : ndarray of int64, shape (n_kept,)
        Row index into ``available_keys`` for each kept trial.
    kept : ndarray of bool, shape (n_trials,)
        Trials whose two keys were found (all True unless ``on_missing="drop"``).
    notes : list of str
        Human-readable report of the normalisation applied and of dropped trials.
    missing : list of str
        Trial keys without an embedding (sorted).
    """

    enroll_idx: np.ndarray
    test_idx: np.ndarray
    kept: np.ndarray
    notes: list = field(default_factory=list)
    missing: list = field(default_factory=list)


def _strip_ext(k: str) -> str:
    return _EXT_RE.sub("", k)


def resolve_keys(
    trials: Trials,
    available_keys: Iterable[str],
    *,
    root: Optional[str] = None,
    on_missing: str = "error",
    max_examples: int = 5,
) -> KeyResolution:
    """Map trial keys to rows of an embedding table.

    Each unique trial key is looked up as is; if absent, the normalised forms are tried in order:
    the key with the root prefix removed (``root`` given, or inferred as the longest leading path that makes
    a key match), then with the audio extension (``.wav``, ``.flac``, ...) removed, then both. Every
    normalisation used is reported in ``notes`` with its count.

    Parameters
    ----------
    trials : Trials
    available_keys : iterable of str
        Embedding keys, in row order.
    root : str, optional
        Prefix to strip from trial keys (e.g. ``/data/voxceleb1/wav/``).
    on_missing : {"error", "drop"}, default="error"
        ``"drop"`` removes trials with a missing key (reported in ``notes``).
    max_examples : int, default=5

    Returns
    -------
    KeyResolution

    Raises
    ------
    MissingKeysError
        (a ``ValueError``) when keys are missing and ``on_missing="error"``: the message gives the count of
        missing utterances, of affected trials, and examples.
    """
    if on_missing not in ("error", "drop"):
        raise ValueError(f"on_missing must be 'error' or 'drop', got {on_missing!r}")
    avail = {k: i for i, k in enumerate(available_keys)}
    get = avail.get
    n = len(trials)
    e_list, t_list = trials.enroll.tolist(), trials.test.tolist()
    # fast path: one dict lookup per trial key (no string sort); normalisation only for the keys that miss
    e_idx = np.array([get(k, -1) for k in e_list], dtype=np.int64)
    t_idx = np.array([get(k, -1) for k in t_list], dtype=np.int64)
    unmatched = sorted({e_list[i] for i in np.flatnonzero(e_idx < 0)} | {t_list[i] for i in np.flatnonzero(t_idx < 0)})
    n_root = n_ext = 0
    fixed: dict = {}
    use_root = root
    if unmatched:
        if root is None:
            # infer a root from the first key matched by neither form: the longest path-component suffix
            # (as is, or without extension) that is an embedding key
            for k in unmatched:
                if _strip_ext(k) in avail:
                    continue
                parts = k.split("/")
                for j in range(1, len(parts)):
                    suffix = "/".join(parts[j:])
                    if suffix in avail or _strip_ext(suffix) in avail:
                        use_root = "/".join(parts[:j]) + "/"
                        break
                break
        for k in unmatched:
            j = None
            if use_root and k.startswith(use_root):
                j = get(k[len(use_root):])
                if j is None:
                    j = get(_strip_ext(k[len(use_root):]))
                    if j is not None:
                        n_ext += 1
                if j is not None:
                    n_root += 1
            if j is None:
                j = get(_strip_ext(k))
                if j is not None:
                    n_ext += 1
            if j is not None:
                fixed[k] = j
        for lst, idx in ((e_list, e_idx), (t_list, t_idx)):
            for i in np.flatnonzero(idx < 0):
                idx[i] = fixed.get(lst[i], -1)
    n_uniq = len(set(e_list).union(t_list)) if unmatched else None
    notes = []
    if n_root:
        src = "given" if root is not None else "inferred"
        notes.append(f"stripped root prefix {use_root!r} ({src}) from {n_root} of {n_uniq} unique trial keys")
    if n_ext:
        notes.append(f"stripped the audio extension from {n_ext} of {n_uniq} unique trial keys")
    kept = (e_idx >= 0) & (t_idx >= 0)
    missing = [k for k in unmatched if k not in fixed]
    if missing:
        n_bad_trials = int(n - kept.sum())
        msg = (
            f"{len(missing)} of {n_uniq} utterances referenced by trial list "
            f"{trials.path or '<in memory>'!r} have no embedding ({n_bad_trials} of {n} trials affected), "
            f"e.g. {missing[:max_examples]}"
        )
        if notes:
            msg += "; key normalisation applied: " + "; ".join(notes)
        else:
            msg += "; no key normalisation (root prefix / extension) matched"
        if on_missing == "error":
            raise MissingKeysError(msg + " (use on_missing='drop' / --missing drop to skip them)", missing)
        notes.append("dropped: " + msg)
    return KeyResolution(e_idx[kept], t_idx[kept], kept, notes, missing)


def write_scores(path: str, trials: Trials, scores: np.ndarray, *, style: str = "kaldi") -> None:
    """Write a score file atomically (a temporary next to ``path``, renamed when complete).

    Parameters
    ----------
    path : str
    trials : Trials
    scores : ndarray of shape (n_trials,)
    style : {"kaldi", "espnet"}, default="kaldi"
        ``kaldi``: ``enroll test score [target|nontarget]``; ``espnet``: ``enr*tst score label``.

    Raises
    ------
    ValueError
        Length mismatch or unknown style.
    OSError
        Writing failed (``filename`` = ``path``; no temporary file is left).
    """
    from spk_toolkit.io.atomic import atomic_path
    from spk_toolkit.io.preflight import naming

    scores = np.asarray(scores)
    if scores.shape != (len(trials),):
        raise ValueError(f"scores shape {scores.shape} does not match {len(trials)} trials")
    if style not in ("kaldi", "espnet"):
        raise ValueError(f"style must be 'kaldi' or 'espnet', got {style!r}")
    block = 100_000
    with naming(path), atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s0 in range(0, len(trials), block):
            sl = slice(s0, s0 + block)
            e, t, sc = trials.enroll[sl].tolist(), trials.test[sl].tolist(), scores[sl].tolist()
            if trials.labels is None:
                lab = [""] * len(e)
            elif style == "kaldi":
                lab = [" target" if v else " nontarget" for v in trials.labels[sl].tolist()]
            else:
                lab = [f" {v}" for v in trials.labels[sl].tolist()]
            sep = " " if style == "kaldi" else "*"
            f.write("".join(f"{a}{sep}{b} {c:.6f}{d}\n" for a, b, c, d in zip(e, t, sc, lab)))


def read_scores(path: str) -> Trials:
    """Read a score file written by :func:`write_scores` (or Kaldi / ESPnet tools) back.

    Kaldi style ``enroll test score [target|nontarget|1|0]`` or ESPnet style ``enr*tst score [0|1]``, detected
    per file. The same text rules as trial lists (UTF-8, byte-order mark stripped, ``\r\n``, blank lines).

    Parameters
    ----------
    path : str

    Returns
    -------
    Trials
        With an extra attribute ``scores`` (float64, (n_trials,)); ``labels`` None when the file has none.

    Raises
    ------
    ValueError
        A row of another shape, a score that is not a finite number, a bad label, mixed labelled and unlabelled
        rows, an empty file, bytes that are not UTF-8 (each names ``file:line``).
    FileNotFoundError
        ``path`` does not exist.
    """
    import math

    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "score file not found", path)
    enroll, test, scores, labels, lines = [], [], [], [], []
    keys: dict = {}
    intern = keys.setdefault
    style = None
    for n, line in _iter_lines(path, "score file"):
        parts = line.split()
        espnet = len(parts) in (2, 3) and "*" in parts[0] and (len(parts) == 2 or parts[2] in ("0", "1"))
        row_style = "espnet" if espnet else "kaldi"
        style = style or row_style
        if row_style != style:
            raise ValueError(f"{path}:{n}: a {row_style}-style row in a {style}-style score file: {line.strip()!r}")
        if style == "espnet":
            e, t = parts[0].split("*", 1)
            rest = parts[1:]
        elif len(parts) in (3, 4):
            e, t, rest = parts[0], parts[1], parts[2:]
        else:
            raise ValueError(f"{path}:{n}: expected 'enroll test score [label]' or 'enroll*test score [label]', "
                             f"got {line.strip()!r}")
        try:
            v = float(rest[0])
        except ValueError:
            raise ValueError(f"{path}:{n}: score {rest[0]!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{path}:{n}: score {rest[0]!r} is not finite")
        lab = None
        if len(rest) > 1:
            lab = _KALDI_LABELS.get(rest[1].lower())
            if lab is None:
                raise ValueError(f"{path}:{n}: label {rest[1]!r} is not one of {sorted(_KALDI_LABELS)}")
        if labels and (labels[0] is None) != (lab is None):
            raise ValueError(f"{path}:{n}: some rows have a label and some do not")
        enroll.append(intern(e, e))
        test.append(intern(t, t))
        scores.append(v)
        labels.append(lab)
        lines.append(n)
    if not lines:
        raise ValueError(f"score file {path!r} is empty (no non-blank line)")
    tr = Trials(enroll, test, None if labels[0] is None else np.asarray(labels, dtype=np.int8),
                "espnet" if style == "espnet" else ("kaldi" if labels[0] is not None else "unlabelled"), path,
                lines=np.asarray(lines, dtype=np.int32))
    tr.scores = np.asarray(scores, dtype=np.float64)
    return tr
