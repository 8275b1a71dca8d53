"""The exceptions of an extraction, shared by every way of running one (engine, in-memory API, trainer).

:class:`ExtractionError` is what stops a run; :class:`UtteranceError` is the one error of one utterance that could not
be embedded (its audio, or a non-finite model output), raised with the same message by ``--on_error raise`` in the
engine, by the in-memory API (:meth:`spk_toolkit.backends.base.EmbeddingModel.embed_utterances`) and by
``SpkTrainer``'s validation; with ``--on_error skip`` the same ``(utt_id, path, reason)`` is an ``errors.tsv`` row.
"""
from __future__ import annotations

from spk_toolkit.io.audio import AudioLoadingError

__all__ = ["ExtractionError", "UtteranceError"]


class ExtractionError(RuntimeError):
    """Extraction stopped: ``--on_error raise`` met a bad utterance, ``--max_errors`` was exceeded, the output
    directory holds a plan for a different corpus/model, is locked by another run, or a worker failed."""


class UtteranceError(ExtractionError, AudioLoadingError):
    """One utterance could not be embedded: ``utterance '<utt_id>' (<path>): <reason>``.

    Both an :class:`ExtractionError` (what ``--on_error raise`` raises) and an
    :class:`~spk_toolkit.io.audio.AudioLoadingError` (what the in-memory API raised for a bad file).

    Parameters
    ----------
    utt_id : str
    path : str
        The utterance's file, pipe command or ``<waveform i>`` for in-memory audio.
    reason : str
        The one-line reason of its ``errors.tsv`` row (e.g. ``model produced a non-finite embedding``).
    """

    def __init__(self, utt_id: str, path: str, reason: str):
        RuntimeError.__init__(self, f"utterance {utt_id!r} ({path}): {reason}")
        self.utt_id, self.path, self.reason = utt_id, path, reason

    def __reduce__(self):  # picklable across Dask / multiprocessing workers
        return type(self), (self.utt_id, self.path, self.reason)
