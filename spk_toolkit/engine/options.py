"""Options of an extraction run and the one error policy every part of the engine applies."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from spk_toolkit.errors import ExtractionError, UtteranceError
from spk_toolkit.io.audio import DEFAULT_MIN_DURATION
from spk_toolkit.io.rundir import RUN_DIRS, RUN_FILES
from spk_toolkit.io.writers import parse_formats


@dataclasses.dataclass
class ExtractOptions:
    """Options of an extraction run (every field is a CLI flag of ``spk_inference``).

    Attributes
    ----------
    batch_bins : int
        Bound on padded samples per batch ``B * T`` at the model's rate (default 16 kHz x 240 s).
    num_workers : int
        DataLoader decoding workers (processes that decode ahead of the model). 0 = decode in this process: in
        the main thread with one model stream, or, with ``model_streams > 1``, each stream decodes its own next
        batch before its forward (on a 2-core CPU the fastest setting for an ESPnet model: no decoding process
        preempts the model threads; docs/benchmarks.md). On a GPU, give decoding workers most cores.
    output_format : list of str
        Storage registry names (``npz``, ``kaldi_ark``, ``hdf5``, ``npy_dir``).
    on_error : str
        ``skip`` (record in ``errors.tsv``, warn, continue) or ``raise`` (stop at the first bad utterance).
    max_errors : int
        Stop when more than this many utterances failed, counting those recorded in resumed shards and those
        refused at the header pass (-1 = no limit).
    min_duration : float
        Utterances shorter than this (seconds) are errors (default 0.1 s).
    allow_pipes : bool
        Run ``wav.scp`` pipe commands.
    shard_duration : float
        Target audio per shard in seconds (default 600 s: a lost shard costs well under a minute on a GPU).
    overwrite : bool
        Remove every output of a previous run in ``output_dir`` (plan, shards, embeddings in every format,
        speaker means, errors, summary, scores) instead of resuming.
    progress : bool
        Show a tqdm bar (driver only).
    torch_threads : int
        Intra-op threads for the model while embedding (0 = leave torch's setting). On a small CPU box, cores
        minus ``num_workers`` avoids oversubscription (decoding workers and model threads competing).
    model_streams : int
        Concurrent forwards on different batches (Python threads; torch releases the GIL inside operators), each
        with ``torch_threads // model_streams`` intra-op threads (torch's setting when ``torch_threads`` is 0;
        default 1 = one forward at a time; :func:`spk_toolkit.engine.run.stream_threads`). On a CPU, 2 streams x 1
        thread ran the ECAPA-TDNN forward 7-12 % faster than 1 stream x 2 threads on our 2-core machine
        (docs/benchmarks.md). Results are consumed in batch order, so outputs, errors and shard writes are those
        of one stream; embeddings agree to float32 rounding. Keep 1 on a GPU.
    crops : int
        0 (default) = embed whole utterances. ``N > 0`` = ESPnet's evaluation crops (``SpkPreprocessor`` in
        validation mode, ``num_eval``): an utterance shorter than ``crop_duration`` is wrapped (``np.pad(...,
        "wrap")``) to ``crop_duration`` + 1 sample, then ``N`` windows of ``crop_duration`` start at
        ``int(linspace(0, T - L, N))``; the stored embedding is the mean of the ``N`` crop embeddings
        (``average_crops``) or the ``(N, D)`` crops.
    crop_duration : float
        Seconds per crop (ESPnet ``target_duration``; default 3 s as ESPnet's RawNet3 / ECAPA recipes).
    average_crops : bool
        With ``crops > 0``: store the crop mean ``(D,)`` (default) or every crop ``(N, D)``.
    max_batch_size : int
        Bound on utterances per batch besides ``batch_bins`` (0 = none; the trainer's ``custom_bs``).
    lock_timeout : float
        Seconds to wait for another run holding ``output_dir`` (0 = refuse at once, the default; -1 = wait
        for as long as it takes).
    segment_overrun : {"error", "clip"}
        A ``segments`` entry whose end lies past the end of its file: ``error`` (default: the utterance is
        an error, ``errors.tsv`` says by how much) or ``clip`` (embed the part that exists; the summary counts
        it under ``segments_clipped`` and its audio as what was really embedded).
    header_timeout : float
        Seconds one audio header read of the planning pass may take (a hung network file system); the
        utterance is then an error (``header read timed out``). Special files are refused without being opened.
    pipe_timeout : float
        Seconds a ``wav.scp`` pipe command may run before it is killed with everything it started.
    worker_timeout : float
        The decoding workers' watchdog: seconds the driver waits for the next batch from its DataLoader workers
        before it stops the run (exit 1, one line; committed shards kept). Default 900 s, above ``pipe_timeout``
        plus ``header_timeout`` so a slow pipe is not mistaken for a stalled worker; 0 = wait forever.
    max_chunk_duration : float
        0 (default) = every utterance goes through the model whole. ``S > 0``: an utterance longer than ``S``
        seconds is cut into ``ceil(T / S)`` equal consecutive chunks, each embedded on its own (in forwards of at
        most ``batch_bins`` samples), and its vector outputs are the length-weighted mean of the chunk outputs.
        This bounds the model's activation memory for very long recordings (an ESPnet encoder holds
        ``channels x frames`` activations per layer: gigabytes for an hour), at the price of changing the
        embedding of long utterances: it is no longer the model's own pooling over the whole utterance. Not
        needed for resemblyzer (its partial windows are already bounded). Vector outputs only.
    output_stem : str
        File stem of the ``embedding`` output (default ``embeddings``: ``embeddings.npz``, ``embeddings.scp``,
        ...; ``spk_embed_extract`` names it ``<set>_embeddings`` as ESPnet). The summary names the files, so
        readers, resume and ``--overwrite`` follow it. Other outputs keep their own names (``fbank``, ...).
    writer_options : dict
        ``format -> {option: value}`` passed to that format's writer at merge, e.g. ``{"hdf5": {"compression":
        "lzf"}}`` (:meth:`spk_toolkit.io.storage.Writer.check_options` validates them before any work). They
        change how outputs are stored, not their values, so they are not part of the fingerprints.
    """

    batch_bins: int = 16000 * 240
    num_workers: int = 1
    output_format: List[str] = dataclasses.field(default_factory=lambda: ["npz"])
    on_error: str = "skip"
    max_errors: int = -1
    min_duration: float = DEFAULT_MIN_DURATION
    allow_pipes: bool = False
    shard_duration: float = 600.0
    overwrite: bool = False
    progress: bool = True
    torch_threads: int = 0
    model_streams: int = 1
    crops: int = 0
    crop_duration: float = 3.0
    average_crops: bool = True
    max_batch_size: int = 0
    lock_timeout: float = 0.0
    segment_overrun: str = "error"
    header_timeout: float = 30.0
    pipe_timeout: float = 600.0
    worker_timeout: float = 900.0
    max_chunk_duration: float = 0.0
    output_stem: str = "embeddings"
    writer_options: Dict[str, dict] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.output_format = parse_formats(self.output_format)
        self.writer_options = _check_writer_options(self.writer_options, self.output_format)
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        _check_int("batch_bins", self.batch_bins, 1)
        _check_int("num_workers", self.num_workers, 0)
        _check_int("max_errors", self.max_errors, -1)
        _check_int("model_streams", self.model_streams, 1)
        _check_int("torch_threads", self.torch_threads, 0)
        _check_int("crops", self.crops, 0)
        _check_int("max_batch_size", self.max_batch_size, 0)
        _check_float("min_duration", self.min_duration, 0.0, strict=False)
        _check_float("shard_duration", self.shard_duration, 0.0, strict=True)
        _check_float("crop_duration", self.crop_duration, 0.0, strict=True)
        _check_float("lock_timeout", self.lock_timeout, -1.0, strict=False)
        if not (self.lock_timeout == -1 or self.lock_timeout >= 0):
            raise ValueError(f"lock_timeout must be >= 0 s or -1 (wait), got {self.lock_timeout}")
        if self.segment_overrun not in ("error", "clip"):
            raise ValueError(f"segment_overrun must be 'error' or 'clip', got {self.segment_overrun!r}")
        _check_float("header_timeout", self.header_timeout, 0.0, strict=True)
        _check_float("pipe_timeout", self.pipe_timeout, 0.0, strict=True)
        _check_float("worker_timeout", self.worker_timeout, 0.0, strict=False)
        _check_float("max_chunk_duration", self.max_chunk_duration, 0.0, strict=False)
        st = self.output_stem
        if not isinstance(st, str) or not st or "/" in st or os.sep in st or st.startswith(".") \
                or any(c.isspace() or c == "\0" for c in st) or st in RUN_FILES + RUN_DIRS:
            raise ValueError(f"output_stem must be a plain file name stem (no '/', no leading '.', no whitespace, "
                             f"not a run file), got {st!r}")
        if self.max_chunk_duration and self.crops:
            raise ValueError("max_chunk_duration and crops cannot be combined (crops are already bounded)")

    @classmethod
    def check(cls, name: str, value):
        """Validate one option the way a full :class:`ExtractOptions` does; returns the value as stored.

        The command-line parsers use it as argparse ``type`` (:func:`spk_toolkit.bin.cli.option_type`), so every
        range lives here once.

        Parameters
        ----------
        name : str
            A field name.
        value
            The value (already converted to the field's type).

        Returns
        -------
        object
            The field after ``__post_init__`` (e.g. ``output_format`` as a list of registry names).

        Raises
        ------
        ValueError
            ``value`` is out of range for ``name`` (the message names the option), or ``name`` is no field.
        """
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"{name!r} is not an extraction option")
        return getattr(cls(**{name: value}), name)

    def output_affecting(self) -> dict:
        """The options that change what is stored for an utterance (part of every shard's fingerprint).

        ``batch_bins``, ``num_workers``, ``model_streams``, ``torch_threads`` and ``worker_timeout`` are absent on purpose: outputs do not
        depend on the batch (DESIGN.md property 1).
        """
        d = {"min_duration": float(self.min_duration), "allow_pipes": bool(self.allow_pipes)}
        if self.segment_overrun != "error":  # absent at the default: plans of earlier versions stay valid
            d["segment_overrun"] = self.segment_overrun
        if self.max_chunk_duration:
            d["max_chunk_duration"] = float(self.max_chunk_duration)
        if self.crops:
            d.update(crops=int(self.crops), crop_duration=float(self.crop_duration),
                     average_crops=bool(self.average_crops))
        return d


def _check_writer_options(spec, formats: List[str]) -> Dict[str, dict]:
    """``writer_options`` with format names resolved and every option checked by its writer.

    Raises
    ------
    ValueError
        Not a mapping of mappings, a format that is not in ``output_format``, or an option its writer rejects
        (named).
    """
    from spk_toolkit.io.storage import get_writer

    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"writer_options must map format names to option mappings, got {spec!r}")
    out: Dict[str, dict] = {}
    for fmt, kw in spec.items():
        cls = get_writer(str(fmt))
        if kw is None:
            kw = {}
        if not isinstance(kw, Mapping):
            raise ValueError(f"writer_options[{fmt!r}] must be a mapping of writer options, got {kw!r}")
        if cls.name not in formats:
            raise ValueError(f"writer_options given for {cls.name}, which is not an output format "
                             f"({', '.join(formats)})")
        cls.check_options(**dict(kw))
        out[cls.name] = dict(kw)
    return out


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _check_float(name: str, v, lo: float, strict: bool) -> None:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < lo or (strict and f == lo):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lo}, got {v!r}")


ErrorRecord = Tuple[str, str, str]  # (utt_id, path, reason)


class ErrorPolicy:
    """``--on_error`` and ``--max_errors``, applied in one place.

    Worker side (:class:`spk_toolkit.engine.run.ShardAccumulator`): :meth:`record` each failed utterance; it
    raises at once under ``on_error="raise"``, or when this worker alone has more than ``max_errors`` (which
    implies the run has). Driver side (:func:`spk_toolkit.engine.extract`): :meth:`record_many` the
    errors of every finished shard, resumed ones and header-pass refusals included, so the limit is on the whole
    run whatever the executor.

    Parameters
    ----------
    on_error : {"skip", "raise"}
    max_errors : int
        -1 = no limit.
    warn : callable, optional
        ``warn(record)`` for each skipped utterance (a log line).

    Raises
    ------
    ExtractionError
        From :meth:`record` / :meth:`record_many`, naming the utterance, its path and the reason.
    """

    def __init__(self, on_error: str = "skip", max_errors: int = -1, warn=None):
        self.on_error, self.max_errors, self.warn = on_error, int(max_errors), warn
        self.count = 0
        self.first: Optional[ErrorRecord] = None

    def record(self, rec: ErrorRecord, raise_now: Optional[bool] = None) -> None:
        """Count one failed utterance ``(utt_id, path, reason)``; raise as the policy says.

        ``raise_now`` overrides ``on_error == "raise"`` (the driver passes False for errors a previous run
        recorded in a resumed shard: they count towards ``max_errors`` only).
        """
        self.count += 1
        if self.first is None:
            self.first = rec
        uid, path, reason = rec
        if (self.on_error == "raise") if raise_now is None else raise_now:
            raise UtteranceError(uid, path, reason)
        if self.warn is not None:
            self.warn(rec)
        self.check()

    def record_many(self, recs: Sequence[ErrorRecord], raise_now: Optional[bool] = None) -> None:
        """:meth:`record` each of ``recs`` in order."""
        for r in recs:
            self.record(tuple(r), raise_now=raise_now)

    def check(self) -> None:
        """Raise when more than ``max_errors`` utterances failed so far.

        Raises
        ------
        ExtractionError
            Naming the limit, the count and the first failed utterance.
        """
        if 0 <= self.max_errors < self.count:
            uid, path, reason = self.first
            raise ExtractionError(f"{self.count} utterance(s) failed, more than --max_errors {self.max_errors} "
                                  f"(first: {uid!r} ({path}): {reason}); see errors.tsv and the log")
