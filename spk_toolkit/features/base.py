"""The feature-extractor protocol: the engine's model protocol with sequence outputs, plus an adapter for callables.

A feature extractor is an :class:`~spk_toolkit.backends.base.EmbeddingModel` whose :meth:`compute` maps a
zero-padded batch ``wav (B, T)`` float32 at :attr:`sample_rate` Hz with true ``lengths (B,)`` (samples) to named
outputs of declared kinds (:meth:`output_kinds`): ``sequence`` outputs as ``((B, T'_max, *shape),
frame_lengths (B,))`` (fbank ``(T', 80)`` float32/float16, tokens ``(T',)`` int16/int32), ``vector`` outputs as
``(B, *shape)``. The engine cuts every sequence row to its frame length and stores it in the declared dtype; no
padded frame is ever stored. Padding must be invisible: an utterance's frames may not depend on what it was
batched with (DESIGN.md property 1). The built-ins compute on each utterance's true length only.

:meth:`FeatureExtractor.describe` records what the values depend on: the extractor's ``config`` (every option,
defaults filled in), ``code_sha256`` (the source of the extractor classes and of the implementation they call),
weights hashes where a model is involved, and the package versions. It is part of the engine's plan and shard
fingerprints, so a cache computed with other settings, code or weights is never resumed, and
:func:`spk_toolkit.features.cache.open_cache` refuses to read one whose description differs from the one asked for.

Built-ins register in the one backend registry (:func:`spk_toolkit.backends.base.register_backend`), so every
executor builds them by name on its workers (``load_model("fbank", num_mel_bins=80)``); see
:func:`spk_toolkit.features.load_extractor`.
"""
from __future__ import annotations

import abc
import hashlib
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from spk_toolkit.backends.base import EmbeddingModel, OutputKind, OutputValue

__all__ = ["FeatureExtractor", "CallableExtractor", "as_extractor", "pad_frames", "check_batch", "source_sha256",
           "FEATURE_DTYPES", "TOKEN_DTYPES"]

#: dtypes accepted for float feature outputs and for token outputs.
FEATURE_DTYPES = ("float16", "float32", "float64")
TOKEN_DTYPES = ("int16", "int32", "int64")


