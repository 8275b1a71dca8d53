"""Backward-compatible names for the storage writers; the registry lives in :mod:`spk_toolkit.io.storage`.

``WRITERS`` is the registry's own dict (name -> Writer class), ``EmbeddingWriter`` the Writer base class,
``get_writer`` / ``parse_formats`` / ``FORMAT_ALIASES`` the registry's functions. New code imports
:mod:`spk_toolkit.io.storage` directly.
"""
from __future__ import annotations

from typing import Type

from spk_toolkit.io.storage import (  # noqa: F401  (re-exports)
    FORMAT_ALIASES,
    WRITERS,
    Hdf5Writer,
    KaldiArkWriter,
    NpyDirWriter,
    NpzWriter,
    Writer,
    get_writer,
    parse_formats,
    register_storage,
)

#: The Writer base class under its former name.
EmbeddingWriter = Writer

__all__ = ["EmbeddingWriter", "FORMAT_ALIASES", "WRITERS", "get_writer", "parse_formats", "register_writer",
           "Hdf5Writer", "KaldiArkWriter", "NpyDirWriter", "NpzWriter"]


def register_writer(cls: Type[Writer]) -> Type[Writer]:
    """Class decorator registering a write-only format under ``cls.name`` (no reader); returns ``cls``.

    Prefer :func:`spk_toolkit.io.storage.register_storage`, which registers the Writer with its Reader.

    Raises
    ------
    ValueError
        Empty or already-registered name.
    TypeError
        ``cls`` is not a :class:`~spk_toolkit.io.storage.Writer` subclass.
    """
    register_storage(cls.name, cls, None)
    return cls
