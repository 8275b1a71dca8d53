"""Atomic commits of files and directories: write under a temporary name, then rename into place.

One helper, :class:`AtomicPath`, used by every writer of spk_toolkit. The temporary path lives in the
directory of the final path (so the rename never crosses a file system) and its name is unique per process
and per call::

    .<final name>.<host>.<pid>.<12 hex digits>.tmp

so two processes (or two writers in one process) committing the same final path never share a temporary
file; the last commit wins and the final path always holds one complete output. Names of this shape are
recognised by :func:`is_temporary` / :func:`parse_temporary` (candidates: ``directory.glob(TEMP_GLOB)``), so a
driver can remove what killed processes left behind.

Example::

    with atomic_path("exp/embeddings.npz") as tmp:   # tmp: Path, not created yet
        write_something(tmp)                           # a file or a directory
    # committed (fsync + os.replace); on an exception the temporary is removed and the final path untouched
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

__all__ = [
    "TEMP_GLOB", "AtomicPath", "TemporaryName", "atomic_path", "atomic_write_bytes", "atomic_write_text",
    "commit_together", "is_temporary", "parse_temporary", "temporary_name",
]

#: Glob matching every temporary name made here (and possibly other hidden ``*.tmp`` files: confirm each
#: candidate with :func:`is_temporary`).
TEMP_GLOB = ".*.tmp"

_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.(?P<token>[0-9a-f]{12})\.tmp$",
                      re.DOTALL)
_MAX_FINAL_CHARS = 100  # keeps temporary names well under NAME_MAX (255 bytes) for long final names


class TemporaryName(NamedTuple):
    """The parts of a temporary name made by :func:`temporary_name`.

    Attributes
    ----------
    final_name : str
        Base name of the final path (its first 100 characters when it was longer).
    host : str
        Host name of the writing process, characters outside ``[A-Za-z0-9-]`` replaced by ``-``.
    pid : int
        Process id of the writing process.
    token : str
        12 random hex digits (unique per call).
    """

    final_name: str
    host: str
    pid: int
    token: str


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def temporary_name(final_name: str) -> str:
    """A fresh temporary base name for ``final_name`` (nothing is created).

    Parameters
    ----------
    final_name : str
        Base name (no directory) of the final file or directory.

    Returns
    -------
    str
        ``.<final_name>.<host>.<pid>.<token>.tmp``; unique per call (random token), hidden (leading ``.``).

    Raises
    ------
    ValueError
        ``final_name`` is empty or contains ``/``.
    """
    if not final_name or "/" in final_name or os.sep in final_name:
        raise ValueError(f"final_name must be a non-empty base name, got {final_name!r}")
    return f".{final_name[:_MAX_FINAL_CHARS]}.{_host()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def parse_temporary(name: str | os.PathLike) -> Optional[TemporaryName]:
    """Split a temporary name made by :func:`temporary_name`; ``None`` for any other name.

    Parameters
    ----------
    name : str or path-like
        A base name or a path (only its last component is looked at).

    Returns
    -------
    TemporaryName or None
    """
    m = _TEMP_RE.match(os.path.basename(os.fspath(name)))
    if m is None:
        return None
    return TemporaryName(m["final"], m["host"], int(m["pid"]), m["token"])


def is_temporary(name: str | os.PathLike) -> bool:
    """True if ``name`` is a temporary made by this module (an uncommitted or moved-aside output).

    Parameters
    ----------
    name : str or path-like
        A base name or a path (only its last component is looked at).

    Returns
    -------
    bool

    Notes
    -----
    A leftover of a killed process can be removed safely once no writer of that output is running (for the
    engine: while it holds the output directory's lock); :func:`parse_temporary` gives its host and pid.
    The lock files of :func:`commit_together` (``.<name>.lock``) are not temporaries.
    """
    return parse_temporary(name) is not None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for f in files:
                _fsync_path(Path(root) / f)
            _fsync_path(Path(root))
    else:
        _fsync_path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace(tmp: Path, final: Path) -> None:
    """``os.replace`` that also replaces an existing directory (or a file by a directory and back).

    POSIX cannot swap a non-empty directory atomically: the old one is first renamed aside (to a temporary
    name) and removed after the new one is in place, so a reader sees the old output, briefly nothing, or the
    new output, never a mix. Concurrent commits of the same path each retry until their rename succeeds.
    """
    aside = []
    try:
        for _ in range(100):
            try:
                os.replace(tmp, final)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR) \
                        or not os.path.lexists(final):
                    raise
            trash = final.parent / temporary_name(final.name)
            try:
                os.rename(final, trash)
            except FileNotFoundError:  # another committer moved it first
                continue
            aside.append(trash)
        raise OSError(errno.EBUSY, f"could not replace {final}: it keeps reappearing", str(final))
    finally:
        for trash in aside:
            _remove(trash)


class AtomicPath:
    """A temporary path next to ``final_path`` that :meth:`commit` renames onto it, or :meth:`abort` removes.

    The temporary is *not* created: the caller writes a file or a directory at :attr:`tmp`. Also a context
    manager (commit on success, abort on an exception).

    Parameters
    ----------
    final_path : path-like
        Where the output must appear. Its directory must exist.
    fsync : bool, default=True
        Flush the temporary (every file of a directory) and the parent directory to disk around the rename,
        so a power loss leaves the old or the new output.

    Attributes
    ----------
    final : Path
    tmp : Path
        ``final.parent / temporary_name(final.name)``.
    state : {"open", "committed", "aborted"}

    Raises
    ------
    FileNotFoundError
        The directory of ``final_path`` does not exist.
    ValueError
        ``final_path`` has no base name (``"/"``, ``""``).
    """

    def __init__(self, final_path: str | os.PathLike, fsync: bool = True):
        self.final = Path(final_path)
        if self.final.name in ("", ".", ".."):
            raise ValueError(f"not a file or directory name: {os.fspath(final_path)!r}")
        if not self.final.parent.is_dir():
            raise FileNotFoundError(f"directory of {self.final} does not exist")
        self.tmp = self.final.parent / temporary_name(self.final.name)
        self.fsync = fsync
        self.state = "open"

    def commit(self) -> Path:
        """Rename the temporary onto the final path (replacing what was there); returns the final path.

        Raises
        ------
        FileNotFoundError
            Nothing was written at :attr:`tmp` (the temporary is then considered aborted).
        ValueError
            Called after :meth:`abort`.
        OSError
            The rename failed (the temporary is removed).
        """
        if self.state == "committed":
            return self.final
        if self.state == "aborted":
            raise ValueError(f"{self.final}: commit after abort")
        try:
            if not os.path.lexists(self.tmp):
                raise FileNotFoundError(f"nothing was written to the temporary {self.tmp} of {self.final}")
            if self.fsync:
                _fsync_tree(self.tmp)
            _replace(self.tmp, self.final)
            if self.fsync:
                _fsync_path(self.final.parent)
        except BaseException:
            self.abort()
            raise
        self.state = "committed"
        return self.final

    def abort(self) -> None:
        """Remove the temporary (file or directory) if it exists; the final path is not touched. Idempotent
        and never raises for a missing temporary; does nothing after a successful :meth:`commit`."""
        if self.state == "open":
            self.state = "aborted"
            _remove(self.tmp)

    def __enter__(self) -> "AtomicPath":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"AtomicPath({os.fspath(self.final)!r}, tmp={self.tmp.name!r}, state={self.state!r})"


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Context manager yielding a temporary path that becomes ``final_path`` when the block succeeds.

    Parameters
    ----------
    final_path : path-like
        Final file or directory; its parent directory must exist.
    fsync : bool, default=True
        See :class:`AtomicPath`.

    Yields
    ------
    Path
        The temporary path (not created): write a file or a directory there.

    Raises
    ------
    FileNotFoundError
        The parent directory does not exist, or the block wrote nothing at the temporary path.
    OSError
        The rename failed.
    Any exception of the block is re-raised after the temporary is removed.
    """
    with AtomicPath(final_path, fsync=fsync) as a:
        yield a.tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``); returns ``Path(path)``.

    Raises
    ------
    FileNotFoundError
        The directory of ``path`` does not exist.
    OSError
        Writing or renaming failed (nothing is left under a temporary name).
    """
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (``encoding``, newlines as given); returns ``Path(path)``.

    Raises
    ------
    FileNotFoundError
        The directory of ``path`` does not exist.
    UnicodeEncodeError
        ``text`` cannot be encoded (nothing is written).
    OSError
        Writing or renaming failed.
    """
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def group_lock_path(first_final: str | os.PathLike) -> Path:
    """The lock file :func:`commit_together` takes for a group whose first item is ``first_final``:
    ``.<name>.lock`` beside it (left in place; ``--overwrite`` removes it)."""
    first = Path(first_final)
    return first.parent / f".{first.name}.lock"


