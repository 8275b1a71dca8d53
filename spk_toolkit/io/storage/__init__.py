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

from spk_toolkit.io.storage.base import (  # noqa: F401
    Reader, Writer, check_key, hdf5_dataset_name, npy_file_name, npz_member_name)
from spk_toolkit.io.storage.registry import (  # noqa: F401
    FORMAT_ALIASES, READERS, WRITERS, get_reader, get_writer, load_plugins, open_reader, parse_formats, register_storage, storage_names)
from spk_toolkit.io.storage.npz import (  # noqa: F401
    NpzReader, NpzWriter)
from spk_toolkit.io.storage.kaldi import (  # noqa: F401
    KaldiArkReader, KaldiArkWriter, resolve_scp_entry)
from spk_toolkit.io.storage.hdf5 import (  # noqa: F401
    Hdf5Reader, Hdf5Writer)
from spk_toolkit.io.storage.npy_dir import (  # noqa: F401
    NpyDirReader, NpyDirWriter)
from spk_toolkit.plugins import import_all as _import_all

# a new built-in format is one module of this package (registering itself); nothing lists it
_import_all("spk_toolkit.io.storage", exclude=("base", "registry"))

__all__ = ['FORMAT_ALIASES', 'READERS', 'WRITERS', 'Hdf5Reader', 'Hdf5Writer', 'KaldiArkReader', 'KaldiArkWriter', 'NpyDirReader', 'NpyDirWriter', 'NpzReader', 'NpzWriter', 'Reader', 'Writer', 'check_key', 'get_reader', 'get_writer', 'hdf5_dataset_name', 'npy_file_name', 'npz_member_name', 'open_reader', 'parse_formats', 'register_storage', 'storage_names', 'load_plugins']
