"""Feature extractors on the engine's model protocol, and the offline feature / token cache built with them.

Extractors (registered in the one backend registry, so every executor builds them by name from a config):

============== ============================================= ===================================================
name           class                                         output per utterance
============== ============================================= ===================================================
``fbank``      :class:`~spk_toolkit.features.kaldi.KaldiFbank` ``(T', num_mel_bins)`` Kaldi log-mel, float32/16
``mfcc``       :class:`~spk_toolkit.features.kaldi.KaldiMfcc`  ``(T', num_ceps)`` Kaldi MFCC
``hidden_states`` :class:`~spk_toolkit.features.hidden.HiddenStates` ``(T', C)`` one layer of a torch model
``kmeans_tokens`` :class:`~spk_toolkit.features.tokens.KmeansTokens` ``(T',)`` int16/int32 nearest centroids
============== ============================================= ===================================================

Any callable or ``torch.nn.Module`` ``f(wav (B, T), lengths (B,)) -> {name: ((B, T', F), (B,)) or (B, D)}`` becomes
an extractor with :func:`as_extractor` (:class:`~spk_toolkit.features.base.CallableExtractor`).

The cache (:mod:`spk_toolkit.features.cache`, also ``spk_toolkit.cache_features`` / ``spk_toolkit.open_cache``; it
runs the engine, so it sits in the layer above the extractors and this package does not import it):
:func:`~spk_toolkit.features.cache.cache_features` runs an extractor over a corpus on the one
engine (every executor, resume, lock, error policy, summary), :func:`open_cache` reads it back lazily by utterance
id with partial reads, refusing a cache whose recorded extractor differs from the one asked for, and
:class:`CacheDataset` serves it to a ``torch.utils.data.DataLoader``. docs/features.md has the walk-through.
"""
from __future__ import annotations

from spk_toolkit.features.base import CallableExtractor, FeatureExtractor, as_extractor
from spk_toolkit.features.hidden import HiddenStates
from spk_toolkit.features.kaldi import KaldiFbank, KaldiMfcc
from spk_toolkit.features.tokens import KmeansTokens, nearest_centroid

__all__ = ["CallableExtractor", "FeatureExtractor", "HiddenStates", "KaldiFbank", "KaldiMfcc", "KmeansTokens",
           "as_extractor", "available_extractors", "load_extractor", "nearest_centroid"]


def available_extractors() -> list:
    """Registry names of the feature extractors (sorted), e.g. ``["fbank", "hidden_states", ...]``."""
    from spk_toolkit.backends.base import BACKENDS, _import_all

    _import_all()
    return sorted(n for n, c in BACKENDS.items() if issubclass(c, FeatureExtractor))


def load_extractor(name: str, **options) -> FeatureExtractor:
    """Build a registered feature extractor by name (what every executor does on its workers).

    Parameters
    ----------
    name : str
        One of :func:`available_extractors`.
    **options
        Constructor arguments (``device``, ``num_mel_bins``, ``codebook``, ...).

    Raises
    ------
    ValueError
        Unknown name, or a name that is an embedding backend (the extractor names listed).
    """
    from spk_toolkit.backends.base import BACKENDS, _import_all

    _import_all()
    cls = BACKENDS.get(name)
    if cls is None or not issubclass(cls, FeatureExtractor):
        raise ValueError(f"unknown feature extractor {name!r}; registered: {', '.join(available_extractors())}")
    return cls(**options)
