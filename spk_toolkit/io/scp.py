"""The one reader of Kaldi ``.scp`` index files of arrays (embeddings, features): it never runs a program.

A Kaldi scp maps a key to an rxfilename: ``path.ark:offset`` (optionally ``[rows]`` / ``[rows,cols]``, inclusive
ranges), a whole file ``path``, or a command (``cmd ... |``, ``| cmd``) or ``-`` (standard input). Kaldi and
kaldiio run the command through a shell; an scp handed to us by another tool could therefore run anything on
``spk_score --embeddings foreign.scp``. This module refuses every command and standard-input entry when the
scp is read (``file:line`` and the key named, before any array is loaded) and loads arrays by opening the ark
file itself (``open`` + ``seek`` + :func:`kaldiio.matio.read_kaldi`), so no path through it reaches a shell.
Only ``wav.scp`` may hold pipes, and only with ``--allow_pipes`` (:func:`spk_toolkit.io.audio.read_audio`).

Every reader of an scp in the toolkit comes here: the ``kaldi_ark`` storage reader (``spk_score``,
:func:`spk_toolkit.load_embeddings`), ``check_spk_embed_scp``, ``convert_to_avg_spk_embed`` and the ESPnet
feature-cache recipe.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from spk_toolkit.io.datadir import CorpusError

__all__ = ["command_reason", "load_scp_array", "parse_scp_value", "read_scp_entries", "resolve_scp_entry"]

_VALUE = re.compile(r"^(?P<ark>.*?):(?P<offset>\d+)(?P<slices>(\[[^\]]*\])?)$")


def command_reason(value: str) -> Optional[str]:
    """Why an scp value would run a program or read standard input under Kaldi's rules, or ``None``.

    Parameters
    ----------
    value : str
        The scp value (the rest of the line after the key).

    Returns
    -------
    str or None
        ``"a command ('cmd |')"``, ``"an output pipe ('| cmd')"``, ``"standard input ('-')"``, or ``None``
        for a file entry. The ark part of ``path:offset[...]`` is checked as well (kaldiio strips the offset and
        then runs an ark part ending in ``|``).
    """
    v = value.strip()
    ark = v
    m = _VALUE.match(v)
    if m:
        ark = m.group("ark").strip()
    for part in (v, ark):
        if part.endswith("|"):
            return "a command ('cmd |')"
        if part.startswith("|"):
            return "an output pipe ('| cmd')"
        if part == "-":
            return "standard input ('-')"
    return None


def read_scp_entries(path: str | os.PathLike) -> List[Tuple[str, str]]:
    """``[(key, value), ...]`` of a Kaldi scp in file order (the value is the rest of the line, e.g. ``ark:offset``).

    Read through :func:`spk_toolkit.io.textio.iter_lines` (UTF-8, a byte-order mark stripped, CRLF accepted,
    blank lines skipped). A command or standard-input entry is refused here, before anything is loaded.

    Parameters
    ----------
    path : str or PathLike
        The scp file.

    Returns
    -------
    list of (str, str)

    Raises
    ------
    CorpusError
        A line without a value, a key twice, or a value that would run a program (``cmd |``, ``| cmd``) or
        read standard input (``-``); the message starts with ``file:line`` and names the key.
    spk_toolkit.io.textio.TextFileError
        The file cannot be read, or a line is not UTF-8.
    """
    from spk_toolkit.io.textio import iter_lines

    rows: List[Tuple[str, str]] = []
    seen: Dict[str, int] = {}
    for n, line in iter_lines(path, what=Path(path).name):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise CorpusError(f"{path}:{n}: expected 'key value', got {line.strip()!r}")
        key, value = fields[0], fields[1].strip()
        if key in seen:
            raise CorpusError(f"{path}:{n}: key {key!r} appears twice (first on line {seen[key]})")
        why = command_reason(value)
        if why is not None:
            raise CorpusError(f"{path}:{n}: entry {key!r} is {why}: {value!r}; an scp of arrays is never run as a "
                              "command (only wav.scp pipes, with --allow_pipes)")
        seen[key] = n
        rows.append((key, value))
    return rows


def parse_scp_value(value: str) -> Tuple[str, Optional[int], Optional[Tuple[slice, ...]]]:
    """``(ark_path, offset, slices)`` of a file entry ``path[:offset[[rows(,cols)]]]``.

    Kaldi's range syntax: ``[a:b]`` is rows ``a..b`` inclusive, ``[a:b,c:d]`` rows and columns, an empty
    part (``[,c:d]``) all of them.

    Parameters
    ----------
    value : str

    Returns
    -------
    (str, int or None, tuple of slice or None)

    Raises
    ------
    CorpusError
        A command or standard-input entry (:func:`command_reason`), or a malformed range.
    """
    v = value.strip()
    why = command_reason(v)
    if why is not None:
        raise CorpusError(f"scp entry {v!r} is {why}; an scp of arrays is never run as a command")
    m = _VALUE.match(v)
    if not m:
        return v, None, None
    slices = None
    if m.group("slices"):
        slices = tuple(_range(part, v) for part in m.group("slices")[1:-1].split(","))
    return m.group("ark"), int(m.group("offset")), slices


def _range(part: str, value: str) -> slice:
    part = part.strip()
    if part in ("", ":"):
        return slice(None)
    try:
        bounds = [int(x) for x in part.split(":")]
    except ValueError:
        raise CorpusError(f"scp entry {value!r}: range {part!r} is not 'first:last'") from None
    if len(bounds) == 1:
        return slice(bounds[0], bounds[0] + 1)
    if len(bounds) == 2:
        return slice(bounds[0], bounds[1] + 1)
    raise CorpusError(f"scp entry {value!r}: range {part!r} is not 'first:last'")


def load_scp_array(value: str) -> np.ndarray:
    """The array an scp file entry points at, read from the ark file itself (never through a shell).

    Parameters
    ----------
    value : str
        ``path.ark:offset[...]`` or a whole-file ``path`` (relative paths against the working directory; see
        :func:`resolve_scp_entry` to resolve them against the scp first).

    Returns
    -------
    numpy.ndarray
        As :func:`kaldiio.matio.read_kaldi` decodes it (Kaldi float matrices/vectors, int32 vectors,
        compressed matrices as float32, numpy-in-ark with its own dtype), the range applied.

    Raises
    ------
    CorpusError
        A command or standard-input entry, a malformed range.
    OSError
        The ark cannot be opened.
    """
    from kaldiio.matio import read_kaldi

    ark, offset, slices = parse_scp_value(value)
    with open(ark, "rb") as fd:
        if offset is not None:
            fd.seek(offset)
        arr = read_kaldi(fd)
    if isinstance(arr, tuple):  # a wav in an ark: (rate, samples)
        arr = arr[1]
    arr = np.asarray(arr)
    return arr[slices] if slices is not None else arr


def resolve_scp_entry(value: str, scp_dir: Path, cache: Optional[Dict[str, str]] = None) -> str:
    """An scp value (``ark:offset``, ``ark:offset[slices]``, ``ark``) with a relative ark path resolved.

    The ark is looked for relative to ``scp_dir``, then each parent of ``scp_dir`` (absolute), and the first
    existing file wins; a command entry, an absolute path, or a relative path found nowhere is returned
    unchanged (a relative one is then resolved against the working directory when read, Kaldi's rule, and
    reported missing there).

    Parameters
    ----------
    value : str
        The scp entry's value.
    scp_dir : Path
        Directory of the scp.
    cache : dict, optional
        ``relative ark -> resolved ark`` of earlier entries (one look-up per ark file).

    Returns
    -------
    str
    """
    v = value.strip()
    if not v or command_reason(v) is not None:
        return value
    ark, offset = v, ""
    m = _VALUE.match(v)
    if m:
        ark, offset = m.group("ark"), ":" + m.group("offset") + m.group("slices")
    if os.path.isabs(ark):
        return value
    if cache is not None and ark in cache:
        return cache[ark] + offset
    resolved = ark
    base = Path(os.path.abspath(scp_dir))
    for d in (base, *base.parents):
        cand = d / ark
        if cand.is_file():
            resolved = str(cand)
            break
    if cache is not None:
        cache[ark] = resolved
    return resolved + offset
