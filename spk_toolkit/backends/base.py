"""Backend protocol and registry.

A backend is an :class:`EmbeddingModel`: it maps a zero-padded batch of waveforms ``wav (B, T)`` float32 at
``sample_rate`` Hz with true ``lengths (B,)`` in samples to embeddings ``(B, D)`` float32. Padding must be
invisible: an utterance's embedding may not depend on what it was batched with (DESIGN.md property 1).

Backends register by name with :func:`register_backend`; :func:`load_model` builds one by name. Heavy toolkits
(espnet2, resemblyzer) are imported inside the backend's constructor so ``import spk_toolkit`` stays light.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from typing import Dict, List, Optional, Tuple, Type, Union

import torch

from spk_toolkit.io.audio import DEFAULT_MIN_DURATION

BACKENDS: Dict[str, Type["EmbeddingModel"]] = {}


@contextlib.contextmanager
def full_fp32():
    """Run CUDA matrix products and cuDNN convolutions/RNNs in IEEE float32 inside the block (no TF32).

    On Ampere and newer GPUs PyTorch lets cuDNN use TF32 (10-bit mantissa) by default, which moves embeddings by
    ~1e-4 (measured on an H100: resemblyzer's LSTM gave max abs 3.2e-4 against the CPU). Backends that promise
    equality with a reference implementation wrap their forward in this. No effect on the CPU. Source: PyTorch
    notes, "TensorFloat-32 (TF32) on Ampere (and later) devices" (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``).
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    prev = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        matmul.allow_tf32 = prev


@contextlib.contextmanager
def toolkit_output(logger_name: str):
    """Inside the block, what a toolkit prints on stderr (e.g. at import: ESPnet's "Failed to import Flash
    Attention, using ESPnet default") and the warnings it raises become INFO records of ``logger_name``.

    So they reach ``run.log`` and, with ``-v``, the terminal, but do not clutter a default run. Python-level
    writes only (``print(..., file=sys.stderr)``, ``warnings.warn``); a C library's own stderr is untouched.

    Parameters
    ----------
    logger_name : str
        The toolkit's logger (``"espnet2"``).
    """
    import io
    import logging
    import sys
    import warnings

    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(buf):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            sys.stderr.flush()
    log = logging.getLogger(logger_name)
    for line in buf.getvalue().splitlines():
        if line.strip():
            log.info("%s", line.rstrip())
    for w in caught:
        log.info("%s: %s (%s:%s)", w.category.__name__, w.message, w.filename, w.lineno)


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What a model gives per utterance for one named output (the engine stores exactly this).

    Attributes
    ----------
    kind : {"vector", "sequence"}
        ``vector``: a fixed ``(*shape)`` array per utterance, e.g. an embedding ``(D,)``; the model returns
        ``(B, *shape)``. ``sequence``: a variable-length ``(T', *shape)`` array per utterance (frames, tokens);
        the model returns ``((B, T'_max, *shape), frame_lengths (B,))`` and the engine cuts each row to its length.
    dtype : str
        numpy dtype name the output is stored in (``float16``, ``float32``, ``int16``, ``int32``, ...).
    shape : tuple of int
        Trailing shape: ``(D,)`` for an embedding, ``()`` for a token sequence ``(T',)``, ``(F,)`` for ``(T', F)``.
    """

    kind: str
    dtype: str
    shape: Tuple[int, ...] = ()

    def __post_init__(self):
        import numpy as np

        if self.kind not in ("vector", "sequence"):
            raise ValueError(f"output kind must be 'vector' or 'sequence', got {self.kind!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def as_dict(self) -> dict:
        """JSON form recorded in shards and ``summary.json``."""
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}


#: What :meth:`EmbeddingModel.compute` returns per output name: ``(B, *shape)`` or ``((B, T', *shape), (B,))``.
OutputValue = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def as_batch(wav, lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check and convert a padded batch given as numpy arrays, torch tensors or lists (what ``embed`` accepts).

    Parameters
    ----------
    wav : array-like of shape (B, T) or (T,), float
        Waveforms in [-1, 1]; a 1-D array is one utterance. numpy arrays, torch tensors (any device) and nested
        lists are accepted; the result is float32 (a torch tensor keeps its device).
    lengths : array-like of shape (B,), integer, optional
        True lengths in **samples** (default: ``T`` for every row). Float values are accepted when they are whole
        numbers of samples.

    Returns
    -------
    wav : torch.Tensor of shape (B, T), float32
    lengths : torch.Tensor of shape (B,), int64, on the CPU

    Raises
    ------
    TypeError
        Integer (PCM) waveforms: convert to float in [-1, 1] first (``x / 32768`` for int16).
    ValueError
        Wrong shapes, lengths outside ``[0, T]``, or relative lengths: SpeechBrain's ``wav_lens`` are fractions
        of ``T`` in (0, 1]; multiply by ``T`` to get samples (the message says how).
    """
    import numpy as np

    if not isinstance(wav, torch.Tensor):
        wav = torch.from_numpy(np.ascontiguousarray(np.asarray(wav)))
    if not (wav.is_floating_point()):
        raise TypeError(f"wav must be floating point in [-1, 1], got {wav.dtype} (for int16 PCM: wav / 32768)")
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2:
        raise ValueError(f"wav must be (B, T) or (T,), got shape {tuple(wav.shape)}")
    wav = wav.to(torch.float32)
    B, T = wav.shape
    if lengths is None:
        return wav, torch.full((B,), T, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.from_numpy(np.asarray(lengths).reshape(-1).copy())
    lengths = lengths.detach().cpu().reshape(-1)
    if lengths.numel() != B:
        raise ValueError(f"{lengths.numel()} lengths for a batch of {B} waveforms")
    if lengths.is_floating_point():
        if B and T > 1 and bool(((lengths > 0) & (lengths <= 1)).all()):
            raise ValueError(
                "lengths look relative (fractions of T in (0, 1], as SpeechBrain's wav_lens): lengths are in "
                f"samples here; pass (wav_lens * {T}).round().long() for this batch of T = {T}")
        if not bool((lengths == lengths.round()).all()):
            raise ValueError(f"lengths must be whole numbers of samples, got {lengths.tolist()[:5]}")
    lengths = lengths.to(torch.int64)
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must be in [0, {T}] samples (T = padded length), got min {int(lengths.min())} "
                         f"max {int(lengths.max())}")
    return wav, lengths


class EmbeddingModel(abc.ABC):
    """A speaker-embedding model usable on padded batches.

    Subclasses define ``name`` (registry key), ``sample_rate`` (Hz the model expects), ``embed_dim`` (D) and
    :meth:`embed`. ``device`` is where the model's parameters live; inputs are moved there.

    Every subclass's :meth:`embed` is wrapped (``__init_subclass__``) by :func:`as_batch`, so callers may pass
    numpy arrays or torch tensors, a 1-D waveform, or no ``lengths``, and relative (SpeechBrain-style) lengths
    are refused with a clear message; the subclass's own code always receives ``(B, T)`` float32 and ``(B,)``
    int64 tensors.

    Attributes
    ----------
    requires : tuple of str
        Importable modules the backend needs (checked by :func:`available_models` without importing them).
    install : str
        How to install what the backend needs (shown by :func:`available_models` and in import errors).
    description : str
        One line for :func:`available_models`.
    tag_argument : str or None
        The constructor argument a ``<name>:<tag>`` spelling fills (espnet: ``model_tag``).
    """

    name: str = ""
    sample_rate: int = 16000
    embed_dim: int = 0
    #: minimum true length in samples the model can embed; shorter utterances are reported as errors.
    min_samples: int = 1
    requires: Tuple[str, ...] = ()
    install: str = ""
    description: str = ""
    #: constructor argument that a ``<name>:<tag>`` model spelling fills (:func:`spk_toolkit.models.resolve_model`)
    tag_argument: Optional[str] = None

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        impl = cls.__dict__.get("embed")
        if impl is None or getattr(impl, "__isabstractmethod__", False) or getattr(impl, "_as_batch", False):
            return

        @functools.wraps(impl)
        def embed(self, wav, lengths=None):
            wav, lengths = as_batch(wav, lengths)
            return impl(self, wav, lengths)

        embed._as_batch = True
        cls.embed = embed

    @abc.abstractmethod
    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed a padded batch of *prepared* waveforms at the model's rate (the engine's per-batch call).

        This is the low-level call: no resampling and no preparation (:meth:`prepare`, e.g. resemblyzer's volume
        normalisation and VAD) happen here, exactly as in the pipeline, where decoding workers prepare each
        utterance before batching. For raw audio use :meth:`embed_waveforms` (any rate, prepared like the
        pipeline) or :func:`spk_toolkit.embed_file`.

        Parameters
        ----------
        wav : torch.Tensor or np.ndarray of shape (B, T) or (T,), float
            Waveforms at :attr:`sample_rate` Hz, zero-padded after each utterance's true length.
        lengths : torch.Tensor or np.ndarray of shape (B,), int, optional
            True lengths in samples (``lengths.max() <= T``; default ``T`` for every row). Relative lengths
            (SpeechBrain's ``wav_lens``) raise ValueError.

        Returns
        -------
        torch.Tensor of shape (B, D), float32, on the CPU
            One embedding per utterance, independent of the batch it came in.
        """

    def output_kinds(self) -> Dict[str, OutputKind]:
        """The named outputs this model produces (default: one float32 ``embedding`` of shape ``(D,)``)."""
        return {"embedding": OutputKind("vector", "float32", (self.embed_dim,))}

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor) -> Dict[str, OutputValue]:
        """Every output of :meth:`output_kinds` for a padded batch (what the engine calls).

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
        lengths : torch.Tensor of shape (B,), int64

        Returns
        -------
        dict
            ``name -> (B, *shape)`` for vector outputs, ``name -> ((B, T'_max, *shape), frame_lengths (B,))``
            for sequence outputs (default: ``{"embedding": self.embed(wav, lengths)}``).
        """
        return {"embedding": self.embed(wav, lengths)}

    def prepare(self, wav: "np.ndarray") -> "np.ndarray":
        """Per-utterance CPU preparation run in DataLoader workers before batching (default: identity).

        Parameters
        ----------
        wav : np.ndarray of shape (T,), float32 at :attr:`sample_rate` Hz

        Returns
        -------
        np.ndarray of shape (T',), float32 (``T' <= T`` for a VAD)
        """
        return wav

    def embed_waveforms(self, wavs, sample_rate: Optional[int] = None, *, prepare: bool = True,
                        batch_bins: int = 16000 * 240, min_duration: float = DEFAULT_MIN_DURATION) -> "np.ndarray":
        """Embed raw waveforms the way the pipeline embeds files: resample, prepare, length-bucket, embed.

        Parameters
        ----------
        wavs : sequence of array-like of shape (T_i,), or array-like of shape (N, T)
            Mono float waveforms (numpy arrays or torch tensors) at ``sample_rate`` Hz; a 2-D array is ``N``
            waveforms of equal length.
        sample_rate : int
            Rate of ``wavs`` in Hz. Required: it is never guessed (a 22.05 kHz waveform taken for 16 kHz gives a
            wrong embedding without any error). Resampled to :attr:`sample_rate` with soxr, as the pipeline does.
        prepare : bool, default=True
            Apply the backend's per-utterance preparation (:meth:`prepare`: resemblyzer's volume normalisation and
            VAD), as the pipeline does; False embeds the waveforms as they are.
        batch_bins : int, default=16000*240
            Bound on padded samples per forward.
        min_duration : float, default=0.1
            Waveforms shorter than this (seconds, after resampling) are refused, as in the pipeline.

        Returns
        -------
        np.ndarray of shape (N, D), float32
            In input order.

        Raises
        ------
        ValueError
            No ``sample_rate``; a waveform that is not 1-D.
        spk_toolkit.AudioLoadingError
            A waveform the pipeline would refuse (too short, silent, non-finite samples), naming its index.
        """
        import numpy as np

        from spk_toolkit.io.datadir import Utterance

        if sample_rate is None:
            raise ValueError(
                f"embed_waveforms needs sample_rate= (Hz of the waveforms): it is never guessed; the model runs at "
                f"{self.sample_rate} Hz and resamples from whatever rate you give")
        sample_rate = int(sample_rate)
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        if isinstance(wavs, (np.ndarray, torch.Tensor)) and wavs.ndim == 2:
            wavs = list(wavs)
        utts = []
        for i, w in enumerate(wavs):
            x = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
            if x.ndim != 1:
                raise ValueError(f"waveform {i} must be 1-D (mono samples), got shape {x.shape}")
            utts.append(Utterance(str(i), f"<waveform {i}>", audio=x.astype(np.float32, copy=False),
                                  sample_rate=sample_rate))
        return self.embed_utterances(utts, prepare=prepare, batch_bins=batch_bins, min_duration=min_duration)

    def embed_utterances(self, utts, *, prepare: bool = True, batch_bins: int = 16000 * 240,
                         min_duration: float = DEFAULT_MIN_DURATION, allow_pipes: bool = False,
                         num_workers: int = 0, crops: int = 0, crop_duration: float = 3.0,
                         average_crops: bool = True, max_chunk_duration: float = 0.0) -> "np.ndarray":
        """Embed utterance records (files, segments or in-memory audio) in memory, with the pipeline's steps.

        The same decoding, resampling, validation and preparation (:class:`spk_toolkit.data.UtteranceDataset`),
        the same length-bucketed batches (:func:`spk_toolkit.data.bucket_batches`), the same batch computation
        (:func:`spk_toolkit.backends.batch.compute_batch`: crops, chunks) and the same non-finite policy as the
        engine, without an output directory; the embedding does not depend on the batch (DESIGN.md property 1),
        so it equals what :func:`spk_toolkit.extract_embeddings` stores for the same audio and options.

        Parameters
        ----------
        utts : sequence of Utterance
        prepare : bool, default=True
            Apply :meth:`prepare` (as the pipeline does).
        batch_bins : int
            Bound on padded samples per forward.
        min_duration : float
            Seconds; shorter utterances are refused (the pipeline's ``--min_duration``).
        allow_pipes : bool
            Run ``cmd |`` sources.
        num_workers : int
            DataLoader decoding workers (0 = decode in this process).
        crops, crop_duration, average_crops : int, float (seconds), bool
            ESPnet's evaluation crops, as ``spk_inference --crops`` (:class:`spk_toolkit.engine.ExtractOptions`).
        max_chunk_duration : float
            Seconds; longer utterances are the length-weighted mean of their chunks (0 = never), as
            ``spk_inference --max_chunk_duration``.

        Returns
        -------
        np.ndarray of shape (N, D), float32, in input order
            ``(N, crops, D)`` with ``crops`` and ``average_crops=False``.

        Raises
        ------
        spk_toolkit.UtteranceError
            The first utterance that cannot be embedded (its audio, or a non-finite embedding), with the message
            and reason ``--on_error raise`` gives (an :class:`~spk_toolkit.io.audio.AudioLoadingError` too).
        ValueError
            Options out of range; a backend without a vector ``embedding`` output.
        """
        import numpy as np

        from spk_toolkit.backends.batch import BatchOptions, compute_batch, nonfinite_reason, stored_kinds
        from spk_toolkit.data import UtteranceDataset, batch_loader, bucket_batches
        from spk_toolkit.errors import UtteranceError
        from spk_toolkit.io.datadir import measure_durations

        opts = BatchOptions(batch_bins=batch_bins, crops=crops, crop_duration=crop_duration,
                            average_crops=average_crops, max_chunk_duration=max_chunk_duration)
        kind = self.output_kinds().get("embedding")
        if kind is None or kind.kind != "vector":
            raise ValueError(f"{self.name} has no vector 'embedding' output (outputs: {sorted(self.output_kinds())}); "
                             "use spk_toolkit.extract_embeddings for other outputs")
        kinds = {"embedding": kind}
        utts = list(utts)
        failed = measure_durations(utts, allow_pipes=allow_pipes)
        for u in utts:
            if u.utt_id in failed:
                raise UtteranceError(u.utt_id, u.path, failed[u.utt_id])
        sr = self.sample_rate
        ds = UtteranceDataset(utts, sr, prepare=self.prepare if prepare else None,
                              min_samples=max(self.min_samples, int(round(min_duration * sr))),
                              allow_pipes=allow_pipes)
        batches = bucket_batches([int(round((u.duration or 0.0) * sr)) for u in utts], batch_bins)
        out = np.zeros((len(utts), *stored_kinds(kinds, opts)["embedding"].shape), dtype=np.float32)
        for batch in batch_loader(ds, batches, num_workers=num_workers):
            if batch.errors:
                i, reason = batch.errors[0]
                raise UtteranceError(utts[i].utt_id, utts[i].path, reason)
            vals = compute_batch(self, kinds, batch, opts)["embedding"]
            for i, v in zip(batch.indices, vals):
                reason = nonfinite_reason({"embedding": v})
                if reason:
                    raise UtteranceError(utts[i].utt_id, utts[i].path, reason)
                out[i] = v
        return out

    def cost(self, num_samples: int) -> float:
        """Relative compute cost of one utterance of ``num_samples`` samples (used for batch planning)."""
        return float(num_samples)

    def describe(self) -> dict:
        """A JSON-serialisable description recorded in ``summary.json`` and the shard plan."""
        return {"toolkit": self.name, "sample_rate": self.sample_rate, "embed_dim": self.embed_dim}


def register_backend(cls: Type[EmbeddingModel]) -> Type[EmbeddingModel]:
    """Class decorator: register ``cls`` under ``cls.name``.

    Raises
    ------
    ValueError
        If the name is empty or already registered.
    """
    if not cls.name:
        raise ValueError(f"backend class {cls.__name__} has no name")
    if cls.name in BACKENDS and BACKENDS[cls.name] is not cls:
        raise ValueError(f"backend name {cls.name!r} registered twice ({BACKENDS[cls.name].__name__}, {cls.__name__})")
    BACKENDS[cls.name] = cls
    return cls


def _import_all() -> None:
    """Fill the registry: import every module of ``spk_toolkit/backends/`` and the extractor modules of
    ``spk_toolkit/features/`` (each class registers itself with :func:`register_backend`; a module imports its
    toolkit lazily), then the plug-ins declared as entry points of ``spk_toolkit.backends`` /
    ``spk_toolkit.features`` (:mod:`spk_toolkit.plugins`). A new backend is one file; nothing lists it."""
    from spk_toolkit.plugins import GROUPS, import_all

    import_all("spk_toolkit.backends", exclude=("base", "batch"), group=GROUPS["backends"])
    # not extractors: the feature cache runs the engine (a layer above); features.espnet is ESPnet glue (it
    # imports espnet2 and registers into ESPnet's own choices, when the ESPnet task or model loader asks)
    import_all("spk_toolkit.features", exclude=("base", "cache", "espnet"), group=GROUPS["features"])


def available_backends() -> list[str]:
    """Names accepted by :func:`load_model` (sorted)."""
    _import_all()
    return sorted(BACKENDS)


def load_model(toolkit: str = "resemblyzer", **kwargs) -> EmbeddingModel:
    """Build a registered backend by name.

    Parameters
    ----------
    toolkit : str
        Registry name, one of :func:`available_backends` (``"resemblyzer"``, ``"espnet"``, and the feature
        extractors ``"fbank"``, ``"mfcc"``, ``"hidden_states"``, ``"kmeans_tokens"``).
    **kwargs
        Passed to the backend's constructor (``device``, model paths, ...).

    Raises
    ------
    ValueError
        If ``toolkit`` is not registered (the message lists the registered names); a ``device`` that is
        misspelt or not on this machine (:func:`spk_toolkit.backends.device.check_device`).
    """
    _import_all()
    if toolkit not in BACKENDS:
        raise ValueError(f"unknown toolkit {toolkit!r}; registered: {', '.join(sorted(BACKENDS))}")
    if kwargs.get("device") is not None:
        from spk_toolkit.backends.device import check_device

        kwargs["device"] = check_device(kwargs["device"])  # one line for a device that is not here, never torch's
    return BACKENDS[toolkit](**kwargs)


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails to import
        return False


def available_models() -> List[dict]:
    """Every registered backend, whether it can be used here, and what it needs (no toolkit is imported).

    Returns
    -------
    list of dict
        Sorted by name; each ``{"name", "available", "missing", "requires", "install", "description",
        "sample_rate", "embed_dim"}``: ``missing`` lists the modules of ``requires`` that cannot be found,
        ``available`` is True when none is missing, ``install`` says how to get them. ``sample_rate`` /
        ``embed_dim`` are the class defaults (a loaded model may say otherwise, e.g. an ESPnet checkpoint).

    Examples
    --------
    >>> import spk_toolkit
    >>> [m["name"] for m in spk_toolkit.available_models()][:1]
    ['espnet']
    """
    _import_all()
    out = []
    for name in sorted(BACKENDS):
        cls = BACKENDS[name]
        missing = [m for m in cls.requires if not _module_available(m)]
        out.append({"name": name, "available": not missing, "missing": missing, "requires": list(cls.requires),
                    "install": cls.install, "description": cls.description,
                    "sample_rate": cls.sample_rate, "embed_dim": cls.embed_dim})
    return out
