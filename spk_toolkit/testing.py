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


def make_subset(src: str | Path, dst: str | Path, per_speaker: int = 3) -> Path:
    """Write a Kaldi dir with the ``per_speaker`` shortest utterances of each speaker of ``src``.

    ``wav.scp`` order is kept; durations come from ``src``'s ``utt2dur``. Returns ``dst``.
    """
    from spk_toolkit.io.datadir import load_kaldi_dir

    utts = load_kaldi_dir(src)
    by_spk: dict = {}
    for u in sorted(utts, key=lambda u: (u.duration, u.utt_id)):
        by_spk.setdefault(u.spk_id, []).append(u.utt_id)
    keep = {k for v in by_spk.values() for k in v[:per_speaker]}
    sel = [u for u in utts if u.utt_id in keep]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "wav.scp").write_text("".join(f"{u.utt_id} {u.path}\n" for u in sel))
    (dst / "utt2spk").write_text("".join(f"{u.utt_id} {u.spk_id}\n" for u in sel))
    return dst


def load_npz(path) -> dict:
    """All arrays of an npz file as a dict (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
