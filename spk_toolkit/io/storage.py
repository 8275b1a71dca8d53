"""Storage registry: Writer/Reader pairs under one name (``npz``, ``kaldi_ark``, ``hdf5``, ``npy_dir``).

A writer stores ``key -> array`` pairs as given: any shape ((D,) vectors, (T,) or (T, F) sequences, ...) and any
numeric or bool dtype (float16/32/64, int8..64, uint, complex, bool), no cast and no padding. Writes stream:
memory stays bounded by one array plus the set of keys seen (for the duplicate check), at any corpus size.
``close()`` commits through :mod:`spk_toolkit.io.atomic` (per-process temporary name, fsync, ``os.replace``),
so a crash or an exception never leaves a partial output under the final name. The reader of the same name is
a lazy ``Mapping[str, np.ndarray]``: keyed random access without loading everything, iteration in written order,
and partial reads of ``(T, ...)`` arrays, ``reader.read(key, start_frame, end_frame)`` (hdf5: only the chunks
holding those frames; npy_dir: a memory map; npz, kaldi_ark: load, then slice).

Keys are Kaldi utterance ids: any non-empty string without whitespace (``str.isspace``) and without NUL. That
includes ``/`` anywhere (``/x``, ``x/``, ``x//y``), ``.``, ``..``, non-ASCII, and the storage libraries' own
keyword names (``file``, ``allow_pickle``, ``name``, ``data``, ...); every such key round-trips exactly.

=========== ====================================================== ==========================================
name        on disk (``output_dir``)                               readable by
=========== ====================================================== ==========================================
npz         ``<stem>.npz``: a zip (ZIP_DEFLATED, or STORED with     ``np.load(path, allow_pickle=False)[key]``,
            ``compress=False``) with one ``.npy`` member per key,    ESPnet scoring scripts
            in written order; member name = the key, plus
            ``.npy`` when the key ends with ``.npy`` or ``/``
kaldi_ark   ``<stem>.ark`` + ``<stem>.scp`` (``key abs/ark:offset``) ``kaldiio.load_scp``, ESPnet ``spembs``,
            float32/float64 vectors and matrices as Kaldi binary      WeSpeaker, 3D-Speaker; Kaldi binaries for
            ``FV``/``DV``/``FM``/``DM``; any other dtype or rank as   the Kaldi-binary entries only
            kaldiio's numpy-in-ark (``write_function="numpy"``)
hdf5        ``<stem>.h5``: one dataset per key at the root, named     h5py (``f[hdf5_dataset_name(key)]``)
            by the percent-encoded key (:func:`hdf5_dataset_name`),
            link creation order tracked; root attribute
            ``spk_toolkit_storage = "hdf5"``; arrays of at least
            ``min_compress_size`` elements chunked by rows and
            compressed (gzip by default, lzf, or none)
npy_dir     ``<stem>/``: ``index.txt`` (``key file_name`` lines,     ``np.load`` per file
            written order) + one ``.npy`` per key, file name =
            :func:`npy_file_name` (URL-quoted key)
=========== ====================================================== ==========================================

Example::

    from spk_toolkit.io.storage import get_writer, open_reader

    with get_writer("hdf5")("exp/feats", "fbank", compression="lzf") as w:
        for utt_id, feats in items:          # feats: (T, 80) float16
            w.write(utt_id, feats)
    with open_reader("exp/feats/fbank.h5") as r:
        x = r["spk1/utt1"]                   # (T, 80) float16, read on demand
"""
from __future__ import annotations

import abc
import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Type
from urllib.parse import quote, unquote

import numpy as np

from spk_toolkit.io.atomic import AtomicPath, commit_together, group_lock_path
from spk_toolkit.io.rundir import RunDir

__all__ = [
    "FORMAT_ALIASES", "READERS", "WRITERS", "Hdf5Reader", "Hdf5Writer", "KaldiArkReader", "KaldiArkWriter",
    "NpyDirReader", "NpyDirWriter", "NpzReader", "NpzWriter", "Reader", "Writer", "check_key", "get_reader",
    "get_writer", "hdf5_dataset_name", "npy_file_name", "npz_member_name", "open_reader", "parse_formats",
    "register_storage", "storage_names", "load_plugins",
]