def check_dtype(dtype: str, allowed: Sequence[str], what: str) -> str:
    """Normalise a dtype name and check it is one of ``allowed``.

    Raises
    ------
    ValueError
        ``dtype`` is not a numpy dtype or not in ``allowed`` (both named).
    """
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"{what} dtype must be one of {', '.join(allowed)}, got {dtype!r}") from None
    if name not in allowed:
        raise ValueError(f"{what} dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return name


def check_batch(wav: torch.Tensor, lengths, min_samples: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate a padded batch; returns ``(wav float32, lengths int64)`` (same device as given).

    Parameters
    ----------
    wav : torch.Tensor of shape (B, T)
    lengths : array-like of shape (B,)
        True lengths in samples, ``min_samples <= lengths <= T``.
    min_samples : int

    Raises
    ------
    ValueError
        ``wav`` not 2-D, a lengths count other than ``B``, a length above ``T`` or below ``min_samples``
        (the offending values quoted).
    """
    if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
        raise ValueError(f"wav must be a (B, T) tensor, got {tuple(getattr(wav, 'shape', ()))}")
    lengths = torch.as_tensor(lengths).to(torch.int64).reshape(-1)
    if lengths.numel() != wav.shape[0]:
        raise ValueError(f"{lengths.numel()} lengths for a batch of {wav.shape[0]}")
    if lengths.numel():
        if int(lengths.max()) > wav.shape[1]:
            raise ValueError(f"length {int(lengths.max())} > padded length {wav.shape[1]}")
        if int(lengths.min()) < min_samples:
            raise ValueError(f"utterance of {int(lengths.min())} samples is shorter than the extractor's minimum "
                             f"{min_samples} samples")
    return wav.to(torch.float32), lengths


def pad_frames(rows: Sequence[torch.Tensor], trailing: Tuple[int, ...] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad per-utterance frame sequences into a batch.

    Parameters
    ----------
    rows : sequence of torch.Tensor, each of shape (T'_i, *trailing)
    trailing : tuple of int
        Trailing shape (used when ``rows`` is empty).

    Returns
    -------
    data : torch.Tensor of shape (B, max T'_i, *trailing)
        Zero after each row's frames (the engine never stores those).
    frame_lengths : torch.Tensor of shape (B,), int64
    """
    flen = torch.tensor([int(r.shape[0]) for r in rows], dtype=torch.int64)
    if not rows:
        return torch.zeros((0, 0, *trailing)), flen
    T = int(flen.max()) if len(flen) else 0
    out = rows[0].new_zeros((len(rows), T, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, flen


def source_sha256(*parts) -> str:
    """Hex SHA-256 identifying code: the source of classes / functions, the bytes of files, or strings.

    Parameters
    ----------
    *parts : class, function, path or str
        A class or function contributes ``inspect.getsource`` (its qualified name when the source is not
        available, e.g. a builtin or a lambda typed at a prompt); an ``os.PathLike`` its file bytes; a ``str``
        itself.
    """
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, os.PathLike):
            with open(p, "rb") as f:
                h.update(f.read())
        elif isinstance(p, str):
            h.update(p.encode("utf-8"))
        else:
            try:
                src = inspect.getsource(p)
            except (OSError, TypeError):
                src = f"{getattr(p, '__module__', '')}.{getattr(p, '__qualname__', type(p).__qualname__)}"
            h.update(src.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def module_weights_sha256(module: torch.nn.Module) -> str:
    """Hex SHA-256 over a module's ``state_dict`` (names, dtypes, shapes, values, in key order)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}\t{t!r}\n".encode())
            continue
        t = t.detach()
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _package_version() -> str:
    import spk_toolkit

    return spk_toolkit.__version__


class FeatureExtractor(EmbeddingModel):
    """Base of feature extractors: named sequence (or vector) outputs of declared kinds, no embedding.

    Subclasses define ``name`` (registry key), :attr:`sample_rate`, :attr:`min_samples`, :meth:`output_kinds`,
    :meth:`compute` and :meth:`config`; optionally :meth:`code_parts` (what else their values depend on) and
    :meth:`extra_description` (weights hashes, file hashes). Register with
    :func:`spk_toolkit.backends.base.register_backend` so executors can build them by name.

    Parameters
    ----------
    device : str or torch.device
        Where the computation runs; inputs are moved there, outputs come back to the CPU.
    """

    name: str = ""
    embed_dim: int = 0

    @abc.abstractmethod
    def output_kinds(self) -> Dict[str, OutputKind]:
        """The named outputs, e.g. ``{"fbank": OutputKind("sequence", "float32", (80,))}``."""

    @abc.abstractmethod
    def compute(self, wav: torch.Tensor, lengths: torch.Tensor) -> Dict[str, OutputValue]:
        """Every output for a padded batch.

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
            Waveforms at :attr:`sample_rate` Hz, zero-padded after each utterance's true length.
        lengths : torch.Tensor of shape (B,), int64
            True lengths in samples.

        Returns
        -------
        dict
            ``name -> ((B, T'_max, *shape), frame_lengths (B,) int64)`` for sequence outputs, ``name -> (B,
            *shape)`` for vector outputs; each utterance's values independent of the batch.
        """

    @abc.abstractmethod
    def config(self) -> dict:
        """Every option that determines the values (JSON-serialisable, defaults filled in)."""

    def code_parts(self) -> List[object]:
        """What the values depend on besides :meth:`config` (classes, functions, files), for ``code_sha256``.

        Default: the source file of every module that defines a :class:`FeatureExtractor` class of this object's
        MRO (built-in or a plug-in's own module: editing it marks its caches stale); a class whose module has no
        file contributes its source.
        """
        parts: Dict[object, None] = {}
        for c in type(self).__mro__:
            if issubclass(c, FeatureExtractor):
                f = getattr(sys.modules.get(c.__module__), "__file__", None)
                parts[Path(f) if f else c] = None
        return list(parts)

    def extra_description(self) -> dict:
        """Further fields of :meth:`describe` (weights hashes, library versions); default none."""
        return {}

    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feature extractors have no embedding.

        Raises
        ------
        TypeError
            Always; use :meth:`compute`.
        """
        raise TypeError(f"{self.name or type(self).__name__} is a feature extractor (outputs "
                        f"{', '.join(self.output_kinds())}); it has no embedding: use compute()")

    def cost(self, num_samples: int) -> float:
        return float(num_samples)

    def describe(self) -> dict:
        """What the cached values depend on (plan and shard fingerprints, ``summary.json``, staleness checks).

        Returns
        -------
        dict
            ``toolkit`` and ``extractor`` (registry name), ``config`` (:meth:`config`), ``outputs`` (kind,
            dtype, trailing shape per output), ``sample_rate`` (Hz), ``code_sha256`` (:func:`source_sha256` of
            :meth:`code_parts`), ``spk_toolkit_version``, ``embed_dim`` (0), plus :meth:`extra_description`.
            The device is not part of it (values do not depend on it beyond float rounding).
        """
        d = {"toolkit": self.name, "extractor": self.name, "config": self.config(),
             "outputs": {n: k.as_dict() for n, k in self.output_kinds().items()},
             "sample_rate": int(self.sample_rate), "code_sha256": source_sha256(*self.code_parts()),
             "spk_toolkit_version": _package_version(), "embed_dim": 0}
        d.update(self.extra_description())
        return d

    def compute_waveforms(self, wavs: Iterable[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        """Convenience: compute the outputs of 1-D waveforms one at a time (batch size 1, the reference).

        Parameters
        ----------
        wavs : iterable of np.ndarray of shape (T,), float32 at :attr:`sample_rate` Hz

        Returns
        -------
        list of dict
            Per waveform, ``name -> (T', *shape)`` (sequence) or ``(*shape)`` (vector), in the declared dtype.
        """
        from spk_toolkit.backends.batch import BatchOptions, compute_batch
        from spk_toolkit.data import Batch

        kinds, opts = self.output_kinds(), BatchOptions()
        out = []
        for w in wavs:
            x = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))[None]
            res = compute_batch(self, kinds, Batch(x, torch.tensor([x.shape[1]]), [0], []), opts)
            out.append({n: v[0] for n, v in res.items()})
        return out


# ------------------------------------------------------------------------------------------------- the adapter
def _as_kind(name: str, spec) -> OutputKind:
    if isinstance(spec, OutputKind):
        return spec
    if isinstance(spec, Mapping):
        return OutputKind(spec.get("kind", "sequence"), spec["dtype"], tuple(spec.get("shape", ())))
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        return OutputKind(*spec)
    raise ValueError(f"output {name!r}: expected an OutputKind, a (kind, dtype[, shape]) tuple or a mapping, "
                     f"got {spec!r}")


def _module_device(module) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


class CallableExtractor(FeatureExtractor):
    """Adapter: any callable or ``torch.nn.Module`` ``f(wav (B, T), lengths (B,)) -> outputs`` as an extractor.

    ``f`` returns a dict ``name -> ((B, T'_max, *shape), frame_lengths (B,))`` for sequence outputs or ``name ->
    (B, *shape)`` for vector outputs (tensors or arrays), or, when exactly one output is declared, that value
    alone. Outputs are checked against the declared kinds; the engine casts them to the declared dtype.

    Parameters
    ----------
    fn : callable or torch.nn.Module
        The computation (the PoC's ``compute_features``, batched). A module is called in eval mode under
        ``torch.inference_mode``; the caller puts it on its device (inputs follow its parameters).
    outputs : mapping
        ``name -> OutputKind`` (or ``(kind, dtype, shape)`` / ``{"kind", "dtype", "shape"}``), e.g.
        ``{"feats": ("sequence", "float16", (768,))}``.
    sample_rate : int, default=16000
        Hz ``fn`` expects (the engine resamples to it).
    per_utterance : bool, default=True
        Call ``fn`` on each utterance alone, on its true length (batch size 1: exact whatever the batch, for
        any ``fn``). False hands ``fn`` the padded batch: only for callables that mask padding themselves.
    min_samples : int, default=1
        Shorter utterances are errors (``errors.tsv``), not inputs.
    config : dict, optional
        Options of ``fn`` that determine its values, recorded in :meth:`describe` (default ``{}``).
    name : str, default="callable"
        Recorded as ``toolkit`` / ``extractor`` (the adapter is not in the registry: executors that build the
        model on other processes, Dask, need a registered extractor).

    Raises
    ------
    TypeError
        ``fn`` is not callable.
    ValueError
        No outputs, or a malformed output kind. At :meth:`compute`: ``fn`` returned a missing output or wrong
        shapes (named, with the shapes found and expected).
    """

    def __init__(self, fn: Callable, outputs: Mapping, sample_rate: int = 16000, per_utterance: bool = True,
                 min_samples: int = 1, config: Optional[dict] = None, name: str = "callable"):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        super().__init__(device=_module_device(fn))
        self.fn = fn
        self.kinds = {n: _as_kind(n, k) for n, k in dict(outputs).items()}
        if not self.kinds:
            raise ValueError("declare at least one output")
        self.sample_rate = int(sample_rate)
        self.per_utterance = bool(per_utterance)
        self.min_samples = max(1, int(min_samples))
        self._config = dict(config or {})
        self.name = name

    def output_kinds(self) -> Dict[str, OutputKind]:
        return dict(self.kinds)

    def config(self) -> dict:
        return {**self._config, "per_utterance": self.per_utterance}

    def code_parts(self) -> List[object]:
        target = type(self.fn) if isinstance(self.fn, torch.nn.Module) else self.fn
        return [*super().code_parts(), target]

    def extra_description(self) -> dict:
        if isinstance(self.fn, torch.nn.Module):
            return {"weights_sha256": module_weights_sha256(self.fn)}
        return {}

    def _call(self, wav: torch.Tensor, lengths: torch.Tensor) -> Dict[str, object]:
        res = self.fn(wav.to(self.device), lengths.to(self.device))
        if not isinstance(res, Mapping):
            if len(self.kinds) != 1:
                raise ValueError(f"the callable returned a {type(res).__name__}, not a dict of the outputs "
                                 f"{sorted(self.kinds)}")
            res = {next(iter(self.kinds)): res}
        missing = [n for n in self.kinds if n not in res]
        if missing:
            raise ValueError(f"the callable returned no output {missing} (returned: {sorted(res)})")
        return res

    def _checked(self, name: str, val, B: int):
        kind = self.kinds[name]
        if kind.kind == "sequence":
            if not isinstance(val, (tuple, list)) or len(val) != 2:
                raise ValueError(f"output {name!r} is a sequence: expected ((B, T', *shape), frame_lengths (B,)), "
                                 f"got {type(val).__name__}")
            data, flen = (torch.as_tensor(v) for v in val)
            if data.dim() != 2 + len(kind.shape) or data.shape[0] != B or tuple(data.shape[2:]) != kind.shape:
                raise ValueError(f"output {name!r}: expected ({B}, T', {', '.join(map(str, kind.shape))}) frames, "
                                 f"got {tuple(data.shape)}")
            flen = flen.to(torch.int64).reshape(-1)
            if flen.numel() != B or (B and (int(flen.max()) > data.shape[1] or int(flen.min()) < 0)):
                raise ValueError(f"output {name!r}: frame lengths {flen.tolist()} do not fit frames "
                                 f"{tuple(data.shape)}")
            return data, flen
        data = torch.as_tensor(val)
        if tuple(data.shape) != (B, *kind.shape):
            raise ValueError(f"output {name!r}: expected {(B, *kind.shape)}, got {tuple(data.shape)}")
        return data

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor) -> Dict[str, OutputValue]:
        """Outputs of ``fn`` for a padded batch (per utterance on its true length unless ``per_utterance=False``).

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
        lengths : torch.Tensor of shape (B,), int64

        Returns
        -------
        dict
            As declared: ``((B, T'_max, *shape), (B,))`` or ``(B, *shape)``, on the CPU.

        Raises
        ------
        ValueError
            Bad batch, or ``fn`` returned missing outputs / wrong shapes.
        """
        wav, lengths = check_batch(wav, lengths, self.min_samples)
        B = wav.shape[0]
        if isinstance(self.fn, torch.nn.Module):
            self.fn.eval()
        with torch.inference_mode():
            if not self.per_utterance:
                res = self._call(wav, lengths)
                out = {}
                for n in self.kinds:
                    v = self._checked(n, res[n], B)
                    out[n] = (v[0].cpu(), v[1].cpu()) if isinstance(v, tuple) else v.cpu()
                return out
            rows: Dict[str, list] = {n: [] for n in self.kinds}
            for i, L in enumerate(lengths.tolist()):
                res = self._call(wav[i: i + 1, :L], lengths[i: i + 1])
                for n, kind in self.kinds.items():
                    v = self._checked(n, res[n], 1)
                    rows[n].append(v[0][0, : int(v[1][0])].cpu() if isinstance(v, tuple) else v[0].cpu())
        out = {}
        for n, kind in self.kinds.items():
            if kind.kind == "sequence":
                out[n] = pad_frames(rows[n], kind.shape)
            else:
                out[n] = torch.stack(rows[n]) if rows[n] else torch.zeros((0, *kind.shape))
        return out


def as_extractor(obj, **kwargs) -> FeatureExtractor:
    """``obj`` itself when it is a :class:`FeatureExtractor`, else a :class:`CallableExtractor` around it.

    Parameters
    ----------
    obj : FeatureExtractor, callable or torch.nn.Module
    **kwargs
        :class:`CallableExtractor` arguments (``outputs`` required for a callable).

    Raises
    ------
    TypeError
        ``obj`` is an embedding backend (not an extractor) or not callable.
    """
    if isinstance(obj, FeatureExtractor):
        return obj
    if isinstance(obj, EmbeddingModel):
        raise TypeError(f"{type(obj).__name__} is an embedding backend; cache its outputs with "
                        "spk_toolkit.extract_embeddings, or wrap a callable with outputs=...")
    if "outputs" not in kwargs:
        raise TypeError("a callable needs outputs={name: (kind, dtype, shape)} to be an extractor")
    return CallableExtractor(obj, **kwargs)
