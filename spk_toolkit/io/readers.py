"""Load embeddings written by spk_toolkit or by the peers (ESPnet npz, Kaldi ark/scp, HDF5, npy dir) into a
dict, through the storage registry (:func:`spk_toolkit.io.storage.open_reader`)."""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from spk_toolkit.io.storage import open_reader

__all__ = ["load_embeddings"]


def _finish(vec: np.ndarray, average_crops: bool) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32)
    if average_crops and vec.ndim == 2:
        vec = vec.mean(axis=0)  # ESPnet stores (n_crops, D) when crops are not averaged
    return vec


def load_embeddings(path: str | os.PathLike, average_crops: bool = True) -> Dict[str, np.ndarray]:
    """Load ``utt_id -> embedding`` from any registered format (chosen by :func:`open_reader`).

    Parameters
    ----------
    path : path-like
        ``*.npz`` (ours or ESPnet's), ``*.scp`` / ``*.ark`` (Kaldi, via kaldiio: WeSpeaker, 3D-Speaker),
        ``*.h5``, an ``npy_dir`` directory, or an spk_toolkit output directory (its ``summary.json`` names the
        main output, whatever its format).
    average_crops : bool, default=True
        Average 2-D values (ESPnet's ``(n_crops, D)``) to ``(D,)``.

    Returns
    -------
    dict of str -> np.ndarray
        Shape (D,) float32 (``(n_crops, D)`` float32 if not averaged), in file order. The whole set is loaded.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist (or ``summary.json`` names outputs that do not).
    ValueError
        Unrecognised format; a file that is truncated, corrupt, not of its suffix's format, or holds pickled
        objects; values of different shapes (a truncated Kaldi ark); the message names the file, and the key
        where one is at fault.
    """
    with open_reader(path) as r:
        out = {}
        first = None
        for k in r:
            try:
                v = _finish(r[k], average_crops)
            except ValueError:
                raise
            except Exception as e:  # a truncated ark / h5 dataset: name the file and the key
                raise ValueError(f"{os.fspath(path)}: cannot read key {k!r} ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())})") from None
            if first is None:
                first = (k, v.shape)
            elif v.shape != first[1]:  # kaldiio returns a short vector from a truncated ark without a word
                raise ValueError(f"{os.fspath(path)}: key {k!r} has shape {v.shape}, key {first[0]!r} "
                                 f"{first[1]} (a truncated or mixed file?)")
            out[k] = v
        return out
