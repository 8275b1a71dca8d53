"""``npz``: ``<stem>.npz``, one ``.npy`` member per key, streamed (readable with ``np.load``).
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np

from spk_toolkit.io.atomic import AtomicPath
from spk_toolkit.io.storage.base import Reader, Writer, _pickled, _safe_reason, npz_member_name
from spk_toolkit.io.storage.registry import register_storage


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


register_storage("npz", NpzWriter, NpzReader)
