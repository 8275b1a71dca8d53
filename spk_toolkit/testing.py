"""Deterministic test signals, importable by this project's tests and by users' (as lhotse.testing is)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def speechlike(seconds: float, sr: int = 16000, f0: float = 120.0, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal with a little noise.

    Returns
    -------
    np.ndarray of shape (round(seconds * sr),), float32, peak below 0.5.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.1 * x * env + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def write_wav(path: str | Path, x: np.ndarray, sr: int = 16000, subtype: str | None = None) -> Path:
    """Write ``x`` (T,) or (T, C) with soundfile and return the path."""
    import soundfile as sf

    sf.write(str(path), x, sr, subtype=subtype)
    return Path(path)
