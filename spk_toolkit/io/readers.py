"""Read embeddings written by spk_toolkit or by the peers (ESPnet npz, Kaldi ark/scp, HDF5, npy dir)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict
from urllib.parse import unquote

import numpy as np


def _finish(vec: np.ndarray, average_crops: bool) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32)
    if average_crops and vec.ndim == 2:
        vec = vec.mean(axis=0)  # ESPnet stores (n_crops, D) when crops are not averaged
    return vec


def load_embeddings(path: str | os.PathLike, average_crops: bool = True) -> Dict[str, np.ndarray]:
    """Load ``utt_id -> embedding`` from any supported format (detected from the path).

    Parameters
    ----------
    path : path-like
        ``*.npz`` (ours or ESPnet's), ``*.scp`` / ``*.ark`` (Kaldi, via kaldiio), ``*.h5``, a ``npy_dir``
        directory, or an spk_toolkit output directory (its ``summary.json`` names the main output).
    average_crops : bool
        Average ESPnet ``(n_crops, D)`` values to ``(D,)``.

    Returns
    -------
    dict of str -> np.ndarray of shape (D,) float32 (``(n_crops, D)`` if not averaged), in file order.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Unrecognised format, or an npz holding pickled objects.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"embeddings not found: {p}")
    if p.is_dir():
        summary = p / "summary.json"
        if summary.is_file():
            outputs = json.loads(summary.read_text()).get("outputs", {})
            for key in ("npz", "kaldi_ark", "hdf5", "npy_dir"):
                if key in outputs:
                    return load_embeddings(p / Path(outputs[key]).name, average_crops)
        if (p / "embeddings.npz").is_file():
            return load_embeddings(p / "embeddings.npz", average_crops)
        files = sorted(p.glob("*.npy"))
        if files:
            return {unquote(f.stem): _finish(np.load(f, allow_pickle=False), average_crops) for f in files}
        raise ValueError(f"{p}: directory holds no embeddings (summary.json, embeddings.npz or *.npy)")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: _finish(z[k], average_crops) for k in z.files}
    if suffix in (".scp", ".ark"):
        import kaldiio

        spec = f"scp:{p}" if suffix == ".scp" else f"ark:{p}"
        with kaldiio.ReadHelper(spec) as r:
            return {k: _finish(v, average_crops) for k, v in r}
    if suffix in (".h5", ".hdf5"):
        import h5py

        out = {}
        with h5py.File(p, "r") as f:
            f.visititems(lambda k, v: out.__setitem__(k, _finish(v[()], average_crops)) if hasattr(v, "shape") else None)
        return out
    raise ValueError(f"{p}: unknown embedding format (expected .npz, .scp, .ark, .h5 or a directory)")
