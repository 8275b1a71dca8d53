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
from typing import Dict, Tuple, Type, Union

import torch

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


class EmbeddingModel(abc.ABC):
    """A speaker-embedding model usable on padded batches.

    Subclasses define ``name`` (registry key), ``sample_rate`` (Hz the model expects), ``embed_dim`` (D) and
    :meth:`embed`. ``device`` is where the model's parameters live; inputs are moved there.
    """

    name: str = ""
    sample_rate: int = 16000
    embed_dim: int = 0
    #: minimum true length in samples the model can embed; shorter utterances are reported as errors.
    min_samples: int = 1

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @abc.abstractmethod
    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed a padded batch.

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
            Waveforms at :attr:`sample_rate` Hz, zero-padded after each utterance's true length.
        lengths : torch.Tensor of shape (B,), int64
            True lengths in samples; ``lengths.max() <= T``.

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

    def embed_waveforms(self, wavs: "list[np.ndarray]", batch_bins: int = 16000 * 240) -> "np.ndarray":
        """Convenience: prepare, length-bucket and embed a list of 1-D waveforms at :attr:`sample_rate`.

        Returns
        -------
        np.ndarray of shape (N, D), float32, in input order.
        """
        import numpy as np

        from spk_toolkit.data import bucket_batches, collate

        prepared = [self.prepare(np.asarray(w, dtype=np.float32)) for w in wavs]
        out = np.zeros((len(prepared), self.embed_dim), dtype=np.float32)
        for b in bucket_batches([len(x) for x in prepared], batch_bins):
            batch = collate([(i, prepared[i], None) for i in b])
            out[batch.indices] = self.embed(batch.wav, batch.lengths).numpy()
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


BUILTIN_MODULES = ("resemblyzer", "espnet")


def _import_all() -> None:
    # Importing the modules registers the classes; the modules import their toolkits lazily.
    import importlib

    for name in BUILTIN_MODULES:
        importlib.import_module(f"spk_toolkit.backends.{name}")


def available_backends() -> list[str]:
    """Names accepted by :func:`load_model` (sorted)."""
    _import_all()
    return sorted(BACKENDS)


def load_model(toolkit: str = "resemblyzer", **kwargs) -> EmbeddingModel:
    """Build a registered backend by name.

    Parameters
    ----------
    toolkit : str
        Registry name, one of :func:`available_backends` (``"resemblyzer"``, ``"espnet"``).
    **kwargs
        Passed to the backend's constructor (``device``, model paths, ...).

    Raises
    ------
    ValueError
        If ``toolkit`` is not registered; the message lists the registered names.
    """
    _import_all()
    if toolkit not in BACKENDS:
        raise ValueError(f"unknown toolkit {toolkit!r}; registered: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[toolkit](**kwargs)
