"""``hdf5``: ``<stem>.h5``, one dataset per key (percent-encoded name), chunked by rows and compressed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional
from urllib.parse import unquote

import numpy as np

from spk_toolkit.io.atomic import AtomicPath
from spk_toolkit.io.storage.base import Reader, Writer, _frame_range, hdf5_dataset_name
from spk_toolkit.io.storage.registry import register_storage


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


register_storage("hdf5", Hdf5Writer, Hdf5Reader)
