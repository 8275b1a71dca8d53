"""The output side, checked before any model is loaded, and file-system errors that name their path.

:func:`check_output_dir` runs in the driver right after the corpus is read: the output directory must exist as a
directory or be creatable, be writable (a probe file is created and removed), and have at least an estimate of
the outputs free (:func:`estimate_output_bytes`). Each failure is an :class:`OSError` whose ``filename`` is the
path and whose ``strerror`` says what is wrong, so the CLIs print ``PATH: reason`` and exit with the documented
code (README, "Exit codes").

:func:`naming` gives an :class:`OSError` raised without a path (a ``write()`` on a full disk says only ``No space
left on device``) the path of the file being written.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["OutputDirError", "check_output_dir", "estimate_output_bytes", "naming", "describe_oserror", "ASSUMED_DIM"]

#: Floats per utterance assumed by :func:`estimate_output_bytes` before the model is known (speaker embeddings
#: are 192-512-dimensional; resemblyzer's are 256).
ASSUMED_DIM = 512


def estimate_output_bytes(n_utterances: int, n_formats: int = 1, dim: int = ASSUMED_DIM) -> int:
    """Bytes an extraction of ``n_utterances`` vector outputs will need in its output directory (an estimate).

    Each utterance is stored ``n_formats + 2`` times at the peak of a run (the shard files, the merge's spill
    file, and each output format), as ``dim`` float32 plus about 256 bytes of key and index; plus 1 MiB for
    ``plan.json``, ``summary.json`` and ``errors.tsv``. Sequence outputs (frame features) are not covered.

    Parameters
    ----------
    n_utterances : int
    n_formats : int
        Number of ``--output_format`` entries.
    dim : int
        Floats per utterance.

    Returns
    -------
    int
    """
    return int(n_utterances) * (4 * int(dim) + 256) * (int(n_formats) + 2) + (1 << 20)


class OutputDirError(OSError):
    """The output directory cannot take a run's outputs (``filename`` = the path, ``strerror`` = why)."""


def _fail(code: int, reason: str, path: Path) -> "OutputDirError":
    return OutputDirError(code, reason, str(path))


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Make sure ``path`` can take a run's outputs: a directory (created if missing), writable, with space.

    Parameters
    ----------
    path : path-like
        The output directory.
    need_bytes : int
        Free space required (0 = do not check); see :func:`estimate_output_bytes`.

    Returns
    -------
    Path
        The directory (now existing).

    Raises
    ------
    OutputDirError
        An ``OSError`` with ``filename`` = the offending path, ``strerror`` = one of: ``exists and is not a directory``, ``cannot
        create the output directory (<reason>)`` (a parent is a file, read-only file system, permission denied),
        ``output directory is not writable (<reason>)``, ``only N free, the outputs need about M: No space left
        on device`` (``errno.ENOSPC``).
    """
    import humanfriendly

    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise _fail(errno.ENOTDIR if p.exists() else errno.ENOENT,
                        "exists and is not a directory" if p.exists() else "is a dangling symlink", p)
    else:
        anc = p.parent
        while not (anc.exists() or anc == anc.parent):
            anc = anc.parent
        if anc.exists() and not anc.is_dir():
            raise _fail(errno.ENOTDIR, f"cannot create the output directory {p}: {anc} is not a directory", anc)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _fail(e.errno or errno.EIO, f"cannot create the output directory ({e.strerror or e})",
                        Path(e.filename) if e.filename else p) from None
    from spk_toolkit.io.atomic import temporary_name

    probe = p / temporary_name("write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    except OSError as e:
        raise _fail(e.errno or errno.EACCES, f"output directory is not writable ({e.strerror or e})", p) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    if need_bytes > 0:
        free = shutil.disk_usage(p).free
        if free < need_bytes:
            raise _fail(errno.ENOSPC, f"only {humanfriendly.format_size(free, binary=True)} free, the outputs need "
                                      f"about {humanfriendly.format_size(need_bytes, binary=True)}: "
                                      f"{os.strerror(errno.ENOSPC)}", p)
    return p


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an :class:`OSError` without a ``filename`` is re-raised with ``filename=path``.

    Parameters
    ----------
    path : path-like
        The file (or directory) the block writes.

    Raises
    ------
    OSError
        The block's, of the same errno (and so of the same subclass), now naming ``path``.
    """
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(path)) from e
        raise


def describe_oserror(e: OSError, fallback: str | os.PathLike | None = None) -> str:
    """One line for an :class:`OSError`: ``PATH: reason`` (``fallback`` when the error names no path).

    Parameters
    ----------
    e : OSError
    fallback : path-like, optional
        What to name when ``e`` has no ``filename`` (the output directory of the run).

    Returns
    -------
    str
    """
    reason = e.strerror or str(e)
    name = e.filename if e.filename is not None else fallback
    if name is None:
        return reason
    extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{os.fspath(name)}{extra}: {reason}"