def commit_together(items: Sequence[AtomicPath], remove_first: Sequence[str | os.PathLike] = (),
                    lock_timeout: float = 600.0) -> None:
    """Commit several :class:`AtomicPath` in order, under one lock, so concurrent committers of the same
    group never interleave (e.g. a Kaldi ``.ark`` and the ``.scp`` that points into it).

    Parameters
    ----------
    items : sequence of AtomicPath
        Committed in this order (put the file that points into the others last).
    remove_first : sequence of path-like
        Removed (if present) under the lock before the first commit, e.g. an old index that would point into
        the new data while the group is being replaced: a reader then finds no index rather than a wrong one.
    lock_timeout : float, default=600
        Seconds to wait for the lock.

    The lock is ``filelock.FileLock`` on ``.<first final name>.lock`` in the first item's directory; the
    lock file is left in place (removing it would race with other committers). If one commit fails, the
    items not yet committed are aborted.

    Raises
    ------
    filelock.Timeout
        The lock was not obtained within ``lock_timeout`` seconds (all items aborted).
    OSError, FileNotFoundError, ValueError
        As :meth:`AtomicPath.commit`.
    """
    if not items:
        return
    import filelock

    first = items[0].final
    try:
        with filelock.FileLock(str(group_lock_path(first)), timeout=lock_timeout):
            for p in remove_first:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            for a in items:
                a.commit()
    finally:
        for a in items:
            a.abort()  # no-op for the committed ones
