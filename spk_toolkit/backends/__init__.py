"""Speaker-embedding backends (see :mod:`spk_toolkit.backends.base`)."""
from spk_toolkit.backends.base import BACKENDS, EmbeddingModel, available_backends, load_model, register_backend

__all__ = ["BACKENDS", "EmbeddingModel", "available_backends", "load_model", "register_backend"]
