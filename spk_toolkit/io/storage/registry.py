"""The storage registry: names and aliases, plug-in formats (entry points of ``spk_toolkit.storage``), and
:func:`open_reader`, which picks the format of a file or a run directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type


from spk_toolkit.io.rundir import RunDir
from spk_toolkit.io.storage.base import Reader, Writer, _pickled, _safe_reason


#: name -> Writer class, in registration order (the same dict object as ``spk_toolkit.io.writers.WRITERS``).
WRITERS: Dict[str, Type["Writer"]] = {}


#: name -> Reader class (formats registered without a reader are absent).
READERS: Dict[str, Type["Reader"]] = {}


#: CLI spellings accepted besides the registry names.
FORMAT_ALIASES = {"ark": "kaldi_ark", "scp": "kaldi_ark", "h5": "hdf5", "hdf": "hdf5", "npy": "npy_dir"}


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
        Unknown format name (the message lists the registered names), or no name at all (``""``, ``","``: a run
        that would store nothing).
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for s in items:
        if str(s).strip():
            name = get_writer(str(s)).name
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"no output format in {spec!r}: name at least one of {', '.join(sorted(WRITERS))}")
    return out


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
