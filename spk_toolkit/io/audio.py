"""Audio decoding: soundfile for wav/flac/ogg, soxr for resampling, downmix to mono, validation.

Every failure raises :class:`AudioLoadingError` naming the path and the reason; the engine turns it into one
``errors.tsv`` row for the utterance (DESIGN.md property 10).
"""
from __future__ import annotations

import io
import subprocess
from typing import Optional

import numpy as np
import soundfile as sf

Seconds = float


class AudioLoadingError(Exception):
    """An utterance's audio could not be used.

    Parameters
    ----------
    path : str
        The file (or pipe command) that failed.
    reason : str
        A one-line reason, recorded in ``errors.tsv``.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_pipe(path: str) -> bool:
    """True for a Kaldi ``wav.scp`` pipe entry (``cmd ... |``)."""
    return path.rstrip().endswith("|")


def _read_pipe(cmd: str, timeout: float = 600.0) -> bytes:
    cmd = cmd.rstrip()[:-1]
    try:
        proc = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AudioLoadingError(cmd, f"pipe command timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioLoadingError(cmd, f"pipe command exited {proc.returncode}: {err[-1] if err else ''}")
    return proc.stdout


def _check_file(path: str) -> None:
    import os

    if not os.path.exists(path):
        raise AudioLoadingError(path, "file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise AudioLoadingError(path, "empty file (0 bytes)")


def audio_info(path: str, allow_pipes: bool = False) -> tuple[int, int]:
    """Return ``(num_frames, sample_rate)`` of a file from its header (pipes are decoded).

    Raises
    ------
    AudioLoadingError
        Missing, unreadable or non-audio file; a pipe when ``allow_pipes`` is False.
    """
    if is_pipe(path):
        x, sr = read_audio(path, allow_pipes=allow_pipes, validate=False)
        return len(x), sr
    _check_file(path)
    try:
        info = sf.info(path)
    except FileNotFoundError as e:
        raise AudioLoadingError(path, "file not found") from e
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        reason = "file not found" if isinstance(e, OSError) and getattr(e, "errno", None) == 2 else f"unreadable audio ({e})"
        raise AudioLoadingError(path, reason) from e
    return int(info.frames), int(info.samplerate)


def read_audio(
    path: str,
    sample_rate: Optional[int] = None,
    start: Optional[Seconds] = None,
    end: Optional[Seconds] = None,
    allow_pipes: bool = False,
    validate: bool = True,
) -> tuple[np.ndarray, int]:
    """Decode an utterance to mono float32, optionally resampled.

    Parameters
    ----------
    path : str
        Audio file path (wav, flac, ogg, anything libsndfile reads) or a ``cmd |`` pipe.
    sample_rate : int, optional
        Target rate in Hz; resampled with soxr (``HQ``, soxr's default: 20-bit, flat to 0.95 x Nyquist) when
        the file's rate differs.
    start, end : float, optional
        Segment bounds in seconds (Kaldi ``segments``); ``end`` None or ≤ 0 means the end of the file.
    allow_pipes : bool
        Run ``cmd |`` entries (off by default: ``wav.scp`` may come from elsewhere).
    validate : bool
        Refuse empty audio and non-finite samples.

    Returns
    -------
    wav : np.ndarray of shape (T,), float32
        Mono samples in [-1, 1] (multi-channel audio is averaged over channels).
    sample_rate : int
        Rate of ``wav`` in Hz.

    Raises
    ------
    AudioLoadingError
        File missing, unreadable or not audio, a pipe without ``allow_pipes``, empty audio, NaN/inf samples,
        a segment outside the file.
    """
    if is_pipe(path):
        if not allow_pipes:
            raise AudioLoadingError(path, "wav.scp pipe entry refused (pass --allow_pipes to run commands)")
        src = io.BytesIO(_read_pipe(path))
    else:
        _check_file(path)
        src = path
    try:
        with sf.SoundFile(src) as f:
            sr = f.samplerate
            first = 0 if start is None else int(round(start * sr))
            last = f.frames if end is None or end <= 0 else int(round(end * sr))
            if first > f.frames or first >= last and f.frames > 0:
                raise AudioLoadingError(path, f"segment {start}-{end} s outside a file of {f.frames / sr:.3f} s")
            f.seek(first)
            x = f.read(frames=max(last - first, 0), dtype="float32", always_2d=True)
    except AudioLoadingError:
        raise
    except FileNotFoundError as e:
        raise AudioLoadingError(path, "file not found") from e
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        reason = "file not found" if getattr(e, "errno", None) == 2 else f"unreadable audio ({e})"
        raise AudioLoadingError(path, reason) from e
    # downmix: a matrix-vector product is several times faster than a strided mean over channels
    x = x @ np.full(x.shape[1], 1.0 / x.shape[1], dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if validate:
        if x.size == 0:
            raise AudioLoadingError(path, "empty audio (0 samples)")
        # one pass: the sum is finite iff every sample is (float32 samples cannot overflow a float64 sum)
        if not np.isfinite(np.sum(x, dtype=np.float64)):
            raise AudioLoadingError(path, f"{int((~np.isfinite(x)).sum())} non-finite (NaN/inf) samples")
    if sample_rate is not None and sr != sample_rate:
        import soxr

        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32, copy=False)
        sr = sample_rate
    return np.ascontiguousarray(x, dtype=np.float32), sr
