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

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "Trials",
    "TRIAL_FORMATS",
    "read_trials",
    "detect_format",
    "resolve_keys",
    "KeyResolution",
    "MissingKeysError",
    "write_scores",
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


@dataclass
class Trials:
    """A trial list.

    Attributes
    ----------
    enroll : ndarray of str, shape (n_trials,)
        Enrollment keys as written in the list.
    test : ndarray of str, shape (n_trials,)
        Test keys as written in the list.
    labels : ndarray of int8, shape (n_trials,), or None
        1 = target, 0 = nontarget; None for an unlabelled list.
    fmt : str
        One of :data:`TRIAL_FORMATS`.
    path : str or None
        Where it was read from.
    """

    enroll: np.ndarray
    test: np.ndarray
    labels: Optional[np.ndarray] = None
    fmt: str = "unlabelled"
    path: Optional[str] = None

    def __post_init__(self):
        self.enroll = np.asarray(self.enroll, dtype=str)
        self.test = np.asarray(self.test, dtype=str)
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
        """The trials where ``mask`` (bool, (n_trials,)) is True, in order."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.enroll.shape:
            raise ValueError(f"mask shape {mask.shape} does not match {len(self)} trials")
        labels = None if self.labels is None else self.labels[mask]
        return Trials(self.enroll[mask], self.test[mask], labels, self.fmt, self.path)

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


def _read_rows(path: str) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts:
                rows.append(parts)
    if not rows:
        raise ValueError(f"trial list {path!r} is empty")
    return rows


def _espnet_dir(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return path if os.path.exists(os.path.join(path, "trial.scp")) else None
    if os.path.basename(path) in _ESPNET_FILES:
        return os.path.dirname(path) or "."
    return None


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
        When the rows do not fit any format, or fit two (then pass ``fmt`` explicitly).
    """
    if _espnet_dir(path) is not None:
        return "espnet"
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory without trial.scp; expected a trial list file")
    rows = _read_rows(path)
    ncols = {len(r) for r in rows}
    if ncols == {2}:
        return "unlabelled"
    if ncols != {3}:
        raise ValueError(f"cannot detect the format of {path!r}: rows have {sorted(ncols)} columns (expected 2 or 3)")
    first_is_label = all(r[0] in ("0", "1") for r in rows)
    last_is_label = all(r[2].lower() in _KALDI_LABELS for r in rows)
    if first_is_label and not last_is_label:
        return "voxceleb"
    if last_is_label and not first_is_label:
        return "kaldi"
    if first_is_label and last_is_label:
        raise ValueError(
            f"cannot tell whether {path!r} is 'voxceleb' (label enroll test) or 'kaldi' (enroll test label): "
            "both first and last columns are 0/1; pass fmt / --trials_format explicitly"
        )
    raise ValueError(
        f"cannot detect the format of {path!r}: neither the first column (voxceleb) nor the last column "
        f"(kaldi) holds only labels (e.g. row {' '.join(rows[0])!r}); pass fmt / --trials_format explicitly"
    )


def _read_espnet(path: str) -> Trials:
    d = _espnet_dir(path)
    if d is None:
        raise ValueError(f"{path!r} is not an ESPnet trial directory (needs trial.scp, trial2.scp, trial_label)")
    scp = os.path.join(d, "trial.scp")
    lab = os.path.join(d, "trial_label")
    if os.path.exists(scp):
        keys = [r[0] for r in _read_rows(scp)]
    elif os.path.exists(lab):
        keys = [r[0] for r in _read_rows(lab)]
    else:
        raise ValueError(f"ESPnet trial directory {d!r} has neither trial.scp nor trial_label")
    enroll, test = [], []
    bad = []
    for k in keys:
        parts = k.split("*")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            bad.append(k)
        else:
            enroll.append(parts[0])
            test.append(parts[1])
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(keys)} ESPnet trial keys in {d!r} are not of the form 'enroll*test', e.g. {bad[:3]}"
        )
    labels = None
    if os.path.exists(lab):
        lab_rows = _read_rows(lab)
        lab_map = {}
        for r in lab_rows:
            if len(r) != 2 or r[1] not in ("0", "1"):
                raise ValueError(f"{lab!r}: expected rows 'enroll*test 0|1', got {' '.join(r)!r}")
            lab_map[r[0]] = int(r[1])
        missing = [k for k in keys if k not in lab_map]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(keys)} trials in {scp!r} have no label in {lab!r}, e.g. {missing[:3]}"
            )
        labels = np.fromiter((lab_map[k] for k in keys), dtype=np.int8, count=len(keys))
    return Trials(np.array(enroll), np.array(test), labels, "espnet", path)


def read_trials(path: str, fmt: str = "auto") -> Trials:
    """Read a trial list.

    Parameters
    ----------
    path : str
        Trial file, or ESPnet trial directory (or its ``trial.scp`` / ``trial_label``).
    fmt : {"auto", "voxceleb", "kaldi", "espnet", "unlabelled"}, default="auto"
        ``"auto"`` uses :func:`detect_format`; any other value overrides detection.

    Returns
    -------
    trials : Trials
        ``.enroll``, ``.test`` (ndarray of str, (n_trials,)) and ``.labels`` (int8 0/1 or None).

    Raises
    ------
    ValueError
        Unknown ``fmt``, undetectable format, or a row that does not fit ``fmt`` (the message gives the line).
    FileNotFoundError
        ``path`` does not exist.
    """
    if fmt not in ("auto",) + TRIAL_FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {TRIAL_FORMATS}, got {fmt!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"trial list not found: {path!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "espnet":
        return _read_espnet(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; format {fmt!r} expects a file")
    rows = _read_rows(path)
    want = 2 if fmt == "unlabelled" else 3
    for i, r in enumerate(rows):
        if len(r) != want:
            raise ValueError(
                f"{path!r} row {i + 1}: format {fmt!r} expects {want} columns, got {len(r)}: {' '.join(r)!r}"
            )
    if fmt == "unlabelled":
        return Trials(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), None, fmt, path)
    if fmt == "voxceleb":
        lab_col, e_col, t_col = 0, 1, 2
        labmap = {"1": 1, "0": 0}
    else:  # kaldi
        e_col, t_col, lab_col = 0, 1, 2
        labmap = _KALDI_LABELS
    labels = np.empty(len(rows), dtype=np.int8)
    for i, r in enumerate(rows):
        v = labmap.get(r[lab_col].lower())
        if v is None:
            raise ValueError(
                f"{path!r} row {i + 1}: label {r[lab_col]!r} is not one of {sorted(labmap)} "
                f"(format {fmt!r}; override with fmt / --trials_format if detection was wrong)"
            )
        labels[i] = v
    enroll = np.array([r[e_col] for r in rows])
    test = np.array([r[t_col] for r in rows])
    return Trials(enroll, test, labels, fmt, path)


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
    """Write a score file.

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
    """
    scores = np.asarray(scores)
    if scores.shape != (len(trials),):
        raise ValueError(f"scores shape {scores.shape} does not match {len(trials)} trials")
    if style not in ("kaldi", "espnet"):
        raise ValueError(f"style must be 'kaldi' or 'espnet', got {style!r}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(trials)):
            e, t, s = trials.enroll[i], trials.test[i], scores[i]
            if style == "kaldi":
                lab = "" if trials.labels is None else (" target" if trials.labels[i] else " nontarget")
                f.write(f"{e} {t} {s:.6f}{lab}\n")
            else:
                lab = "" if trials.labels is None else f" {int(trials.labels[i])}"
                f.write(f"{e}*{t} {s:.6f}{lab}\n")
    os.replace(tmp, path)
