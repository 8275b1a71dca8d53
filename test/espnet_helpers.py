"""Helpers for the espnet backend tests: speech-like test signals, padding, random-init models.

Kept free of pytest fixtures so benchmarks can import it too.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "xvector": ROOT / "conf" / "model_xvector.yaml",
    "ecapa": ROOT / "test" / "espnet_configs" / "ecapa_small.yaml",
    "resnet34": ROOT / "conf" / "model_resnet34.yaml",
    "ecapa512": ROOT / "conf" / "model_ecapa.yaml",
    "rawnet3": ROOT / "test" / "espnet_configs" / "rawnet3_small.yaml",
}
#: Device the backend tests run their models on: ``cpu`` (CI) unless ``SPK_TEST_DEVICE`` says e.g. ``cuda``.
DEVICE = os.environ.get("SPK_TEST_DEVICE", "cpu")


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like signal: harmonics of a gliding f0 (80-260 Hz) under two moving formants,
    a 3-6 Hz syllabic envelope with short pauses, and breath noise. float32 in [-1, 1], shape (N,)."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * sr)))
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 200) * (1 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t + rng.uniform(0, 6)))
    f0 += np.cumsum(rng.normal(0, 0.02, n))  # slow random walk
    f0 = np.clip(f0, 80, 260)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    f1 = 500 + 250 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6))
    f2 = 1500 + 600 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6))
    x = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0
        gain = np.exp(-((fk - f1) / 200) ** 2) + 0.5 * np.exp(-((fk - f2) / 300) ** 2) + 0.05 / k
        gain = np.where(fk < sr / 2 - 200, gain, 0.0)
        x += gain * np.sin(k * phase)
    env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)), 0, None) ** 0.5
    x = x * env + 0.02 * rng.normal(size=n)
    x = 0.3 * x / (np.abs(x).max() + 1e-9)
    return x.astype(np.float32)


def pad_batch(wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D waveforms into ``wav (B, T)`` float32 and ``lengths (B,)`` int64."""
    lengths = torch.tensor([len(w) for w in wavs], dtype=torch.int64)
    out = torch.zeros(len(wavs), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(wavs):
        out[i, : len(w)] = torch.from_numpy(w)
    return out, lengths


def build(arch: str, seed: int = 0, **kwargs):
    """Random-init backend for one of :data:`CONFIGS` (seeded weights, randomised BatchNorm statistics)."""
    from spk_toolkit.backends.espnet import build_random_model

    return build_random_model(CONFIGS[arch], seed=seed, **{"device": DEVICE, **kwargs})


def embed_in_groups(model, wavs: list[np.ndarray], groups: list[list[int]]) -> torch.Tensor:
    """Embed ``wavs`` batch by batch as given by ``groups`` (lists of indices); rows in input order."""
    out = torch.zeros(len(wavs), model.embed_dim)
    for g in groups:
        wav, lengths = pad_batch([wavs[i] for i in g])
        out[g] = model.embed(wav, lengths)
    return out


def random_groups(n: int, seed: int) -> list[list[int]]:
    """A seeded random permutation of ``range(n)`` cut into random-sized groups."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).tolist()
    groups, i = [], 0
    while i < n:
        k = int(rng.integers(1, max(2, n // 2) + 1))
        groups.append(perm[i : i + k])
        i += k
    return groups


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def real_speech(targets=(0.6, 1.5, 3.0, 6.0, 12.0, 19.0), sr: int = 16000) -> list[np.ndarray]:
    """Real speech from ``data/fillets`` (``$SPK_TOOLKIT_DATA/fillets`` when set, as in conftest.py): for each
    target duration in seconds the utterance closest to it, mono, resampled to ``sr``.

    Raises FileNotFoundError (naming the missing file and ``make data``) when the corpus is absent; any other
    problem (unreadable audio, malformed utt2dur) propagates: missing or broken test data must fail, not skip."""
    import soundfile as sf
    import soxr

    d = Path(os.environ.get("SPK_TOOLKIT_DATA", ROOT / "data")) / "fillets"
    for f in ("utt2dur", "wav.scp"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d / f} missing: run `make data` (bin/prepare_fillets.sh) first")
    durs = {}
    for line in (d / "utt2dur").read_text().splitlines():
        k, v = line.split()
        durs[k] = float(v)
    paths = dict(line.split(maxsplit=1) for line in (d / "wav.scp").read_text().splitlines())
    out = []
    for t in targets:
        utt = min((k for k in durs if k in paths and durs[k] > 0.3), key=lambda k: abs(durs[k] - t))
        x, rate = sf.read(paths[utt].strip(), dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if rate != sr:
            x = soxr.resample(x, rate, sr).astype(np.float32)
        out.append(np.ascontiguousarray(x))
    return out
