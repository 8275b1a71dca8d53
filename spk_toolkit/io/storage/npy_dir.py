"""``npy_dir``: ``<stem>/`` with ``index.txt`` and one ``.npy`` per key (memory-mapped partial reads).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, Optional
from urllib.parse import unquote

import numpy as np

from spk_toolkit.io.atomic import AtomicPath
from spk_toolkit.io.storage.base import Reader, Writer, _frame_range, npy_file_name
from spk_toolkit.io.storage.registry import register_storage


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


register_storage("npy_dir", NpyDirWriter, NpyDirReader)
