"""Dataset, length-bucketed batching bounded by padded samples, and collate.

Decoding, resampling and per-utterance preparation (e.g. resemblyzer's VAD) run in DataLoader workers;
each batch carries true lengths so backends can mask padding (DESIGN.md properties 1 and 3).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from spk_toolkit.io.audio import PIPE_TIMEOUT, AudioLoadingError, read_audio
from spk_toolkit.io.datadir import Utterance

Samples = int


@dataclasses.dataclass
class Batch:
    """A padded batch.

    Attributes
    ----------
    wav : torch.Tensor of shape (B, T), float32
        Zero-padded waveforms at the model's rate.
    lengths : torch.Tensor of shape (B,), int64
        True lengths in samples.
    indices : list of int, length B
        Positions of the utterances in the dataset.
    errors : list of (int, str)
        ``(dataset index, reason)`` of utterances of this batch that failed to load (not in ``wav``).
    tag : object
        Whatever the sampler attached (the engine puts the shard index here).
    clipped : list of (int, float)
        ``(dataset index, seconds decoded)`` of segments that ran past the end of their file and were clipped
        (``segment_overrun="clip"``); the seconds are those before the backend's preparation.
    """

    wav: torch.Tensor
    lengths: torch.Tensor
    indices: List[int]
    errors: List[tuple]
    tag: object = None
    clipped: List[tuple] = dataclasses.field(default_factory=list)


class UtteranceDataset(torch.utils.data.Dataset):
    """Decodes utterances to mono float32 at ``sample_rate`` and applies ``prepare``.

    ``__getitem__`` never raises for bad audio: it returns ``(index, None, reason)`` so one bad file costs one
    ``errors.tsv`` line, not the batch; a good item is ``(index, wav, None)``, or ``(index, wav, None, seconds)``
    for a segment clipped at the end of its file (``segment_overrun="clip"``).

    Parameters
    ----------
    utts : sequence of Utterance
    sample_rate : int
        Target rate in Hz.
    prepare : callable, optional
        ``np.ndarray (T,) -> np.ndarray (T',)`` per-utterance preparation (backend-specific).
    min_samples : int
        Utterances shorter than this (after preparation) are errors.
    allow_pipes : bool
        Run ``cmd |`` entries of ``wav.scp``.
    segment_overrun : {"error", "clip"}
        A segment running past the end of its file is an error, or is clipped to what exists
        (:func:`spk_toolkit.io.audio.read_audio`).
    pipe_timeout : float
        Seconds a pipe command may run.
    """

    def __init__(
        self,
        utts: Sequence[Utterance],
        sample_rate: int,
        prepare: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        min_samples: int = 1,
        allow_pipes: bool = False,
        segment_overrun: str = "error",
        pipe_timeout: float = PIPE_TIMEOUT,
    ):
        self.utts = utts
        self.sample_rate = sample_rate
        self.prepare = prepare
        self.min_samples = max(int(min_samples), 1)
        self.allow_pipes = allow_pipes
        self.segment_overrun = segment_overrun
        self.pipe_timeout = pipe_timeout
        self._clipped: dict = {}  # thread id -> seconds decoded of the clipped segment that thread just loaded
        self.decoded = 0  # items this process decoded (counted per worker; see tests of rank-local decoding)

    def __len__(self) -> int:
        return len(self.utts)

    def load(self, i: int) -> np.ndarray:
        """Decode and prepare utterance ``i``.

        Parameters
        ----------
        i : int

        Returns
        -------
        np.ndarray of shape (T,), float32

        Raises
        ------
        AudioLoadingError
            Unreadable or invalid audio, too short, or silent (every sample zero); see
            :func:`spk_toolkit.io.audio.read_audio`.
        """
        x, clipped = self._load(i)
        if clipped is not None:  # read by __getitem__ in this thread (a dict: the dataset stays picklable)
            self._clipped[threading.get_ident()] = clipped
        return x

    def _load(self, i: int):
        """``(prepared wav, seconds decoded if the segment was clipped else None)``."""
        u = self.utts[i]
        self.decoded += 1
        clipped = None
        if u.audio is not None:  # an in-memory utterance (Utterance.audio at Utterance.sample_rate)
            x = np.asarray(u.audio, dtype=np.float32).reshape(-1)
            if u.sample_rate != self.sample_rate:
                import soxr

                x = soxr.resample(x, u.sample_rate, self.sample_rate).astype(np.float32)
            if not np.isfinite(x).all():
                raise AudioLoadingError(u.path, "non-finite samples (NaN or Inf)")
        else:
            x, _ = read_audio(u.path, self.sample_rate, u.start, u.end, allow_pipes=self.allow_pipes,
                              segment_overrun=self.segment_overrun, pipe_timeout=self.pipe_timeout)
            if u.start is not None and u.end is not None and u.end > 0:
                got = len(x) / self.sample_rate
                if got < (u.end - u.start) - 0.002:  # only a clip makes it shorter (resampling: +-1 sample)
                    clipped = got
        if len(x) < self.min_samples:
            raise AudioLoadingError(
                u.path, f"too short: {len(x) / self.sample_rate:.3f} s < {self.min_samples / self.sample_rate:.3f} s"
            )
        if not np.any(x):
            raise AudioLoadingError(u.path, "silent audio (every sample is zero)")
        if self.prepare is not None:
            x = self.prepare(x)
            if len(x) < self.min_samples:
                raise AudioLoadingError(
                    u.path, f"too short after preparation (VAD): {len(x) / self.sample_rate:.3f} s"
                )
        return x, clipped

    def __getitem__(self, i: int):
        me = threading.get_ident()
        self._clipped.pop(me, None)
        try:
            x = self.load(i)
        except AudioLoadingError as e:
            return i, None, e.reason
        clipped = self._clipped.pop(me, None)
        return (i, x, None) if clipped is None else (i, x, None, clipped)


def bucket_batches(lengths: Sequence[int], batch_bins: Samples, max_batch_size: int = 0) -> List[List[int]]:
    """Group items into batches of similar length bounded by padded samples.

    Items are sorted by length (longest first, ties by index) and cut greedily so that
    ``len(batch) * max(lengths in batch) <= batch_bins`` (a single item longer than ``batch_bins`` forms its
    own batch). Deterministic.

    Parameters
    ----------
    lengths : sequence of int, length N
        Estimated length of each item in samples.
    batch_bins : int
        Bound on padded samples per batch ``B * T``.
    max_batch_size : int
        Optional bound on ``B`` (0 = none).

    Returns
    -------
    list of list of int
        Item indices per batch; every index appears exactly once.

    Raises
    ------
    ValueError
        ``batch_bins`` < 1.
    """
    if batch_bins < 1:
        raise ValueError(f"batch_bins must be >= 1, got {batch_bins}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        L = max(int(lengths[i]), 1)
        longest = max(cur_max, L)
        if cur and (longest * (len(cur) + 1) > batch_bins or (max_batch_size and len(cur) >= max_batch_size)):
            batches.append(cur)
            cur, longest = [], L
        cur.append(i)
        cur_max = longest
    if cur:
        batches.append(cur)
    return batches


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of padded samples in ``batches``: ``1 - sum(lengths) / sum(B * T_max)`` (0 = no padding)."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 0.0 if total == 0 else 1.0 - sum(lengths[i] for b in batches for i in b) / total


def collate(items: List[tuple], tag=None) -> Batch:
    """Pad decoded items ``(index, wav (T,) or None, reason[, clipped_seconds])`` into a :class:`Batch`.

    Parameters
    ----------
    items : list of tuple
        What :class:`UtteranceDataset` returns per item.
    tag : object
        Attached to the batch.

    Returns
    -------
    Batch
    """
    good = [(it[0], it[1]) for it in items if it[1] is not None]
    errors = [(it[0], it[2]) for it in items if it[1] is None]
    clipped = [(it[0], float(it[3])) for it in items if len(it) > 3 and it[1] is not None]
    lengths = torch.tensor([len(x) for _, x in good], dtype=torch.int64)
    T = int(lengths.max()) if len(good) else 0
    wav = torch.zeros(len(good), T, dtype=torch.float32)
    for row, (_, x) in enumerate(good):
        wav[row, : len(x)] = torch.from_numpy(x)
    return Batch(wav, lengths, [i for i, _ in good], errors, tag, clipped)


class TaggedBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over precomputed batches: item k = the collated batch ``batches[k]``.

    Used with ``batch_size=None`` so each DataLoader worker decodes whole batches, and batches come back in
    plan order.
    """

    def __init__(self, dataset: UtteranceDataset, batches: List[List[int]], tags: Optional[List] = None):
        self.dataset, self.batches = dataset, batches
        self.tags = tags if tags is not None else [None] * len(batches)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        batch = collate([self.dataset[i] for i in self.batches[k]], self.tags[k])
        if torch.utils.data.get_worker_info() is not None:
            _worker_fault("batch")
            # Into shared memory here, synchronously: when /dev/shm is full or the file-size limit is reached the
            # error is raised in __getitem__ and reaches the driver (which names it); moved later by the queue's
            # feeder thread, the same error is only printed there and the driver waits for the batch forever.
            batch.wav.share_memory_()
            batch.lengths.share_memory_()
        return batch


#: Test-only: a fault a decoding worker injects into itself (``fsize``: a 4 KiB file-size limit, as a full
#: ``/dev/shm``; ``kill[:N]``: SIGKILL itself at its N-th batch (default 1), as the OOM killer; ``stall[:N]``: block
#: forever at its N-th batch, as a hung read). Read only in DataLoader workers.
WORKER_FAULT_ENV = "SPK_TOOLKIT_FAULT_WORKER"
_worker_batches = [0]


def _worker_fault(moment: str) -> None:
    fault = os.environ.get(WORKER_FAULT_ENV)
    if not fault:
        return
    if fault == "fsize" and moment == "init":
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif fault.split(":")[0] in ("kill", "stall") and moment == "batch":
        import signal

        _worker_batches[0] += 1
        if _worker_batches[0] >= int(fault.split(":")[1] if ":" in fault else 1):
            if fault.startswith("stall"):
                while True:  # a read that never returns
                    signal.pause()
            os.kill(os.getpid(), signal.SIGKILL)


def worker_failure(exc: BaseException) -> Optional[str]:
    """The one-line cause of a DataLoader failure that is a decoding worker's, not an utterance's, or ``None``.

    Parameters
    ----------
    exc : BaseException
        What iterating the DataLoader raised.

    Returns
    -------
    str or None
        ``decoding worker (pid N) was killed by signal SIGKILL ...``, ``... exited unexpectedly``, or
        ``a decoding worker could not put a batch into shared memory ...`` (``/dev/shm`` full, the file-size limit);
        ``None`` for anything else.
    """
    import re

    text = str(exc)
    stalled = re.match(r"DataLoader timed out after ([\d.]+) seconds", text) if isinstance(exc, RuntimeError) else None
    if stalled:
        return (f"no batch from the decoding workers for {stalled.group(1)} s (a stalled read or a hung worker; "
                "--worker_timeout sets the bound); finished shards are kept: rerun to resume")
    if not isinstance(exc, RuntimeError) or "DataLoader worker" not in text:
        return None
    pid = re.search(r"\(pids?\(?s?\)? ?([\d, ]+)\)", text)
    who = f"decoding worker (pid {pid.group(1).strip()})" if pid else "a decoding worker"
    killed = re.search(r"killed by signal: ?([^.]+)", text)
    hint = "finished shards are kept: rerun to resume (fewer --num_workers or a smaller --batch_bins use less memory)"
    if killed:
        return f"{who} was killed by signal {killed.group(1).strip()} (the OOM killer does this when memory runs out); {hint}"
    if "exited unexpectedly" in text:
        return f"{who} exited unexpectedly; {hint}"
    if any(m in text for m in ("unable to resize file", "No space left on device", "File too large",
                               "unable to write to file", "unable to mmap")):
        last = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-1]
        return (f"a decoding worker could not put a batch into shared memory (/dev/shm full, or the file-size limit "
                f"reached): {last}; free /dev/shm (or use --num_workers 0), then rerun to resume")
    last = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-1]
    return f"a decoding worker failed: {last}; {hint}"


