"""Embedding writers, registered by name (STYLE.md item 1).

Every writer is a context manager: ``write(key, vec)`` per utterance, ``close()`` makes the output appear
atomically (temporary name + ``os.replace``), so a crash never leaves a truncated file under the final name.

=========== ============================================= ==============================================
name        files in ``output_dir``                        readable by
=========== ============================================= ==============================================
npz         ``<stem>.npz`` (``np.savez_compressed``)        ESPnet scoring scripts, ``np.load``
kaldi_ark   ``<stem>.ark`` + ``<stem>.scp`` (kaldiio)       ESPnet TTS ``spembs``, WeSpeaker, 3D-Speaker
hdf5        ``<stem>.h5`` (h5py, one dataset per key)       h5py
npy_dir     ``<stem>/<quoted key>.npy``                     ``np.load``
=========== ============================================= ==============================================
"""
from __future__ import annotations

import abc
import os
import shutil
from pathlib import Path
from typing import Dict, Type
from urllib.parse import quote

import numpy as np

WRITERS: Dict[str, Type["EmbeddingWriter"]] = {}


def register_writer(cls):
    """Class decorator registering a writer under ``cls.name``.

    Raises
    ------
    ValueError
        Empty or already-registered name.
    """
    if not cls.name or cls.name in WRITERS:
        raise ValueError(f"writer name {cls.name!r} is empty or registered twice")
    WRITERS[cls.name] = cls
    return cls


def get_writer(name: str) -> Type["EmbeddingWriter"]:
    """Look up a writer class by name.

    Raises
    ------
    ValueError
        Unknown name; the message lists the registered names.
    """
    if name not in WRITERS:
        raise ValueError(f"unknown output format {name!r}; registered: {', '.join(sorted(WRITERS))}")
    return WRITERS[name]


class EmbeddingWriter(abc.ABC):
    """Writes ``key -> float32 vector (D,)`` pairs under ``output_dir/stem``.

    Subclasses define ``name``, :meth:`write` and :meth:`_commit`; :meth:`close` calls ``_commit`` once.
    Keys are written in the order given (ESPnet TTS needs ``text`` order).
    """

    name = ""

    def __init__(self, output_dir: str | os.PathLike, stem: str = "embeddings"):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self._closed = False

    @abc.abstractmethod
    def write(self, key: str, vec: np.ndarray) -> None:
        """Add one embedding ``(D,)`` (or ``(n_crops, D)``) under ``key``."""

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @property
    @abc.abstractmethod
    def path(self) -> Path:
        """The main output path (what :func:`spk_toolkit.io.readers.load_embeddings` takes)."""

    def close(self) -> None:
        """Make the output appear under its final name (atomic rename); later calls do nothing."""
        if not self._closed:
            self._closed = True
            self._commit()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # leave no half-written output under the final name


@register_writer
class NpzWriter(EmbeddingWriter):
    """``np.savez_compressed`` with keys = utterance ids (values float32)."""

    name = "npz"

    def __init__(self, output_dir, stem="embeddings"):
        super().__init__(output_dir, stem)
        self._data: Dict[str, np.ndarray] = {}

    @property
    def path(self) -> Path:
        return self.output_dir / f"{self.stem}.npz"

    def write(self, key, vec):
        self._data[key] = np.asarray(vec, dtype=np.float32)

    def _commit(self):
        tmp = self.output_dir / f".{self.stem}.tmp.npz"
        np.savez_compressed(tmp, **self._data)
        os.replace(tmp, self.path)


@register_writer
class KaldiArkWriter(EmbeddingWriter):
    """Kaldi float vectors via kaldiio: ``<stem>.ark`` + ``<stem>.scp`` (scp appears last, atomically)."""

    name = "kaldi_ark"

    def __init__(self, output_dir, stem="embeddings"):
        super().__init__(output_dir, stem)
        import kaldiio

        self._tmp_scp = self.output_dir / f".{self.stem}.tmp.scp"
        ark = self.output_dir / f"{self.stem}.ark"
        self._helper = kaldiio.WriteHelper(f"ark,scp:{ark},{self._tmp_scp}")

    @property
    def path(self) -> Path:
        return self.output_dir / f"{self.stem}.scp"

    def write(self, key, vec):
        if any(c.isspace() for c in key):
            raise ValueError(f"utterance id {key!r} contains whitespace; Kaldi ark keys cannot")
        self._helper(key, np.asarray(vec, dtype=np.float32))

    def _commit(self):
        self._helper.close()
        os.replace(self._tmp_scp, self.path)


@register_writer
class Hdf5Writer(EmbeddingWriter):
    """HDF5 via h5py: one float32 dataset per utterance id (``/`` in ids makes groups)."""

    name = "hdf5"

    def __init__(self, output_dir, stem="embeddings"):
        super().__init__(output_dir, stem)
        import h5py

        self._tmp = self.output_dir / f".{self.stem}.tmp.h5"
        self._f = h5py.File(self._tmp, "w")

    @property
    def path(self) -> Path:
        return self.output_dir / f"{self.stem}.h5"

    def write(self, key, vec):
        self._f.create_dataset(key, data=np.asarray(vec, dtype=np.float32))

    def _commit(self):
        self._f.close()
        os.replace(self._tmp, self.path)


@register_writer
class NpyDirWriter(EmbeddingWriter):
    """One ``.npy`` per utterance in ``<stem>/``, file name = URL-quoted utterance id (no collisions)."""

    name = "npy_dir"

    def __init__(self, output_dir, stem="embeddings"):
        super().__init__(output_dir, stem)
        self._tmp = self.output_dir / f".{self.stem}.tmp"
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()

    @property
    def path(self) -> Path:
        return self.output_dir / self.stem

    def write(self, key, vec):
        np.save(self._tmp / f"{quote(key, safe='')}.npy", np.asarray(vec, dtype=np.float32))

    def _commit(self):
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self._tmp, self.path)


#: CLI spellings accepted by ``--output_format`` besides the registry names.
FORMAT_ALIASES = {"ark": "kaldi_ark", "scp": "kaldi_ark", "h5": "hdf5", "hdf": "hdf5", "npy": "npy_dir"}


def parse_formats(spec: str | list) -> list[str]:
    """Turn ``"npz,ark"`` (or a list) into registry names, validated.

    Raises
    ------
    ValueError
        Unknown format name.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for s in (x.strip() for x in items):
        if s:
            name = FORMAT_ALIASES.get(s, s)
            get_writer(name)
            if name not in out:
                out.append(name)
    return out