#: name -> Writer class, in registration order (the same dict object as ``spk_toolkit.io.writers.WRITERS``).
WRITERS: Dict[str, Type["Writer"]] = {}
#: name -> Reader class (formats registered without a reader are absent).
READERS: Dict[str, Type["Reader"]] = {}
#: CLI spellings accepted besides the registry names.
FORMAT_ALIASES = {"ark": "kaldi_ark", "scp": "kaldi_ark", "h5": "hdf5", "hdf": "hdf5", "npy": "npy_dir"}

_STORABLE_KINDS = "biufc"  # bool, signed/unsigned int, float, complex


# ----------------------------------------------------------------------------------------------- keys, arrays
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


# ------------------------------------------------------------------------------------------------- registry
def register_storage(name: str, writer_cls: Type["Writer"], reader_cls: Optional[Type["Reader"]]) -> None:
    """Register a Writer/Reader pair under ``name`` (sets ``cls.name`` where the class left it empty).

    Parameters
    ----------
    name : str
        Registry name (recorded in ``summary.json`` ``output_formats``).
    writer_cls : subclass of Writer
    reader_cls : subclass of Reader or None
        None registers a write-only format (:func:`get_reader` then raises).

    Raises
    ------
    ValueError
        Empty name, name already registered (or an alias), or a class whose ``name`` differs from ``name``.
    TypeError
        The classes are not Writer / Reader subclasses.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"storage name must be a non-empty str, got {name!r}")
    if name in WRITERS or name in FORMAT_ALIASES:
        raise ValueError(f"storage name {name!r} is already registered")
    if not (isinstance(writer_cls, type) and issubclass(writer_cls, Writer)):
        raise TypeError(f"writer_cls must be a Writer subclass, got {writer_cls!r}")
    if reader_cls is not None and not (isinstance(reader_cls, type) and issubclass(reader_cls, Reader)):
        raise TypeError(f"reader_cls must be a Reader subclass or None, got {reader_cls!r}")
    for cls in (writer_cls, reader_cls):
        if cls is not None and cls.name and cls.name != name:
            raise ValueError(f"{cls.__name__}.name is {cls.name!r}, registered as {name!r}")
    for cls in (writer_cls, reader_cls):
        if cls is not None:
            cls.name = name
    WRITERS[name] = writer_cls
    if reader_cls is not None:
        READERS[name] = reader_cls


def load_plugins() -> None:
    """Import the storage formats declared as entry points of ``spk_toolkit.storage`` (:mod:`spk_toolkit.plugins`;
    once per process). Every lookup by name that misses, :func:`storage_names` and :func:`open_reader` call it."""
    from spk_toolkit.plugins import GROUPS, load_entry_points

    load_entry_points(GROUPS["storage"])


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"storage name must be str, got {name!r}")
    name = name.strip()
    name = FORMAT_ALIASES.get(name, name)
    if name not in WRITERS:
        load_plugins()
    return name


def get_writer(name: str) -> Type["Writer"]:
    """The Writer class registered under ``name`` (aliases such as ``ark``, ``h5``, ``npy`` accepted).

    Raises
    ------
    ValueError
        Unknown name; the message lists the registered names.
    """
    n = _resolve(name)
    if n not in WRITERS:
        raise ValueError(f"unknown output format {name!r}; registered: {', '.join(sorted(WRITERS))}")
    return WRITERS[n]


def get_reader(name: str) -> Type["Reader"]:
    """The Reader class registered under ``name`` (aliases accepted).

    Raises
    ------
    ValueError
        Unknown name, or a format registered without a reader; the message lists the readable names.
    """
    n = _resolve(name)
    if n not in READERS:
        raise ValueError(f"no reader for format {name!r}; readable: {', '.join(sorted(READERS))}")
    return READERS[n]


def storage_names() -> List[str]:
    """Registered format names, built-in and plug-in, sorted (for ``--output_format`` choices and help)."""
    load_plugins()
    return sorted(WRITERS)


def parse_formats(spec: str | list) -> List[str]:
    """Turn ``"npz,ark"`` (or a list) into registry names: aliases resolved, validated, duplicates dropped.

    Parameters
    ----------
    spec : str or list of str
        Comma-separated names or a list of names; blank items are ignored.

    Returns
    -------
    list of str
        Registry names in the order given.

    Raises
    ------
    ValueError
        Unknown format name (the message lists the registered names).
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for s in items:
        if str(s).strip():
            name = get_writer(str(s)).name
            if name not in out:
                out.append(name)
    return out


