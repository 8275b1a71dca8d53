"""The Python API for people: embed a file, a list of files or waveforms, verify a pair, list the models.

Every function here runs on the backends' own pipeline steps (:meth:`EmbeddingModel.embed_utterances`: the
engine's decoding, resampling, validation, preparation and length-bucketed batches), so an embedding equals what
:func:`spk_toolkit.extract_embeddings` stores for the same audio, and :func:`verify` is the cosine score of
:func:`spk_toolkit.scoring.cosine_score`. Nothing is written to disk.

Example::

    import spk_toolkit
    e = spk_toolkit.embed_file("a.wav")                        # (256,) float32, resemblyzer (offline default)
    E = spk_toolkit.embed_files(["a.wav", "b.flac"])           # (2, 256), input order
    r = spk_toolkit.verify("a.wav", "b.wav", threshold=0.75)   # Verification(score=0.81, decision=True, ...)
    spk_toolkit.available_models()                             # what is registered, usable, and how to install

Models are given by name (``"resemblyzer"``, ``"espnet"`` with ``train_config=``/``model_file=`` or
``model_tag=``), by an unpacked ESPnet model directory, or as a built :class:`EmbeddingModel`; built models are
cached per name and arguments (:func:`get_model`), so repeated calls do not reload weights.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = ["Verification", "get_model", "embed_file", "embed_files", "embed_waveforms", "verify",
           "available_models"]

PathLike = Union[str, os.PathLike]
ModelLike = Union[str, os.PathLike, "EmbeddingModel"]  # noqa: F821 (spk_toolkit.backends.base)

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


class Verification(NamedTuple):
    """Result of :func:`verify`.

    Attributes
    ----------
    score : float
        Cosine similarity of the two embeddings, in [-1, 1] (higher = more likely the same speaker).
    decision : bool or None
        ``score >= threshold`` (True = same speaker); None when no threshold was given.
    threshold : float or None
        The threshold used.
    """

    score: float
    decision: Optional[bool]
    threshold: Optional[float]


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def get_model(model: ModelLike = "resemblyzer", **model_kwargs):
    """The backend a name (or directory) stands for, built once and cached (the last few are kept).

    Parameters
    ----------
    model : str, path or EmbeddingModel, default="resemblyzer"
        A registry name (:func:`available_models`), a model spelling :func:`spk_toolkit.models.resolve_model`
        understands (an unpacked ESPnet model directory or ``config.yaml``, ``espnet:<model_tag>``), or a built
        model (returned as it is).
    **model_kwargs
        Backend constructor arguments (``device``, ``train_config``, ``model_file``, ``model_tag``, ...).

    Returns
    -------
    EmbeddingModel

    Raises
    ------
    ValueError
        Unknown name (the message lists the registered names).
    ImportError
        The backend's toolkit is not installed (the message says how to install it).
    """
    from spk_toolkit.backends.base import EmbeddingModel
    from spk_toolkit.models import resolve_model

    if isinstance(model, EmbeddingModel):
        if model_kwargs:
            raise ValueError(f"model is already built; constructor arguments {sorted(model_kwargs)} do not apply")
        return model
    toolkit, kwargs = resolve_model(model, **model_kwargs)
    key = (toolkit, _freeze(kwargs))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE[key] = _CACHE.pop(key)  # most recently used last
            return _CACHE[key]
    from spk_toolkit.backends.base import load_model

    built = load_model(toolkit, **kwargs)
    with _CACHE_LOCK:
        _CACHE[key] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    return built


def embed_files(paths: Sequence[PathLike], model: ModelLike = "resemblyzer", *, prepare: bool = True,
                batch_bins: int = 16000 * 240, num_workers: int = 0, min_duration: Optional[float] = None,
                allow_pipes: bool = False, **model_kwargs) -> np.ndarray:
    """Embed audio files (wav, flac, ogg, ... at any rate, any channel count) as the pipeline does.

    Parameters
    ----------
    paths : sequence of path
        Audio files (or ``cmd |`` pipes with ``allow_pipes``).
    model : str, path or EmbeddingModel, default="resemblyzer"
        See :func:`get_model`.
    prepare : bool, default=True
        The backend's preparation (resemblyzer: volume normalisation and VAD), as in the pipeline.
    batch_bins : int, default=16000*240
        Bound on padded samples per forward (memory).
    num_workers : int, default=0
        Decoding processes (0 = decode here).
    min_duration : float, optional
        Seconds; shorter files are refused (default: the pipeline's ``--min_duration``, 0.1 s).
    allow_pipes : bool, default=False
    **model_kwargs
        Backend constructor arguments (:func:`get_model`).

    Returns
    -------
    np.ndarray of shape (N, D), float32
        One embedding per file, in input order (resemblyzer: L2-normalised; ESPnet: not normalised).

    Raises
    ------
    spk_toolkit.AudioLoadingError
        A file is missing, unreadable, too short or silent (names the file and the reason).
    """
    from spk_toolkit.io.audio import DEFAULT_MIN_DURATION
    from spk_toolkit.io.datadir import Utterance

    m = get_model(model, **model_kwargs)
    utts = [Utterance(str(i), os.fspath(p)) for i, p in enumerate(paths)]
    return m.embed_utterances(utts, prepare=prepare, batch_bins=batch_bins, num_workers=num_workers,
                              min_duration=DEFAULT_MIN_DURATION if min_duration is None else min_duration,
                              allow_pipes=allow_pipes)


def embed_file(path: PathLike, model: ModelLike = "resemblyzer", *, start: Optional[float] = None,
               end: Optional[float] = None, prepare: bool = True, **model_kwargs) -> np.ndarray:
    """Embed one audio file (or a segment of it) as the pipeline does.

    Parameters
    ----------
    path : path
        Audio file (any format libsndfile reads, any rate, mono or multi-channel: channels are averaged).
    model : str, path or EmbeddingModel, default="resemblyzer"
        See :func:`get_model`.
    start, end : float, optional
        Segment bounds in seconds (as Kaldi ``segments``).
    prepare : bool, default=True
        The backend's preparation (resemblyzer: volume normalisation and VAD), as in the pipeline.
    **model_kwargs
        Backend constructor arguments (:func:`get_model`).

    Returns
    -------
    np.ndarray of shape (D,), float32
        Equal (to float rounding) to what ``spk_inference`` stores for this file.

    Raises
    ------
    spk_toolkit.AudioLoadingError
        Missing, unreadable, too short or silent audio (names the file and the reason).
    """
    from spk_toolkit.io.datadir import Utterance

    m = get_model(model, **model_kwargs)
    u = Utterance("0", os.fspath(path), start=start, end=end)
    return m.embed_utterances([u], prepare=prepare)[0]


def embed_waveforms(waves, sample_rate: Optional[int] = None, model: ModelLike = "resemblyzer", *,
                    prepare: bool = True, batch_bins: int = 16000 * 240, **model_kwargs) -> np.ndarray:
    """Embed waveforms in memory (numpy arrays or torch tensors) at a rate you state.

    Parameters
    ----------
    waves : sequence of array-like of shape (T_i,), or array-like of shape (N, T)
        Mono float waveforms in [-1, 1].
    sample_rate : int
        Their rate in Hz. Required (never guessed); resampled to the model's rate with soxr, as the pipeline does.
    model : str, path or EmbeddingModel, default="resemblyzer"
        See :func:`get_model`.
    prepare : bool, default=True
        The backend's preparation (resemblyzer: volume normalisation and VAD), as in the pipeline.
    batch_bins : int, default=16000*240
    **model_kwargs
        Backend constructor arguments (:func:`get_model`).

    Returns
    -------
    np.ndarray of shape (N, D), float32

    Raises
    ------
    ValueError
        No ``sample_rate``, or a waveform that is not 1-D.
    spk_toolkit.AudioLoadingError
        A waveform the pipeline refuses (too short, silent, non-finite), naming its index.
    """
    return get_model(model, **model_kwargs).embed_waveforms(waves, sample_rate, prepare=prepare,
                                                            batch_bins=batch_bins)


def _embedding_of(x, m, sample_rate: Optional[int]) -> np.ndarray:
    if isinstance(x, (str, os.PathLike)):
        return embed_file(x, m)
    if isinstance(x, tuple) and len(x) == 2 and np.isscalar(x[1]):
        return m.embed_waveforms([x[0]], x[1])[0]
    return m.embed_waveforms([x], sample_rate)[0]


def verify(a, b, model: ModelLike = "resemblyzer", *, threshold: Optional[float] = None,
           sample_rate: Optional[int] = None, **model_kwargs) -> Verification:
    """Score one pair of recordings: cosine similarity of their embeddings, and a decision at ``threshold``.

    Parameters
    ----------
    a, b : path, (waveform, sample_rate) tuple, or waveform
        Audio files, or 1-D waveforms (numpy or torch) with their rate (in the tuple or ``sample_rate``).
    model : str, path or EmbeddingModel, default="resemblyzer"
        See :func:`get_model`.
    threshold : float, optional
        Accept (same speaker) when ``score >= threshold``. Thresholds depend on the model and the data: take the
        EER or minDCF threshold that ``spk_score`` reports on trials like yours (``metrics.json``).
    sample_rate : int, optional
        Rate of waveforms given without one.
    **model_kwargs
        Backend constructor arguments (:func:`get_model`).

    Returns
    -------
    Verification
        ``(score, decision, threshold)``; ``score`` equals :func:`spk_toolkit.scoring.cosine_score` of the two
        embeddings.

    Raises
    ------
    spk_toolkit.AudioLoadingError
        Unusable audio (names the file and the reason).
    ValueError
        A waveform without a sample rate.
    """
    from spk_toolkit.scoring import cosine_score

    m = get_model(model, **model_kwargs)
    ea, eb = _embedding_of(a, m, sample_rate), _embedding_of(b, m, sample_rate)
    score = float(cosine_score({"a": ea, "b": eb}, (["a"], ["b"]))[0])
    if threshold is None:
        return Verification(score, None, None)
    return Verification(score, bool(score >= float(threshold)), float(threshold))


def available_models():
    """Every registered backend, whether it is usable here and what it needs (:func:`spk_toolkit.backends.base.available_models`).

    Returns
    -------
    list of dict
        ``{"name", "available", "missing", "requires", "install", "description", "sample_rate", "embed_dim"}``.
    """
    from spk_toolkit.backends.base import available_models as _available

    return _available()
