"""Reading the text files users hand us (Kaldi data dir files, manifests, trial lists, score files).

One reader for all of them, so each behaves the same way on what editors and other tools write:

* decoded as UTF-8; a byte-order mark at the start (Windows editors write one) is stripped and said once per
  file in the log; bytes that are not UTF-8 are an error naming ``file:line``;
* ``\\n`` and ``\\r\\n`` line ends are both accepted (the ``\\r`` never reaches a field);
* blank (or whitespace-only) lines are skipped;
* every line comes with its 1-based line number, so every message can say ``file:line``.

Numbers in these files are parsed by :func:`parse_seconds`: finite, and (unless allowed) not negative.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterator, Optional, Tuple

logger = logging.getLogger(__name__)

__all__ = ["TextFileError", "iter_lines", "parse_seconds", "BOM"]

BOM = b"\xef\xbb\xbf"
_bom_reported: set = set()


class TextFileError(ValueError):
    """A text input file cannot be read or has a malformed field (the message starts with ``file:line``).

    Parameters
    ----------
    message : str
        Complete message, starting with ``path`` or ``path:line``.
    path : str
        The file.
    line : int or None
        1-based line number, when the problem is on one line.
    """

    def __init__(self, message: str, path: str = "", line: Optional[int] = None):
        super().__init__(message)
        self.path, self.line = path, line


def iter_lines(path: str | os.PathLike, what: str = "file") -> Iterator[Tuple[int, str]]:
    """Yield ``(line_number, line)`` for every non-blank line of a UTF-8 text file.

    The line has its line end (``\\n`` or ``\\r\\n``) removed and is otherwise as written (callers split it).
    A UTF-8 byte-order mark at the start of the file is removed; that is logged once per file (INFO level: the
    file is read correctly, nothing is lost).

    Parameters
    ----------
    path : path-like
        The file.
    what : str
        What the file is, for messages (``"wav.scp"``, ``"trial list"``).

    Yields
    ------
    (int, str)
        1-based line number and the line without its line end; blank and whitespace-only lines are skipped.

    Raises
    ------
    TextFileError
        The file cannot be opened (``file not found``, ``permission denied``, ``is a directory``) or a line is
        not valid UTF-8 (names ``file:line`` and the byte offset in the line).
    """
    p = os.fspath(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise TextFileError(f"{p}: cannot read {what} ({e.strerror or e})", p) from None
    with f:
        first = True
        n = 0
        for n, raw in enumerate(f, 1):
            if first:
                first = False
                if raw.startswith(BOM):
                    raw = raw[len(BOM):]
                    if p not in _bom_reported:
                        _bom_reported.add(p)
                        logger.info("%s: UTF-8 byte-order mark at the start of the file ignored", p)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TextFileError(f"{p}:{n}: not valid UTF-8 (byte {e.start + 1} of the line: "
                                    f"{raw[e.start:e.start + 1]!r}); save the {what} as UTF-8", p, n) from None
            if line.endswith("\n"):
                line = line[:-2] if line.endswith("\r\n") else line[:-1]
            if line.strip():
                yield n, line


def parse_seconds(text: str, where: str, name: str = "time", allow_negative_one: bool = False) -> float:
    """Parse a time or duration in seconds from a text field.

    Parameters
    ----------
    text : str
        The field.
    where : str
        ``file:line`` (start of the error message).
    name : str
        What the field is (``"start"``, ``"end"``, ``"duration"``).
    allow_negative_one : bool
        Accept exactly ``-1`` (Kaldi ``segments``: an end time of -1 means the end of the recording).

    Returns
    -------
    float
        A finite number >= 0 (or -1 when allowed).

    Raises
    ------
    TextFileError
        Not a number, not finite (``nan``, ``inf``), or negative.
    """
    try:
        v = float(text)
    except ValueError:
        raise TextFileError(f"{where}: {name} {text!r} is not a number (seconds)") from None
    if not math.isfinite(v):
        raise TextFileError(f"{where}: {name} {text!r} is not a finite number of seconds")
    if v < 0 and not (allow_negative_one and v == -1):
        raise TextFileError(f"{where}: {name} {text!r} is negative" + (" (only -1, the end of the recording, "
                                                                        "may be negative)" if allow_negative_one
                                                                        else ""))
    return v
