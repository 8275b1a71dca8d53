"""The one batch computation: every output of a model for one padded batch, cut per utterance.

Every path that runs a model on audio calls :func:`compute_batch`: the engine's workers (``spk_inference``,
:func:`spk_toolkit.extract_embeddings`, ``SpkTrainer.extract_embed``, the feature cache), the in-memory API
(:meth:`EmbeddingModel.embed_utterances`) and ``SpkTrainer``'s validation. So ESPnet's evaluation crops
(:func:`eval_crops`), ``max_chunk_duration`` chunking (:func:`chunk_bounds`), the output checks and the one
non-finite policy (:func:`nonfinite_reason`) are the same everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Protocol

import numpy as np
import torch

from spk_toolkit.data import Batch, bucket_batches

#: an :class:`~spk_toolkit.backends.base.OutputKind` (``kind``, ``dtype``, ``shape``); this module does not import
#: base.py, which calls it
OutputKind = Any


class BatchModel(Protocol):
    """What :func:`compute_batch` needs of a model: an :class:`~spk_toolkit.backends.base.EmbeddingModel`, or
    anything with ``sample_rate`` (Hz) and ``compute(wav (B, T), lengths (B,)) -> {name: output}``."""

    sample_rate: int

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor) -> Dict[str, Any]: ...

__all__ = ["BatchOptions", "eval_crops", "chunk_bounds", "compute_batch", "nonfinite_reason", "stored_kinds"]


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """How :func:`compute_batch` runs a batch; the same fields (and meanings) as those of
    :class:`spk_toolkit.engine.ExtractOptions`, which :func:`compute_batch` also accepts.

    Attributes
    ----------
    batch_bins : int
        Bound on padded samples per forward (crops and chunks of a batch are regrouped under it).
    max_batch_size : int
        Bound on rows per forward of chunks (0 = none).
    crops : int
        0 = whole utterances; ``N > 0`` = ESPnet's ``N`` evaluation crops of ``crop_duration`` seconds.
    crop_duration : float
        Seconds per crop.
    average_crops : bool
        With crops: the crop mean ``(*shape)`` (True) or every crop ``(N, *shape)``.
    max_chunk_duration : float
        Seconds; longer utterances are embedded as the length-weighted mean of equal chunks (0 = never).

    Raises
    ------
    ValueError
        A field out of range (naming it), or ``crops`` with ``max_chunk_duration``.
    """

    batch_bins: int = 16000 * 240
    max_batch_size: int = 0
    crops: int = 0
    crop_duration: float = 3.0
    average_crops: bool = True
    max_chunk_duration: float = 0.0

    def __post_init__(self):
        for name, lo in (("batch_bins", 1), ("max_batch_size", 0), ("crops", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name, strict in (("crop_duration", True), ("max_chunk_duration", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 \
                    or (strict and v == 0):
                raise ValueError(f"{name} must be a finite number of seconds {'>' if strict else '>='} 0, got {v!r}")
        if self.crops and self.max_chunk_duration:
            raise ValueError("max_chunk_duration and crops cannot be combined (crops are already bounded)")


def stored_kinds(kinds: Mapping[str, OutputKind], opts) -> Dict[str, OutputKind]:
    """What one utterance's row of each output is after :func:`compute_batch`: with crops not averaged, a vector
    output of shape ``(*shape)`` becomes ``(n_crops, *shape)``; otherwise ``kinds`` unchanged."""
    if opts.crops and not opts.average_crops:
        return {n: dataclasses.replace(k, shape=(opts.crops, *k.shape)) for n, k in kinds.items()}
    return dict(kinds)


def eval_crops(x: np.ndarray, n: int, length: int) -> np.ndarray:
    """ESPnet's deterministic evaluation crops of one waveform (``SpkPreprocessor``, validation mode).

    Parameters
    ----------
    x : np.ndarray of shape (T,)
    n : int
        Number of crops (``num_eval``).
    length : int
        Samples per crop (``target_duration * fs``).

    Returns
    -------
    np.ndarray of shape (n, length)
        ``x`` is first wrapped to ``length + 1`` samples when shorter (``np.pad(x, (0, length - T + 1),
        "wrap")``); crop ``j`` starts at ``int(linspace(0, T - length, n)[j])``. Source:
        ``espnet2/train/preprocessor.py`` ``SpkPreprocessor._speech_process``.
    """
    if len(x) < length:
        x = np.pad(x, (0, length - len(x) + 1), "wrap")
    starts = np.linspace(0, len(x) - length, num=n)
    return np.stack([x[int(s): int(s) + length] for s in starts])


def chunk_bounds(n: int, max_len: int) -> np.ndarray:
    """Boundaries of ``ceil(n / max_len)`` equal consecutive chunks of ``n`` samples (``--max_chunk_duration``).

    Parameters
    ----------
    n : int
        Samples of the utterance (>= 1).
    max_len : int
        Longest chunk in samples (>= 1).

    Returns
    -------
    np.ndarray of int64, shape (k + 1,)
        ``0 = b_0 < b_1 < ... < b_k = n``; chunk lengths differ by at most one sample and are <= ``max_len``.

    Raises
    ------
    ValueError
        ``n`` or ``max_len`` < 1.
    """
    if n < 1 or max_len < 1:
        raise ValueError(f"n and max_len must be >= 1, got {n} and {max_len}")
    k = -(-n // max_len)
    return (np.arange(k + 1, dtype=np.int64) * n) // k


def nonfinite_reason(values: Mapping[str, np.ndarray]) -> Optional[str]:
    """The one non-finite policy: ``"model produced a non-finite <names>"`` when a floating output of one
    utterance holds NaN or inf, else None.

    Parameters
    ----------
    values : dict
        ``name -> array`` of one utterance (any shape).

    Returns
    -------
    str or None
        The ``errors.tsv`` reason (e.g. ``model produced a non-finite embedding``); the utterance is never stored.
    """
    bad = [n for n, v in values.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]
    return f"model produced a non-finite {' and '.join(bad)}" if bad else None


def compute_batch(model: BatchModel, kinds: Dict[str, OutputKind], batch: Batch, opts
                  ) -> Dict[str, List[np.ndarray]]:
    """Every output of ``model`` for one padded batch, cut per utterance.

    Parameters
    ----------
    model : BatchModel
        An ``EmbeddingModel``, or anything with ``compute(wav, lengths)`` and ``sample_rate`` (Hz).
    kinds : dict
        ``model.output_kinds()``.
    batch : Batch
        ``wav (B, T)``, ``lengths (B,)``.
    opts : BatchOptions or ExtractOptions
        ``crops`` / ``crop_duration`` / ``average_crops``: ESPnet's evaluation crops (:func:`eval_crops`), all
        crops of the batch in forwards of at most ``batch_bins`` samples; ``max_chunk_duration``: long
        utterances as the length-weighted mean of their chunks.

    Returns
    -------
    dict
        ``name -> list of B arrays``: ``(*shape)`` per vector output (``(n_crops, *shape)`` with crops not
        averaged), ``(T'_i, *shape)`` per sequence output, in the output's dtype. Values are not checked for
        NaN / inf here (:func:`nonfinite_reason` is the caller's policy per utterance).

    Raises
    ------
    ValueError
        The model returned the wrong batch size, or crops / chunks were asked of a model with sequence outputs.
    """
    if opts.max_chunk_duration and int(batch.lengths.max()) > round(opts.max_chunk_duration * model.sample_rate):
        return _chunked_batch(model, kinds, batch, opts)
    if opts.crops:
        return _cropped_batch(model, kinds, batch, opts)
    B = len(batch.indices)
    res = model.compute(batch.wav, batch.lengths)
    out = {}
    for name, kind in kinds.items():
        val = res[name]
        if kind.kind == "vector":
            arr = val.detach().cpu().numpy()  # (B, *shape)
            if arr.shape[0] != B:
                raise ValueError(f"model output {name!r} has {arr.shape[0]} rows for a batch of {B}")
            out[name] = [arr[i].astype(kind.dtype, copy=False) for i in range(B)]
        else:
            data, flen = val  # (B, T'_max, *shape), (B,)
            arr, flen = data.detach().cpu().numpy(), flen.detach().cpu().numpy()
            if arr.shape[0] != B or flen.shape != (B,):
                raise ValueError(f"model output {name!r}: expected ({B}, T', ...) and ({B},) frame lengths")
            out[name] = [arr[i, : int(flen[i])].astype(kind.dtype, copy=False) for i in range(B)]
    return out


def _vector_only(kinds: Mapping[str, OutputKind], option: str) -> None:
    if any(k.kind != "vector" for k in kinds.values()):
        raise ValueError(f"--{option} applies to vector outputs (embeddings) only")


def _cropped_batch(model: BatchModel, kinds: Dict[str, OutputKind], batch: Batch, opts
                   ) -> Dict[str, List[np.ndarray]]:
    """:func:`compute_batch` with ``crops``: every crop of the batch, in forwards of at most ``batch_bins``."""
    _vector_only(kinds, "crops")
    B = len(batch.indices)
    L = int(round(opts.crop_duration * model.sample_rate))
    wav = batch.wav.numpy()
    # (B, T) -> (B * n_crops, L): every crop has the same length, so there is no padding
    rows = np.concatenate([eval_crops(wav[i, : int(batch.lengths[i])], opts.crops, L) for i in range(B)])
    step = max(1, opts.batch_bins // L)
    parts: Dict[str, list] = {name: [] for name in kinds}
    for s in range(0, len(rows), step):
        chunk = torch.from_numpy(np.ascontiguousarray(rows[s: s + step]))
        res = model.compute(chunk, torch.full((len(chunk),), L, dtype=torch.int64))
        for name in kinds:
            parts[name].append(res[name].detach().float().cpu().numpy())
    out = {}
    for name, kind in kinds.items():
        allc = np.concatenate(parts[name]).reshape(B, opts.crops, *kind.shape)  # (B, n_crops, *shape)
        vals = allc.astype(np.float64).mean(axis=1) if opts.average_crops else allc
        out[name] = [v.astype(kind.dtype) for v in vals]
    return out


def _chunked_batch(model: BatchModel, kinds: Dict[str, OutputKind], batch: Batch, opts
                   ) -> Dict[str, List[np.ndarray]]:
    """:func:`compute_batch` with ``max_chunk_duration``: long utterances as length-weighted means of chunks."""
    _vector_only(kinds, "max_chunk_duration")
    L = int(round(opts.max_chunk_duration * model.sample_rate))
    pieces = []  # (utterance row, start, stop)
    for i in range(len(batch.indices)):
        b = chunk_bounds(int(batch.lengths[i]), L)
        pieces.extend((i, int(b[j]), int(b[j + 1])) for j in range(len(b) - 1))
    lens = [e - s for _, s, e in pieces]
    sums: Dict[str, list] = {name: [None] * len(batch.indices) for name in kinds}
    for group in bucket_batches(lens, max(opts.batch_bins, L), opts.max_batch_size):
        T = max(lens[g] for g in group)
        wav = torch.zeros(len(group), T, dtype=batch.wav.dtype)
        for r, g in enumerate(group):
            i, s0, e0 = pieces[g]
            wav[r, : e0 - s0] = batch.wav[i, s0:e0]
        res = model.compute(wav, torch.tensor([lens[g] for g in group], dtype=torch.int64))
        for name in kinds:
            vals = res[name].detach().cpu().numpy().astype(np.float64)
            for r, g in enumerate(group):
                i = pieces[g][0]
                contrib = vals[r] * lens[g]
                sums[name][i] = contrib if sums[name][i] is None else sums[name][i] + contrib
    total = batch.lengths.numpy().astype(np.float64)
    return {name: [(sums[name][i] / total[i]).astype(kind.dtype) for i in range(len(batch.indices))]
            for name, kind in kinds.items()}