# ---------------------------------------------------------------------------------------------------- Writer
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


# ---------------------------------------------------------------------------------------------------- Reader
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


# ------------------------------------------------------------------------------------------------------- npz
class NpzWriter(Writer):
    """``<stem>.npz`` streamed member by member (``numpy.lib.format.write_array`` into ``zipfile``).

    What ``np.savez`` does internally, one array at a time, so memory stays bounded; member names follow
    :func:`npz_member_name` (readable with ``np.load(path, allow_pickle=False)[key]``).

    Parameters
    ----------
    output_dir, stem, fsync
        See :class:`Writer`.
    compress : bool, default=True
        ZIP_DEFLATED (as ``np.savez_compressed``); False: ZIP_STORED (as ``np.savez``).
    compresslevel : int, optional
        zlib level 0-9 (default: zlib's).
    """

    def __init__(self, output_dir, stem: str = "embeddings", *, compress: bool = True,
                 compresslevel: Optional[int] = None, fsync: bool = True):
        super().__init__(output_dir, stem, fsync=fsync)
        self._atomic = AtomicPath(self.path, fsync=fsync)
        self._fh = open(self._atomic.tmp, "xb")
        try:
            self._zip = zipfile.ZipFile(self._fh, "w", compression=zipfile.ZIP_DEFLATED if compress
                                        else zipfile.ZIP_STORED, compresslevel=compresslevel, allowZip64=True)
        except BaseException:
            self._fh.close()
            self._atomic.abort()
            raise

    @classmethod
    def output_path(cls, output_dir, stem="embeddings") -> Path:
        return Path(output_dir) / f"{stem}.npz"

    def _write(self, key, arr):
        with self._zip.open(npz_member_name(key), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, arr, allow_pickle=False)

    def _commit(self):
        self._zip.close()
        self._fh.close()
        self._atomic.commit()

    def _abort(self):
        try:
            self._zip.close()
        finally:
            self._fh.close()
            self._atomic.abort()


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


