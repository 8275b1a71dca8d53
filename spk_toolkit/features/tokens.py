"""Discrete tokens: the nearest centroid of a k-means codebook for every frame of any feature extractor.

``token[t] = argmin_k ||x[t] - c[k]||^2`` over the ``(K, F)`` codebook, computed in float64 from the inner
extractor's float32 frames (before any float16 cast), ties to the lowest index (``torch.argmin``). Each frame's
token depends on that frame only, and the inner extractors are exact per utterance, so tokens are batch
invariant. Tokens are stored as integers (int16 for K <= 32768, else int32), never as floats.

The codebook is a ``.npy`` file (as written by ``np.save``; e.g. ``sklearn.cluster.MiniBatchKMeans
.cluster_centers_`` or the k-means of HuBERT-style tokenisers) or an array; its SHA-256 is part of the cache
description, so a cache is never resumed or read with another codebook.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional

import numpy as np
import torch

from spk_toolkit.backends.base import OutputKind, register_backend
from spk_toolkit.features.base import TOKEN_DTYPES, FeatureExtractor, check_dtype, pad_frames

__all__ = ["KmeansTokens", "nearest_centroid"]

_FRAME_CHUNK = 4096  # frames per distance block: memory (chunk, K) float64


def nearest_centroid(x: torch.Tensor, codebook: torch.Tensor, sq_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) of every row of ``x``.

    Parameters
    ----------
    x : torch.Tensor of shape (T, F)
    codebook : torch.Tensor of shape (K, F), float64
    sq_norms : torch.Tensor of shape (K,), float64, optional
        ``(codebook ** 2).sum(1)`` (computed when absent).

    Returns
    -------
    torch.Tensor of shape (T,), int64
        ``argmin_k ||x_t - c_k||^2``, ties to the lowest ``k``; computed in float64 as ``||c_k||^2 - 2 x_t . c_k``
        (``||x_t||^2`` is the same for every ``k``), in blocks of 4096 frames.
    """
    c = codebook.to(torch.float64)
    n = (c * c).sum(1) if sq_norms is None else sq_norms
    x = x.to(torch.float64)
    out = [torch.argmin(n[None, :] - 2.0 * (x[s: s + _FRAME_CHUNK] @ c.T), dim=1)
           for s in range(0, x.shape[0], _FRAME_CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _load_codebook(codebook) -> tuple:
    path = None
    if isinstance(codebook, (str, os.PathLike)):
        path = os.fspath(codebook)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"k-means codebook not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a .npy array ({e})") from None
    else:
        arr = np.asarray(codebook)
    where = path or "codebook"
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{where}: a k-means codebook must be (K, F), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu" or not np.isfinite(arr).all():
        raise ValueError(f"{where}: the codebook must hold finite real numbers (dtype {arr.dtype})")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    digest = hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()
    return arr, path, digest


@register_backend
class KmeansTokens(FeatureExtractor):
    """Nearest-centroid tokens ``(T',)`` of the frames of an inner feature extractor.

    Parameters
    ----------
    codebook : path or array-like of shape (K, F)
        k-means centroids (``.npy``).
    features : str or FeatureExtractor, default="fbank"
        The inner extractor: a registry name (built with ``features_conf``) or an instance (Python API).
    features_conf : dict, optional
        Options of the inner extractor (``{"num_mel_bins": 80}``; ``{"train_config": ..., "layer": ...}``).
    input : str, optional
        Which sequence output of the inner extractor to quantise (default: its only sequence output).
    dtype : {"int16", "int32", "int64"}, optional
        Token dtype (default int16 when K <= 32768, else int32).
    output : str, default="tokens"
    keep_features : bool, default=False
        Also store the inner extractor's outputs (one pass computes both).
    device : str or torch.device
        Passed to an inner extractor built by name; distances are computed there too.

    Attributes
    ----------
    num_clusters : int
        K.
    inner : FeatureExtractor

    Raises
    ------
    FileNotFoundError
        Missing codebook file.
    ValueError
        A codebook that is not a finite (K, F) array, F different from the inner frames' width, K too large for
        ``dtype``, an inner output that is not a ``(T', F)`` sequence, an unknown inner extractor.

    Examples
    --------
    >>> import numpy as np, torch
    >>> tok = KmeansTokens(np.random.default_rng(0).normal(size=(50, 80)), features="fbank")
    >>> t, n = tok.compute(0.1 * torch.randn(1, 16000), torch.tensor([16000]))["tokens"]
    >>> t.dtype, tuple(t.shape), n.tolist()
    (torch.int64, (1, 98), [98])
    """

    name = "kmeans_tokens"
    description = "discrete tokens (T',) int16/int32: nearest k-means centroid of another extractor's frames"

    def __init__(self, codebook, features="fbank", features_conf: Optional[dict] = None, input: Optional[str] = None,
                 dtype: Optional[str] = None, output: str = "tokens", keep_features: bool = False,
                 device: str | torch.device = "cpu"):
        super().__init__(device=device)
        if isinstance(features, FeatureExtractor):
            if features_conf:
                raise ValueError("features_conf applies to an extractor built by name, not to an instance")
            self.inner = features
        else:
            from spk_toolkit.backends.base import load_model

            inner = load_model(str(features), **{"device": device, **dict(features_conf or {})})
            if not isinstance(inner, FeatureExtractor):
                raise ValueError(f"features={features!r} is an embedding backend, not a feature extractor")
            self.inner = inner
        kinds = self.inner.output_kinds()
        seqs = [n for n, k in kinds.items() if k.kind == "sequence"]
        if input is None:
            if len(seqs) != 1:
                raise ValueError(f"the inner extractor has sequence outputs {seqs}: choose one with input=")
            input = seqs[0]
        if input not in kinds or kinds[input].kind != "sequence" or len(kinds[input].shape) != 1:
            raise ValueError(f"input {input!r} must be a (T', F) sequence output of the inner extractor "
                             f"(outputs: { {n: k.as_dict() for n, k in kinds.items()} })")
        arr, self.codebook_path, self.codebook_sha256 = _load_codebook(codebook)
        K, F = arr.shape
        if F != kinds[input].shape[0]:
            raise ValueError(f"codebook{' ' + self.codebook_path if self.codebook_path else ''} has F={F} columns, "
                             f"the frames of {input!r} have {kinds[input].shape[0]}")
        self.num_clusters = int(K)
        dtype = dtype or ("int16" if K <= 32768 else "int32")
        self.dtype = check_dtype(dtype, TOKEN_DTYPES, "token")
        if K - 1 > np.iinfo(self.dtype).max:
            raise ValueError(f"{K} clusters do not fit {self.dtype} tokens (max {np.iinfo(self.dtype).max}); "
                             "use int32")
        if output in kinds and keep_features:
            raise ValueError(f"output name {output!r} clashes with an output of the inner extractor")
        self.input, self.output, self.keep_features = input, output, bool(keep_features)
        self._codebook = torch.from_numpy(arr).to(self.device)
        self._sq = (self._codebook * self._codebook).sum(1)
        self.sample_rate = self.inner.sample_rate
        self.min_samples = self.inner.min_samples

    def output_kinds(self) -> Dict[str, OutputKind]:
        kinds = {self.output: OutputKind("sequence", self.dtype, ())}
        if self.keep_features:
            kinds.update(self.inner.output_kinds())
        return kinds

    def config(self) -> dict:
        # the inner extractor's whole description: a change of its options, code or weights is named in a diff
        return {"codebook_sha256": self.codebook_sha256, "num_clusters": self.num_clusters,
                "codebook_dim": int(self._codebook.shape[1]), "features": self.inner.describe(), "input": self.input,
                "dtype": self.dtype, "output": self.output, "keep_features": self.keep_features}

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor):
        """Tokens (and, with ``keep_features``, the inner outputs) of a padded batch.

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
        lengths : torch.Tensor of shape (B,), int64

        Returns
        -------
        dict
            ``{output: (tokens (B, T'_max) int64, frame_lengths (B,) int64)}`` (stored as :attr:`dtype`), plus
            the inner extractor's outputs when kept.
        """
        res = self.inner.compute(wav, lengths)
        data, flen = res[self.input]
        with torch.inference_mode():
            rows = [nearest_centroid(data[i, : int(flen[i])].to(self.device), self._codebook, self._sq).cpu()
                    for i in range(data.shape[0])]
        out = {self.output: pad_frames(rows)}
        if self.keep_features:
            out.update(res)
        return out
