"""``kaldi_ark``: ``<stem>.ark`` + ``<stem>.scp`` (Kaldi binary vectors/matrices, kaldiio's numpy-in-ark otherwise).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from spk_toolkit.io.atomic import AtomicPath, commit_together
from spk_toolkit.io.scp import load_scp_array, read_scp_entries, resolve_scp_entry
from spk_toolkit.io.storage.base import Reader, Writer, _writable
from spk_toolkit.io.storage.registry import register_storage


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


class KaldiArkReader(Reader):
    """Kaldi ``.scp`` (:func:`spk_toolkit.io.scp.read_scp_entries`, lazy, the ark opened per access; command and
    standard-input entries refused, never run) or a bare ``.ark`` (indexed by
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
        A malformed scp line, a key twice, a command entry (``cmd |``: :class:`spk_toolkit.io.datadir.CorpusError`,
        ``file:line``), or a bare ark holding a key twice.
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
            found: Dict[str, str] = {}
            self._scp = {key: resolve_scp_entry(value, self.path.parent, found)
                         for key, value in read_scp_entries(self.path)}

    @classmethod
    def find(cls, directory, stem="embeddings"):
        p = directory / f"{stem}.scp"  # the scp, not the ark: it is the committed index
        return p if p.is_file() else None

    def __getitem__(self, key: str) -> np.ndarray:
        if self._scp is not None:
            return _writable(load_scp_array(self._scp[key]))
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


register_storage("kaldi_ark", KaldiArkWriter, KaldiArkReader)
