"""Audio decoding: soundfile for wav/flac/ogg, soxr for resampling, downmix to mono, validation.

Every failure raises :class:`AudioLoadingError` naming the path and the reason; the engine turns it into one
``errors.tsv`` row for the utterance (DESIGN.md property 10).
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import stat
import subprocess
from typing import Optional

import numpy as np
import soundfile as sf

Seconds = float

#: Utterances shorter than this are refused by default (``ExtractOptions.min_duration``, the Python API).
DEFAULT_MIN_DURATION: Seconds = 0.1


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
    """True for a Kaldi ``wav.scp`` pipe entry (``cmd ... |``).

    Parameters
    ----------
    path : str

    Returns
    -------
    bool
    """
    return path.rstrip().endswith("|")


#: Seconds a ``cmd |`` pipe may run before it is killed (with every process it started).
PIPE_TIMEOUT = 600.0

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _read_pipe(cmd: str, timeout: float = PIPE_TIMEOUT) -> bytes:
    """Run ``cmd |`` in a shell of its own process group; its stdout, or AudioLoadingError.

    On a timeout the whole process group is killed (a shell's children too, so nothing keeps the pipe open).
    """
    cmd = cmd.rstrip()[:-1]
    proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C: never leave the command running
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise AudioLoadingError(cmd, f"pipe command timed out after {timeout:g} s (killed)") from None
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise AudioLoadingError(cmd, f"pipe command exited {proc.returncode}: {lines[-1] if lines else ''}")
    return out


def check_source(path: str) -> os.stat_result:
    """Check that ``path`` is a readable, non-empty regular file without opening it for reading audio.

    Special files are never opened by the audio readers (a FIFO would block the reader until a writer comes,
    a character device may never end): :func:`os.stat` says what ``path`` is, and only a regular file goes on.

    Parameters
    ----------
    path : str

    Returns
    -------
    os.stat_result
        Of the file (symbolic links followed).

    Raises
    ------
    AudioLoadingError
        With the reason: ``file not found`` (``..., dangling symlink to 'T'`` for a broken link), ``symlink
        loop``, ``permission denied``, ``not a regular file (a directory | a FIFO (named pipe) | a character
        device | a block device | a socket)``, ``empty file (0 bytes)``, or ``cannot access (...)``.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise AudioLoadingError(path, _access_reason(path, e)) from None
    if not stat.S_ISREG(st.st_mode):
        what = next((w for test, w in _KINDS if test(st.st_mode)), "not a file")
        raise AudioLoadingError(path, f"not a regular file ({what})")
    if st.st_size == 0:
        raise AudioLoadingError(path, "empty file (0 bytes)")
    try:  # O_NONBLOCK: the file may have been swapped for a FIFO since the stat; this never blocks
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AudioLoadingError(path, _access_reason(path, e)) from None
    os.close(fd)
    return st


def _access_reason(path: str, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"file not found (dangling symlink to {os.readlink(path)!r})"
        return "file not found"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOTDIR:
        return "file not found (a component of the path is not a directory)"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot access ({e.strerror or e})"


def audio_info(path: str, allow_pipes: bool = False, pipe_timeout: float = PIPE_TIMEOUT) -> tuple[int, int]:
    """Return ``(num_frames, sample_rate)`` of a file from its header (pipes are decoded).

    Parameters
    ----------
    path : str
        Audio file or ``cmd |`` pipe.
    allow_pipes : bool
        Run ``cmd |`` entries.
    pipe_timeout : float
        Seconds a pipe command may run.

    Returns
    -------
    (int, int)

    Raises
    ------
    AudioLoadingError
        Missing, special (not a regular file), unreadable or non-audio file; a pipe when ``allow_pipes`` is
        False, or one that fails or runs past ``pipe_timeout``.
    """
    if is_pipe(path):
        x, sr = read_audio(path, allow_pipes=allow_pipes, validate=False, pipe_timeout=pipe_timeout)
        return len(x), sr
    check_source(path)
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioLoadingError(path, _read_reason(path, e)) from None
    return int(info.frames), int(info.samplerate)


def _read_reason(path: str, e: Exception) -> str:
    if isinstance(e, OSError) and e.errno is not None and not isinstance(e, sf.LibsndfileError):
        return _access_reason(path, e)
    return f"unreadable audio ({e})"


def read_audio(
    path: str,
    sample_rate: Optional[int] = None,
    start: Optional[Seconds] = None,
    end: Optional[Seconds] = None,
    allow_pipes: bool = False,
    validate: bool = True,
    segment_overrun: str = "error",
    pipe_timeout: float = PIPE_TIMEOUT,
) -> tuple[np.ndarray, int]:
    """Decode an utterance to mono float32, optionally resampled.

    Parameters
    ----------
    path : str
        Audio file path (wav, flac, ogg, anything libsndfile reads) or a ``cmd |`` pipe. Only regular files
        are opened (:func:`check_source`).
    sample_rate : int, optional
        Target rate in Hz; resampled with soxr (``HQ``, soxr's default: 20-bit, flat to 0.95 x Nyquist) when
        the file's rate differs.
    start, end : float, optional
        Segment bounds in seconds (Kaldi ``segments``); ``end`` None or ≤ 0 means the end of the file.
    allow_pipes : bool
        Run ``cmd |`` entries (off by default: ``wav.scp`` may come from elsewhere).
    validate : bool
        Refuse empty audio and non-finite samples.
    segment_overrun : {"error", "clip"}
        A segment whose end lies past the end of the file (after rounding both to samples): ``"error"``
        (default) refuses it; ``"clip"`` returns the part that exists (the caller sees the shorter length).
    pipe_timeout : float
        Seconds a pipe command may run before it is killed.

    Returns
    -------
    wav : np.ndarray of shape (T,), float32
        Mono samples in [-1, 1] (multi-channel audio is averaged over channels).
    sample_rate : int
        Rate of ``wav`` in Hz.

    Raises
    ------
    AudioLoadingError
        File missing, not a regular file, unreadable or not audio, a pipe without ``allow_pipes`` (or failing,
        or timed out), empty audio, NaN/inf samples, a negative segment start, a segment starting at or after
        the end of the file, a segment running past the end with ``segment_overrun="error"``.
    ValueError
        ``segment_overrun`` is neither ``"error"`` nor ``"clip"``.
    """
    if segment_overrun not in ("error", "clip"):
        raise ValueError(f"segment_overrun must be 'error' or 'clip', got {segment_overrun!r}")
    if is_pipe(path):
        if not allow_pipes:
            raise AudioLoadingError(path, "wav.scp pipe entry refused (pass --allow_pipes to run commands)")
        src = io.BytesIO(_read_pipe(path, pipe_timeout))
    else:
        check_source(path)
        src = path
    if start is not None and start < 0:
        raise AudioLoadingError(path, f"segment start {start} s is negative")
    try:
        with sf.SoundFile(src) as f:
            sr, frames = f.samplerate, f.frames
            first = 0 if start is None else int(round(start * sr))
            last = frames if end is None or end <= 0 else int(round(end * sr))
            if (start is not None or last != frames) and first >= last:
                raise AudioLoadingError(path, f"segment {start}-{end} s is empty (start >= end)")
            if start is not None and first >= frames:
                raise AudioLoadingError(path, f"segment {start}-{end} s starts at or after the end of the file "
                                              f"({frames / sr:.3f} s)")
            if last > frames:
                if segment_overrun == "error":
                    raise AudioLoadingError(path, f"segment {start}-{end} s runs past the end of the file "
                                                  f"({frames / sr:.3f} s); pass --segment_overrun clip to "
                                                  "embed the part that exists")
                last = frames
            f.seek(first)
            x = f.read(frames=last - first, dtype="float32", always_2d=True)
    except AudioLoadingError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioLoadingError(path, _read_reason(path, e)) from None
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
