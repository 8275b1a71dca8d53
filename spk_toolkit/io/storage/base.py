"""The storage formats' common ground: key rules and member/file names, the Writer and Reader base classes.
"""
from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import quote

import numpy as np

from spk_toolkit.io.atomic import group_lock_path


_STORABLE_KINDS = "biufc"  # bool, signed/unsigned int, float, complex


def check_key(key: str) -> str:
    """Validate a storage key (a Kaldi utterance id); returns it unchanged.

    Parameters
    ----------
    key : str
        Any non-empty string without whitespace (``str.isspace``: also Unicode spaces and ``\\x1c``-``\\x1f``,
        which Python's ``str.split`` treats as separators) and without NUL.

    Raises
    ------
    TypeError
        ``key`` is not a ``str``.
    ValueError
        Empty, contains whitespace or NUL (the message names the key and the character), or is not encodable
        as UTF-8 (a lone surrogate).
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be str, got {type(key).__name__} {key!r}")
    if not key:
        raise ValueError("empty key: utterance ids must be non-empty")
    for c in key:
        if c.isspace() or c == "\0":
            raise ValueError(f"key {key!r} contains {'NUL' if c == chr(0) else 'whitespace'} ({c!r}); "
                             f"Kaldi utterance ids cannot")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"key {key!r} is not valid Unicode (lone surrogate)") from None
    return key


def _as_storable(array, key: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.kind not in _STORABLE_KINDS:
        raise TypeError(f"key {key!r}: dtype {arr.dtype} cannot be stored (numeric and bool dtypes only)")
    return arr


def npz_member_name(key: str) -> str:
    """Zip member name of ``key`` in an ``npz`` output.

    The key itself, plus ``.npy`` when the key ends with ``.npy`` (``np.load`` strips one ``.npy`` from member
    names) or with ``/`` (a zip member ending in ``/`` is a directory entry). ``np.load(path)`` then lists
    exactly the keys (``.files``) and ``np.load(path)[key]`` returns the right array for every key, with one
    exception inherent to ``np.load`` (it matches member names before stripped names): when a file holds both
    ``K`` and ``K + ".npy"`` for a ``K`` that ends with ``.npy`` or ``/`` (``"x.npy"`` and ``"x.npy.npy"``,
    ``"x/"`` and ``"x/.npy"``), ``np.load(path)[K + ".npy"]`` returns the array of ``K``. :class:`NpzReader`
    is exact for every key.
    """
    return key + ".npy" if key.endswith((".npy", "/")) else key


def hdf5_dataset_name(key: str) -> str:
    """HDF5 link name of ``key`` in an ``hdf5`` output: ``urllib.parse.quote(key, safe="")`` with ``.`` also
    escaped (``%2E``), so names hold only ``[A-Za-z0-9_~%-]`` (no ``/`` groups, no ``.``); ``unquote``
    inverts it."""
    return quote(key, safe="").replace(".", "%2E")


_NAME_MAX = 255


def npy_file_name(key: str) -> str:
    """File name of ``key`` in an ``npy_dir`` output: ``quote(key, safe="")`` with a leading ``.`` escaped
    (``%2E``, no hidden files), plus ``.npy``. A name longer than 255 bytes becomes its first 150 characters,
    ``%00`` (never produced by quoting: NUL is not a valid key) and the SHA-256 of the key; ``index.txt``
    maps keys to file names either way."""
    q = quote(key, safe="")
    if q.startswith("."):
        q = "%2E" + q[1:]
    name = q + ".npy"
    if len(name.encode()) > _NAME_MAX:
        name = f"{q[:150]}%00{hashlib.sha256(key.encode()).hexdigest()}.npy"
    return name


class Writer(abc.ABC):
    """Base of every storage writer: stores ``key -> array`` pairs under ``output_dir/stem`` atomically.

    A subclass defines :meth:`output_path` (and :meth:`output_paths` when it makes several files) and
    ``_write`` / ``_commit`` / ``_abort`` (and optionally ``_check``), and is registered with
    :func:`register_storage`. The base validates keys (:func:`check_key`, duplicates) and
    arrays (numeric or bool dtype), counts, and guarantees the state machine: ``write``* then one ``close``
    (commit) or ``abort``. Used as a context manager it commits on success and aborts on an exception, which
    leaves nothing under the final name and no temporary file.

    Parameters
    ----------
    output_dir : path-like
        Created if missing.
    stem : str, default="embeddings"
        Base name of the output (``<stem>.npz``, ``<stem>.ark``, ...): a non-empty file name without ``/``
        that does not start with ``.`` (hidden names are the temporaries' namespace).
    fsync : bool, default=True
        Flush outputs to disk at commit (see :class:`spk_toolkit.io.atomic.AtomicPath`).

    Attributes
    ----------
    output_dir : Path
    stem : str
    n_written : int
        Arrays written so far.
    path : Path
        The main output path (what :func:`open_reader` takes).

    Raises
    ------
    ValueError
        Invalid ``stem``.
    """

    name: str = ""
    #: True when the main output is a directory (npy_dir): ``--overwrite`` removes it as a tree.
    makes_directory: bool = False

    def __init__(self, output_dir: str | os.PathLike, stem: str = "embeddings", *, fsync: bool = True):
        if not isinstance(stem, str) or not stem or "/" in stem or os.sep in stem or stem.startswith(".") \
                or any(c.isspace() or c == "\0" for c in stem):
            raise ValueError(f"stem must be a plain file name (no '/', no leading '.', no whitespace), got {stem!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self.fsync = fsync
        self.n_written = 0
        self._keys: set = set()
        self._state = "open"

    @classmethod
    def check_options(cls, **options) -> None:
        """Check writer options before any work (``ExtractOptions.writer_options``); default: the constructor
        takes them as keyword options.

        Raises
        ------
        ValueError
            An option the constructor does not take (the accepted ones listed), or an invalid value.
        """
        import inspect

        params = inspect.signature(cls.__init__).parameters
        accepted = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "fsync"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"unknown {cls.name} writer option(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(accepted) or 'none'}")

    @classmethod
    @abc.abstractmethod
    def output_path(cls, output_dir: str | os.PathLike, stem: str = "embeddings") -> Path:
        """The main output path a writer of this format makes for ``stem`` in ``output_dir`` (what
        :func:`open_reader` takes), without creating a writer."""

    @classmethod
    def output_paths(cls, output_dir: str | os.PathLike, stem: str = "embeddings") -> Tuple[Path, ...]:
        """Every final path of this format for ``stem`` (e.g. the ``.ark`` and the ``.scp``), main path last;
        default ``(output_path,)``. For cleaning a previous run's outputs without creating a writer."""
        return (cls.output_path(output_dir, stem),)

    @classmethod
    def owned_paths(cls, output_dir: str | os.PathLike, stem: str = "embeddings") -> Tuple[Path, ...]:
        """Every path a writer of this format may leave for ``stem``: :meth:`output_paths` plus the commit-group
        lock of a multi-file format (:func:`spk_toolkit.io.atomic.group_lock_path`). What ``--overwrite`` removes
        (:meth:`spk_toolkit.io.rundir.RunDir.remove`)."""
        paths = cls.output_paths(output_dir, stem)
        return paths + ((group_lock_path(paths[0]),) if len(paths) > 1 else ())

    @property
    def path(self) -> Path:
        """The main output path (final name; exists only after :meth:`close`)."""
        return type(self).output_path(self.output_dir, self.stem)

    @property
    def paths(self) -> Tuple[Path, ...]:
        """Every final path this writer produces (:meth:`output_paths`)."""
        return type(self).output_paths(self.output_dir, self.stem)

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort`."""
        return self._state != "open"

    def write(self, key: str, array) -> None:
        """Store ``array`` under ``key``, exactly as given (dtype, shape and values; no cast, no padding).

        Parameters
        ----------
        key : str
            Kaldi utterance id (see :func:`check_key`), unique within this writer.
        array : array-like
            Anything ``np.asarray`` turns into a numeric or bool array of any shape, e.g. (D,) float32,
            (T, F) float16, (T,) int32.

        Raises
        ------
        ValueError
            Writer closed or aborted; invalid key (the message names it); duplicate key (named). The writer
            stays usable after these.
        TypeError
            Non-str key, or a dtype that cannot be stored (object, string, structured, datetime).
        OSError
            Writing failed (disk full, ...): the writer is aborted, its temporaries removed.
        """
        if self._state != "open":
            raise ValueError(f"write to a {self._state} {type(self).__name__} ({self.path})")
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}: already written to {self.path}")
        arr = _as_storable(array, key)
        self._check(key, arr)
        try:
            self._write(key, arr)
        except BaseException:
            self.abort()
            raise
        self._keys.add(key)
        self.n_written += 1

    def close(self) -> None:
        """Commit: the output appears under its final name(s), atomically. Later calls do nothing.

        Raises
        ------
        ValueError
            The writer was aborted.
        OSError
            Committing failed (the writer is then aborted: nothing under the final name changed, except that
            a ``kaldi_ark`` commit may have removed the old ``.scp`` first).
        """
        if self._state == "committed":
            return
        if self._state == "aborted":
            raise ValueError(f"close after abort of {type(self).__name__} ({self.path})")
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"

    def abort(self) -> None:
        """Discard everything written: temporaries removed, final paths untouched. Idempotent; does nothing
        after a successful :meth:`close`. Never raises for cleanup failures."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._abort()
        except Exception:  # best effort: the temporaries' names are recognisable (atomic.is_temporary)
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.path)!r}, n_written={self.n_written}, state={self._state!r})"

    # subclass hooks
    def _check(self, key: str, arr: np.ndarray) -> None:
        """Format-specific validation before anything is written (raise ValueError/TypeError)."""

    @abc.abstractmethod
    def _write(self, key: str, arr: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _abort(self) -> None: ...


class Reader(Mapping):
    """Base of every storage reader: a lazy, read-only ``Mapping[str, np.ndarray]`` over one output.

    ``reader[key]`` reads one array (dtype and shape as written); iteration yields keys in written order;
    ``len`` and ``in`` do not read arrays. File handles are opened on first use and reopened in a new process
    (``os.getpid()`` check), so a reader created before a fork (DataLoader workers, multiprocessing) works in
    the children; readers pickle without their handles (spawn workers). Also a context manager.

    Subclasses define ``suffixes`` (file suffixes they read, lower case), ``__init__`` (index the keys),
    ``__getitem__``, ``__iter__``, ``__len__`` and, when they keep a handle, ``_open``.

    Parameters
    ----------
    path : path-like
        The output (a file, or a directory for ``npy_dir``).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    """

    name: str = ""
    suffixes: Tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.name or type(self).__name__} output not found: {self.path}")
        self._h = None
        self._pid: Optional[int] = None

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """True if ``path`` itself looks like this format's output (by suffix; directories by content)."""
        return path.is_file() and path.suffix.lower() in cls.suffixes

    @classmethod
    def find(cls, directory: Path, stem: str = "embeddings") -> Optional[Path]:
        """This format's main output named ``stem`` inside ``directory``, or None."""
        for suf in cls.suffixes:
            p = directory / f"{stem}{suf}"
            if p.is_file():
                return p
        return None

    def _open(self):
        """Open and return the handle (subclasses that keep one)."""
        raise NotImplementedError

    def _handle(self):
        pid = os.getpid()
        if self._h is None or self._pid != pid:
            if self._h is not None:
                # inherited across fork: never close the parent's handle from the child (HDF5 is not fork-safe)
                _FORKED_HANDLES.append(self._h)
            self._h = self._open()
            self._pid = pid
        return self._h

    def close(self) -> None:
        """Close the handle (reopened on the next access)."""
        h, self._h = self._h, None
        if h is not None and self._pid == os.getpid():
            h.close()

    def read(self, key: str, start_frame: int = 0, end_frame: Optional[int] = None) -> np.ndarray:
        """Frames ``start_frame:end_frame`` (first axis) of ``key``'s array: a partial read.

        ``hdf5`` reads only the chunks that hold the frames (h5py slicing), ``npy_dir`` memory-maps the file
        (``np.load(mmap_mode="r")``) and copies the frames; ``npz`` and ``kaldi_ark`` load the array and slice it.

        Parameters
        ----------
        key : str
        start_frame : int, default=0
            First frame, ``0 <= start_frame <= end_frame``.
        end_frame : int, optional
            One past the last frame, ``<= num_frames(key)`` (default: the end).

        Returns
        -------
        np.ndarray of shape (end_frame - start_frame, *rest)
            The requested frames only, dtype as written (a copy, not a view of a larger array).

        Raises
        ------
        KeyError
            Unknown key.
        ValueError
            A 0-d array (no frames), or a range outside ``[0, num_frames]`` (the key, the range and the number
            of frames named).
        TypeError
            Non-integer frame indices.
        """
        arr = self[key]
        s, e = _frame_range(key, arr.shape, start_frame, end_frame)
        return arr[s:e].copy() if (s, e) != (0, arr.shape[0]) else arr

    def num_frames(self, key: str) -> int:
        """First-axis length of ``key``'s array (frames of a ``(T, F)`` sequence), read from the header where
        the format allows (``hdf5``, ``npy_dir``), else by loading the array.

        Raises
        ------
        KeyError
            Unknown key.
        ValueError
            A 0-d array.
        """
        return _frame_range(key, self[key].shape, 0, None)[1]

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h"], state["_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.path)!r})"


_FORKED_HANDLES: list = []


def _frame_range(key: str, shape: tuple, start, end) -> Tuple[int, int]:
    """Validated ``(start, end)`` frame range of an array of ``shape`` (see :meth:`Reader.read`)."""
    if not shape:
        raise ValueError(f"key {key!r}: a 0-d array has no frames to slice")
    n = int(shape[0])
    for name, v in (("start_frame", start), ("end_frame", end)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    s = int(start)
    e = n if end is None else int(end)
    if not 0 <= s <= e <= n:
        raise ValueError(f"key {key!r}: frames [{s}, {e}) outside the array's {n} frames "
                         "(0 <= start_frame <= end_frame <= num_frames)")
    return s, e


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


def _pickled(e: BaseException) -> bool:
    """numpy's refusal of pickled data (its message suggests loading unsafely: never repeated to the user)."""
    text = str(e)
    return "allow_pickle" in text or "pickled data" in text or "Object arrays cannot be loaded" in text


def _safe_reason(e: BaseException) -> str:
    """An exception as a short reason, without advice to load pickled data."""
    if _pickled(e):
        return "holds pickled Python objects (refused: only plain arrays are read)"
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text