class NpzReader(Reader):
    """Any ``.npz`` (ours, ``np.savez``, ESPnet's): ``np.load(path, allow_pickle=False)``, read per key.

    Keys are the member names less one ``.npy`` suffix; lookups go by member name, so every key of our
    writer reads back exactly (see :func:`npz_member_name`).

    Raises
    ------
    FileNotFoundError
        Missing file.
    ValueError
        Not a zip, or two members naming the same key (``x`` and ``x.npy``); at access: a member that is not
        a ``.npy`` array, or holds pickled objects.
    """

    suffixes = (".npz",)

    def __init__(self, path):
        super().__init__(path)
        self._members: Dict[str, str] = {}
        for m in self._handle().zip.namelist():
            k = m[:-4] if m.endswith(".npy") else m
            if k in self._members:
                raise ValueError(f"{self.path}: members {self._members[k]!r} and {m!r} both name key {k!r}")
            self._members[k] = m

    def _open(self):
        with open(self.path, "rb") as f:
            magic = f.read(6)
        if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first local header, or an empty zip
            what = ("a single .npy array" if magic == b"\x93NUMPY" else "an empty file" if not magic
                    else "not a zip archive")
            raise ValueError(f"{self.path}: not an npz archive ({what})")
        try:
            with zipfile.ZipFile(self.path):  # the central directory (a truncated file has none); closed on error
                pass
            z = np.load(self.path, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise ValueError(f"{self.path}: truncated or corrupt npz archive ({_safe_reason(e)})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"{self.path}: not an npz archive (a single .npy array?)")
        return z

    def __getitem__(self, key: str) -> np.ndarray:
        m = self._members[key]
        try:
            v = self._handle()[m]
        except KeyError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
            if _pickled(e):
                raise ValueError(f"{self.path}: member {m!r} holds pickled Python objects, not a numeric array "
                                 "(refused: only plain arrays are read)") from None
            raise ValueError(f"{self.path}: member {m!r} is truncated or corrupt ({_safe_reason(e)})") from None
        if not isinstance(v, np.ndarray):
            raise ValueError(f"{self.path}: member {m!r} is not a .npy array")
        return v

    def __contains__(self, key) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)


# ------------------------------------------------------------------------------------------------- kaldi_ark
def _kaldi_native(arr: np.ndarray) -> bool:
    return arr.dtype.str in ("<f4", "<f8") and arr.ndim in (1, 2)


class KaldiArkWriter(Writer):
    """``<stem>.ark`` + ``<stem>.scp`` via kaldiio; the scp names the *final* ark by absolute path.

    float32/float64 vectors and matrices are Kaldi binary (``FV``/``DV``/``FM``/``DM``: readable by Kaldi,
    WeSpeaker, 3D-Speaker, ESPnet). Every other dtype (float16, ints, bool, big-endian) and rank (0-D, 3-D+)
    is kaldiio's numpy-in-ark (``NPY`` + length + ``.npy`` bytes, ``write_function="numpy"``):
    ``kaldiio.load_scp`` reads it back with the same dtype and shape; Kaldi's own binaries cannot.

    The ark is written under a temporary name and the scp streamed next to it; at commit, under a lock, the
    old scp is removed, then the ark and the scp are renamed into place (ark first), so an scp never points
    into an ark of another writer.

    Raises
    ------
    ValueError
        The absolute ark path cannot appear in an scp line that kaldiio parses back (contains a newline or
        ``[``, starts or ends with ``|`` or whitespace).
    """

    def __init__(self, output_dir, stem: str = "embeddings", *, fsync: bool = True):
        super().__init__(output_dir, stem, fsync=fsync)
        import kaldiio  # noqa: F401  (fail early when missing)

        self._ark_ref = os.path.abspath(self.ark_path)
        r = self._ark_ref
        if "\n" in r or "[" in r or r.strip() != r or r.startswith("|") or r.endswith("|"):
            raise ValueError(f"ark path {r!r} cannot be written to an scp that kaldiio reads back")
        self._ark = AtomicPath(self.ark_path, fsync=fsync)
        self._scp = AtomicPath(self.path, fsync=fsync)
        self._ark_fh = open(self._ark.tmp, "xb")
        self._scp_fh = open(self._scp.tmp, "x", encoding="utf-8", newline="\n")

    @property
    def ark_path(self) -> Path:
        """The final ``.ark``."""
        return self.output_dir / f"{self.stem}.ark"

    @classmethod
    def output_path(cls, output_dir, stem="embeddings") -> Path:
        return Path(output_dir) / f"{stem}.scp"

    @classmethod
    def output_paths(cls, output_dir, stem="embeddings") -> Tuple[Path, ...]:
        return (Path(output_dir) / f"{stem}.ark", cls.output_path(output_dir, stem))

    def _write(self, key, arr):
        import kaldiio

        start = self._ark_fh.tell()
        kaldiio.save_ark(self._ark_fh, {key: arr}, write_function=None if _kaldi_native(arr) else "numpy")
        self._scp_fh.write(f"{key} {self._ark_ref}:{start + len(key.encode('utf-8')) + 1}\n")

    def _commit(self):
        self._ark_fh.close()
        self._scp_fh.close()
        commit_together([self._ark, self._scp], remove_first=[self.path])

    def _abort(self):
        try:
            self._ark_fh.close()
            self._scp_fh.close()
        finally:
            self._ark.abort()
            self._scp.abort()


def resolve_scp_entry(value: str, scp_dir: Path, cache: Optional[Dict[str, str]] = None) -> str:
    """An scp value (``ark:offset``, ``ark:offset[slices]``, ``ark``, ``cmd |``) with a relative ark path resolved.

    The ark is looked for relative to ``scp_dir``, then each parent of ``scp_dir`` (absolute), and the first
    existing file wins; a pipe, an absolute path, or a relative path found nowhere is returned unchanged (then
    resolved against the working directory when read, Kaldi's rule, and reported missing there).

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
    if not v or v.endswith("|") or v.startswith("|"):
        return value
    ark, offset = v, ""
    m = re.match(r"^(.*?):(\d+(\[[^\]]*\])*)$", v)
    if m:
        ark, offset = m.group(1), ":" + m.group(2)
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


class KaldiArkReader(Reader):
    """Kaldi ``.scp`` (``kaldiio.load_scp``, lazy, file opened per access) or a bare ``.ark`` (indexed by
    one sequential scan that keeps offsets, not arrays). Arrays come back as kaldiio reads them (Kaldi float
    matrices/vectors, int32 vectors, compressed matrices as float32, numpy-in-ark with its own dtype), made
    writable. A relative ark path inside an scp resolves against the scp's own directory, then each of its
    parents (an ESPnet dump written from the recipe directory names ``dump/xvector/<dset>/xvector.ark``, which
    exists under the recipe directory, a parent of the scp's), then the working directory (Kaldi's rule, kept as
    the last resort): :func:`resolve_scp_entry`.

    Raises
    ------
    FileNotFoundError
        Missing file.
    ValueError
        A malformed scp line, or a bare ark holding a key twice.
    """

    suffixes = (".scp", ".ark")

    def __init__(self, path):
        super().__init__(path)
        import kaldiio

        self._offsets: Optional[Dict[str, int]] = None
        self._scp = None
        if self.path.suffix.lower() == ".ark":
            self._offsets = {}
            with open(self.path, "rb") as fd:
                while True:
                    key = kaldiio.matio.read_token(fd)
                    if key is None:
                        break
                    if key in self._offsets:
                        raise ValueError(f"{self.path}: key {key!r} appears twice")
                    self._offsets[key] = fd.tell()
                    kaldiio.matio.read_kaldi(fd)
        else:
            self._scp = kaldiio.load_scp(str(self.path))
            found: Dict[str, str] = {}
            d = self._scp._dict  # key -> "ark:offset[slices]" (kaldiio's LazyLoader)
            for key, value in d.items():
                d[key] = resolve_scp_entry(value, self.path.parent, found)

    @classmethod
    def find(cls, directory, stem="embeddings"):
        p = directory / f"{stem}.scp"  # the scp, not the ark: it is the committed index
        return p if p.is_file() else None

    def __getitem__(self, key: str) -> np.ndarray:
        if self._scp is not None:
            return _writable(np.asarray(self._scp[key]))
        import kaldiio

        off = self._offsets[key]
        with open(self.path, "rb") as fd:
            fd.seek(off)
            return _writable(np.asarray(kaldiio.matio.read_kaldi(fd)))

    def __contains__(self, key) -> bool:
        return key in (self._scp if self._scp is not None else self._offsets)

    def __iter__(self) -> Iterator[str]:
        return iter(self._scp if self._scp is not None else self._offsets)

    def __len__(self) -> int:
        return len(self._scp if self._scp is not None else self._offsets)


# ------------------------------------------------------------------------------------------------------ hdf5
_HDF5_COMPRESSIONS = ("gzip", "lzf")
_CHUNK_BYTES = 1 << 18  # ~256 KiB chunks of whole rows


def _chunks(shape: tuple, itemsize: int) -> tuple:
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    rows = max(1, min(shape[0], _CHUNK_BYTES // max(1, row)))
    return (rows,) + tuple(shape[1:])


class Hdf5Writer(Writer):
    """``<stem>.h5`` via h5py: one root dataset per key named :func:`hdf5_dataset_name` (no groups), link
    creation order tracked (iteration in written order), root attributes ``spk_toolkit_storage="hdf5"``,
    ``layout_version=1``, ``key_encoding``.

    Parameters
    ----------
    output_dir, stem, fsync
        See :class:`Writer`.
    compression : {"gzip", "lzf", None, "none"}, default="gzip"
        Filter for arrays of at least ``min_compress_size`` elements.
    compression_opts : int, optional
        gzip level (0-9; h5py's default 4).
    shuffle : bool, default=True
        Byte-shuffle filter before compression (helps float data).
    min_compress_size : int, default=4096
        Arrays with fewer elements (e.g. (D,) embeddings) are stored contiguous and uncompressed: for them
        chunk indexes cost more than compression saves. Larger ones ((T, F) features) are chunked by whole
        rows (~256 KiB per chunk), compressed or not.

    Raises
    ------
    ValueError
        Unknown compression.
    """

    def __init__(self, output_dir, stem: str = "embeddings", *, compression: Optional[str] = "gzip",
                 compression_opts: Optional[int] = None, shuffle: bool = True, min_compress_size: int = 4096,
                 fsync: bool = True):
        if compression == "none":
            compression = None
        type(self)._check_compression(compression, compression_opts)
        super().__init__(output_dir, stem, fsync=fsync)
        import h5py

        self.compression, self.compression_opts, self.shuffle = compression, compression_opts, bool(shuffle)
        self.min_compress_size = int(min_compress_size)
        self._atomic = AtomicPath(self.path, fsync=fsync)
        try:
            self._f = h5py.File(self._atomic.tmp, "w-", track_order=True)
            self._f.attrs["spk_toolkit_storage"] = "hdf5"
            self._f.attrs["layout_version"] = 1
            self._f.attrs["key_encoding"] = "dataset name = urllib.parse.quote(key, safe='') with '.' as %2E"
        except BaseException:
            self._atomic.abort()
            raise

    @staticmethod
    def _check_compression(compression, compression_opts) -> None:
        if compression is not None and compression not in _HDF5_COMPRESSIONS:
            raise ValueError(f"compression must be one of gzip, lzf, none; got {compression!r}")
        if compression_opts is not None and (compression != "gzip" or isinstance(compression_opts, bool)
                                             or not isinstance(compression_opts, int)
                                             or not 0 <= compression_opts <= 9):
            raise ValueError(f"compression_opts is a gzip level 0-9 (with compression='gzip'), got "
                             f"{compression_opts!r}")

    @classmethod
    def check_options(cls, **options) -> None:
        """The base check plus the values of ``compression`` / ``compression_opts`` (see :class:`Hdf5Writer`)."""
        super().check_options(**options)
        comp = options.get("compression", "gzip")
        cls._check_compression(None if comp == "none" else comp, options.get("compression_opts"))

    @classmethod
    def output_path(cls, output_dir, stem="embeddings") -> Path:
        return Path(output_dir) / f"{stem}.h5"

    def _write(self, key, arr):
        kw = {}
        if arr.ndim >= 1 and arr.size >= max(1, self.min_compress_size):
            kw["chunks"] = _chunks(arr.shape, arr.dtype.itemsize)
            if self.compression:
                kw.update(compression=self.compression, shuffle=self.shuffle)
                if self.compression == "gzip" and self.compression_opts is not None:
                    kw["compression_opts"] = self.compression_opts
        self._f.create_dataset(hdf5_dataset_name(key), data=arr, **kw)

    def _commit(self):
        self._f.close()
        self._atomic.commit()

    def _abort(self):
        try:
            self._f.close()
        finally:
            self._atomic.abort()


class Hdf5Reader(Reader):
    """``.h5`` written by :class:`Hdf5Writer` (keys decoded from dataset names, creation order), or any other
    HDF5 file (legacy layout: every dataset, key = its path without the leading ``/``, h5py visit order).
    The h5py handle is per process (reopened after fork).

    Raises
    ------
    FileNotFoundError
        Missing file.
    OSError
        Not an HDF5 file (from h5py).
    """

    suffixes = (".h5", ".hdf5", ".hdf")

    def __init__(self, path):
        super().__init__(path)
        f = self._handle()
        self._legacy: Optional[Dict[str, str]] = None
        if f.attrs.get("spk_toolkit_storage") != "hdf5":
            import h5py

            names: Dict[str, str] = {}
            f.visititems(lambda n, v: names.__setitem__(n, n) if isinstance(v, h5py.Dataset) else None)
            self._legacy = names

    def _open(self):
        import h5py

        return h5py.File(self.path, "r")

    def __getitem__(self, key: str) -> np.ndarray:
        if not isinstance(key, str):
            raise KeyError(key)
        name = self._legacy[key] if self._legacy is not None else hdf5_dataset_name(key)
        f = self._handle()
        if name not in f:
            raise KeyError(key)
        return np.asarray(f[name][()])

    def _dataset(self, key: str):
        if not isinstance(key, str):
            raise KeyError(key)
        name = self._legacy[key] if self._legacy is not None else hdf5_dataset_name(key)
        f = self._handle()
        if name not in f:
            raise KeyError(key)
        return f[name]

    def read(self, key: str, start_frame: int = 0, end_frame: Optional[int] = None) -> np.ndarray:
        """Frames ``start_frame:end_frame`` of ``key`` by h5py slicing: only the chunks holding them are read
        and decompressed (arrays are chunked by whole rows). See :meth:`Reader.read`."""
        ds = self._dataset(key)
        s, e = _frame_range(key, ds.shape, start_frame, end_frame)
        return np.asarray(ds[s:e])

    def num_frames(self, key: str) -> int:
        """First-axis length from the dataset's shape (no data read)."""
        return _frame_range(key, self._dataset(key).shape, 0, None)[1]

    def __contains__(self, key) -> bool:
        if not isinstance(key, str):
            return False
        if self._legacy is not None:
            return key in self._legacy
        return hdf5_dataset_name(key) in self._handle()

    def __iter__(self) -> Iterator[str]:
        if self._legacy is not None:
            return iter(self._legacy)
        return (unquote(n) for n in self._handle())

    def __len__(self) -> int:
        return len(self._legacy) if self._legacy is not None else len(self._handle())


# --------------------------------------------------------------------------------------------------- npy_dir
_NPY_INDEX = "index.txt"


class NpyDirWriter(Writer):
    """``<stem>/``: one ``.npy`` per key (:func:`npy_file_name`) plus ``index.txt`` (``key file_name`` per
    line, written order), built in a temporary directory renamed into place at commit (an existing
    ``<stem>/`` is moved aside first and removed after).

    Raises
    ------
    ValueError
        (at ``write``) Two keys map to one file on this file system (case-insensitive file systems:
        ``A`` vs ``a``).
    """

    makes_directory = True

    def __init__(self, output_dir, stem: str = "embeddings", *, fsync: bool = True):
        super().__init__(output_dir, stem, fsync=fsync)
        self._atomic = AtomicPath(self.path, fsync=fsync)
        os.mkdir(self._atomic.tmp)
        try:
            self._index = open(self._atomic.tmp / _NPY_INDEX, "x", encoding="utf-8", newline="\n")
        except BaseException:
            self._atomic.abort()
            raise

    @classmethod
    def output_path(cls, output_dir, stem="embeddings") -> Path:
        return Path(output_dir) / stem

    def _check(self, key, arr):
        if os.path.lexists(self._atomic.tmp / npy_file_name(key)):
            raise ValueError(f"key {key!r}: file {npy_file_name(key)!r} already exists (another key maps to it "
                             f"on this case-insensitive file system?)")

    def _write(self, key, arr):
        fname = npy_file_name(key)
        with open(self._atomic.tmp / fname, "xb") as f:
            np.lib.format.write_array(f, arr, allow_pickle=False)
        self._index.write(f"{key} {fname}\n")

    def _commit(self):
        self._index.close()
        self._atomic.commit()

    def _abort(self):
        try:
            self._index.close()
        finally:
            self._atomic.abort()


class NpyDirReader(Reader):
    """A directory of ``.npy`` files: with ``index.txt`` (ours: keys and order from it), else every
    ``*.npy`` in name order with key = ``unquote(file stem)`` (the earlier spk_toolkit layout). Each key is
    one ``np.load(file, allow_pickle=False)``.

    Raises
    ------
    FileNotFoundError
        Missing directory.
    ValueError
        Not a directory, a malformed or duplicate ``index.txt`` line (file and line named).
    """

    def __init__(self, path):
        super().__init__(path)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: npy_dir output must be a directory")
        self._files: Dict[str, str] = {}
        index = self.path / _NPY_INDEX
        if index.is_file():
            with open(index, encoding="utf-8", newline="\n") as f:
                for i, line in enumerate(f, 1):
                    parts = line.rstrip("\n").split(" ")
                    if len(parts) != 2 or not parts[0] or not parts[1]:
                        raise ValueError(f"{index}:{i}: expected 'key file_name', got {line!r}")
                    if parts[0] in self._files:
                        raise ValueError(f"{index}:{i}: duplicate key {parts[0]!r}")
                    self._files[parts[0]] = parts[1]
        else:
            for p in sorted(self.path.glob("*.npy")):
                self._files[unquote(p.name[:-4])] = p.name

    @classmethod
    def accepts(cls, path):
        return path.is_dir() and ((path / _NPY_INDEX).is_file() or next(path.glob("*.npy"), None) is not None)

    @classmethod
    def find(cls, directory, stem="embeddings"):
        p = directory / stem
        return p if cls.accepts(p) else None

    def __getitem__(self, key: str) -> np.ndarray:
        return np.load(self.path / self._files[key], allow_pickle=False)

    def read(self, key: str, start_frame: int = 0, end_frame: Optional[int] = None) -> np.ndarray:
        """Frames ``start_frame:end_frame`` of ``key`` through a memory map of its ``.npy`` (only those pages
        are read). See :meth:`Reader.read`."""
        m = np.load(self.path / self._files[key], mmap_mode="r", allow_pickle=False)
        try:
            s, e = _frame_range(key, m.shape, start_frame, end_frame)
            return np.array(m[s:e])
        finally:
            del m

    def num_frames(self, key: str) -> int:
        """First-axis length from the ``.npy`` header (no data read)."""
        m = np.load(self.path / self._files[key], mmap_mode="r", allow_pickle=False)
        return _frame_range(key, m.shape, 0, None)[1]

    def __contains__(self, key) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


register_storage("npz", NpzWriter, NpzReader)
register_storage("kaldi_ark", KaldiArkWriter, KaldiArkReader)
register_storage("hdf5", Hdf5Writer, Hdf5Reader)
register_storage("npy_dir", NpyDirWriter, NpyDirReader)


# ------------------------------------------------------------------------------------------------ open_reader
def _from_summary(directory: Path, only: Optional[str] = None) -> Optional[Tuple[str, Path]]:
    """(format, path) of the main output named by a run directory's summary (:meth:`RunDir.main_output`)."""
    return RunDir(directory).main_output(READERS, FORMAT_ALIASES, only=only)


def open_reader(path: str | os.PathLike, name: Optional[str] = None) -> Reader:
    """Open a Reader on ``path``, choosing the format through the registry (see :func:`_open_reader`).

    A file that is truncated, corrupt, of another format than its suffix says, or holds pickled objects is a
    ``ValueError`` naming the file and what is wrong (never a suggestion to load it unsafely).

    Parameters
    ----------
    path : path-like
    name : str, optional
        Registry name (or alias) to force.

    Returns
    -------
    Reader

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist, or ``summary.json`` names outputs that do not.
    ValueError
        Unknown ``name``, no registered format recognises ``path``, or the file cannot be read as its format
        (truncated, corrupt, pickled; the message names the file).
    """
    try:
        return _open_reader(path, name)
    except FileNotFoundError:
        raise
    except ValueError as e:
        if _pickled(e):
            raise ValueError(f"{os.fspath(path)}: {_safe_reason(e)}") from None
        raise
    except Exception as e:  # a foreign file's reader failing: h5py OSError, kaldiio struct errors, EOF, ...
        raise ValueError(f"{os.fspath(path)}: cannot read it ({_safe_reason(e)})") from None


def _open_reader(path: str | os.PathLike, name: Optional[str] = None) -> Reader:
    """Open a Reader on ``path``, choosing the format through the registry.

    Parameters
    ----------
    path : path-like
        An output file or directory (``.npz``, ``.scp`` / ``.ark``, ``.h5`` / ``.hdf5``, an ``npy_dir``
        directory), or an spk_toolkit output directory: its ``summary.json`` (``output_formats`` in order,
        ``outputs`` paths taken relative to the directory) names the main output; without one, the first
        registered format with an ``embeddings`` output there (``embeddings.npz``, ``embeddings.scp``,
        ``embeddings.h5``, ``embeddings/``), then the directory itself if it is an ``npy_dir``.
    name : str, optional
        Registry name (or alias) to force; with a run directory it selects that format's output.

    Returns
    -------
    Reader

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist, or ``summary.json`` names outputs that do not.
    ValueError
        Unknown ``name``, or no registered format recognises ``path`` (the message lists the suffixes).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"embeddings not found: {p}")
    load_plugins()
    if name is not None:
        cls = get_reader(name)
        if p.is_dir() and not cls.accepts(p):
            hit = _from_summary(p, only=cls.name)
            target = hit[1] if hit else cls.find(p)
            if target is None:
                raise FileNotFoundError(f"{p}: no {cls.name} output found")
            return cls(target)
        return cls(p)
    if p.is_dir():
        hit = _from_summary(p)
        if hit:
            return READERS[hit[0]](hit[1])
        for cls in READERS.values():
            target = cls.find(p)
            if target is not None:
                return cls(target)
        for cls in READERS.values():
            if cls.accepts(p):
                return cls(p)
        raise ValueError(f"{p}: directory holds no readable output (summary.json, embeddings.<"
                         f"{'|'.join(s[1:] for c in READERS.values() for s in c.suffixes)}>, embeddings/ or *.npy)")
    for cls in READERS.values():
        if cls.accepts(p):
            return cls(p)
    raise ValueError(f"{p}: unknown storage format (readable suffixes: "
                     f"{', '.join(s for c in READERS.values() for s in c.suffixes)}, or an npy_dir directory)")