class _CheckedLoader:
    """Iterates a DataLoader; a decoding worker's death or failure becomes one :class:`ExtractionError` line."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        from spk_toolkit.errors import ExtractionError

        try:
            yield from self.loader
        except RuntimeError as e:
            why = worker_failure(e)
            if why is None:
                raise
            raise ExtractionError(why) from None


def _quiet_when_the_driver_is_gone(exc_type, exc, tb):
    """A decoding worker's ``sys.excepthook``: silent for the connection errors of a driver that went away.

    multiprocessing's resource sharer (which hands the driver the worker's shared-memory file descriptors) reports
    a failed hand-over through ``sys.excepthook``; when the driver was stopped (SIGTERM, Ctrl-C) mid-hand-over that
    is a ``ConnectionResetError`` / ``BrokenPipeError`` / ``EOFError`` traceback on the terminal after the driver's
    one line. Anything else is reported as usual."""
    if issubclass(exc_type, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(exc_type, exc, tb)


def _worker_init(_):
    # One thread per decoding worker, at lower CPU priority: decoding runs ahead of the model (prefetch), so it
    # should use the model's idle slack rather than preempt the model's threads on a small CPU box.
    # Ctrl-C reaches the whole process group: the driver process handles it (stops at once, exit 130) and shuts
    # its workers down, so a worker ignores SIGINT instead of dying with a traceback of its own.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_when_the_driver_is_gone
    _worker_fault("init")
    torch.set_num_threads(1)
    try:
        os.nice(5)
    except OSError:  # not permitted on some systems: priority is an optimisation only
        pass


def batch_loader(dataset: UtteranceDataset, batches, tags=None, num_workers: int = 1, prefetch_factor: int = 4,
                 worker_timeout: float = 0.0):
    """A DataLoader yielding :class:`Batch` objects in the order of ``batches`` (workers decode ahead).

    Parameters
    ----------
    worker_timeout : float
        With workers, seconds to wait for the next batch before giving up (the watchdog of a stalled worker;
        0 = no limit).

    Raises
    ------
    spk_toolkit.errors.ExtractionError
        While iterating: a decoding worker was killed (SIGKILL, the OOM killer), exited, stalled past
        ``worker_timeout`` or could not put its batch into shared memory (:func:`worker_failure` names the cause).
    """
    ds = TaggedBatchDataset(dataset, batches, tags)
    kw = dict(num_workers=num_workers, batch_size=None, shuffle=False, collate_fn=lambda b: b)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False,
                  timeout=float(worker_timeout or 0))
    return _CheckedLoader(torch.utils.data.DataLoader(ds, **kw))
