"""SpkTrainer's validation: embed each unique utterance of the trials once (through the engine's batch computation),
cosine-score the trials, gather them across ranks, and the metrics ESPnet registers (EER in %, minDCF).

:func:`validate` is the whole of :meth:`spk_toolkit.train.spk_trainer.SpkTrainer.validate_one_epoch`; the policies
(crop averaging, one embedding per utterance, distributed gathering) are in :mod:`spk_toolkit.train.spk_trainer`'s
module docstring.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from spk_toolkit.train.trial_corpus import (_gather_objects, split_trial_id, sync_buffers, trial_labels,
                                            utterance_paths, utterance_rows)

logger = logging.getLogger(__name__)

#: P_target values of the registered minDCF (``mindcf``: 0.05, ESPnet's/VoxSRC's; ``mindcf_p01``: 0.01)
P_TARGETS = (0.01, 0.05)


class UniqueEmbedder:
    """Embeds each utterance id once, in chunks of ``chunk`` utterances, through one backend.

    Parameters
    ----------
    model : torch.nn.Module
        Any module with ESPnet's contract (unwrapped, eval mode; see the module docstring).
    chunk : int
        Utterances per forward (>= 1).
    average : bool
        Keep the crop mean ``(D,)`` (True) or all crops ``(n_crops, D)`` (False).
    features : bool, default=False
        Rows are features ``(n, T, F)`` of a model without frontend (lengths in frames), embedded by the backend's
        ``embed_features``; else waveforms ``(n, T)``.

    Attributes
    ----------
    embeddings : dict str -> np.ndarray float32
    n_rows : int
        Crop rows (or whole utterances) sent to the model.
    n_forward : int
        Forward calls (chunks).

    Raises
    ------
    ValueError
        ``chunk < 1``; from :meth:`EspnetSpeakerModel.from_model` for a module whose embedding dimension cannot
        be found.
    """

    def __init__(self, model: torch.nn.Module, chunk: int, average: bool, features: bool = False):
        from spk_toolkit.backends.espnet import EspnetSpeakerModel

        if chunk < 1:
            raise ValueError(f"chunk (utterances per forward) must be >= 1, got {chunk}")
        self.backend = EspnetSpeakerModel.from_model(model)
        self.model = model
        self.chunk = int(chunk)
        self.average = average
        self.features = bool(features)
        self.embeddings: Dict[str, np.ndarray] = {}
        self._seen: set = set()
        self._pending: List[Tuple[str, torch.Tensor, int]] = []
        self.task_token: Optional[torch.Tensor] = None
        self.paths: Dict[str, str] = {}
        self.sample_rate = self.backend.sample_rate
        self.n_rows = 0
        self.n_forward = 0

    def add(self, utt_id: str, rows: torch.Tensor, length: int) -> None:
        """Queue ``rows`` (n, T) of ``utt_id`` unless seen before; embed when a chunk is full."""
        if utt_id in self._seen:
            return
        self._seen.add(utt_id)
        # a copy of this utterance's rows only: a view would pin the whole batch tensor until the next flush
        self._pending.append((utt_id, rows[:, :length].clone(), length))
        if len(self._pending) >= self.chunk:
            self.flush()

    def _forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.task_token is None:
            return self.backend.embed_features(wav, lengths) if self.features else self.backend.embed(wav, lengths)
        # task tokens are not part of the backend's masked forward: ESPnet's forward on equal-length groups.
        dev = self.backend.device
        out = torch.zeros(wav.shape[0], self.backend.embed_dim)
        for L in torch.unique(lengths).tolist():
            idx = torch.nonzero(lengths == L).flatten()
            tok = self.task_token.to(dev).repeat(len(idx)).unsqueeze(1)
            emb = self.model(speech=wav[idx, :L].to(dev), spk_labels=None, extract_embd=True, task_tokens=tok)
            out[idx] = emb.float().cpu()
        return out

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's outputs ``{"embedding": (N, D)}`` of rows ``(N, T[, F])`` (the backend protocol that
        :func:`spk_toolkit.backends.batch.compute_batch` calls)."""
        return {"embedding": self._forward(wav, lengths)}

    def flush(self) -> None:
        """Embed every queued utterance in one forward, through the engine's batch computation.

        Raises
        ------
        spk_toolkit.UtteranceError
            An utterance with a non-finite embedding (the reason of its ``errors.tsv`` row in an extraction).
        """
        from spk_toolkit.backends.base import OutputKind
        from spk_toolkit.backends.batch import BatchOptions, compute_batch, nonfinite_reason
        from spk_toolkit.data import Batch
        from spk_toolkit.errors import UtteranceError

        if not self._pending:
            return
        counts = [r.shape[0] for _, r, _ in self._pending]
        T = max(r.shape[1] for _, r, _ in self._pending)
        wav = torch.zeros(sum(counts), T, *self._pending[0][1].shape[2:], dtype=torch.float32)  # (N, T[, F])
        lengths = torch.zeros(sum(counts), dtype=torch.int64)
        o = 0
        for (_, r, L), n in zip(self._pending, counts):
            wav[o : o + n, : r.shape[1]] = r
            lengths[o : o + n] = L
            o += n
        # the rows are already ESPnet's crops (or whole utterances): one forward of every row, cut per row
        kinds = {"embedding": OutputKind("vector", "float32", (self.backend.embed_dim,))}
        rows = compute_batch(self, kinds, Batch(wav, lengths, list(range(len(wav))), []),
                             BatchOptions(batch_bins=max(1, wav.shape[0] * wav.shape[1])))["embedding"]
        o = 0
        for (u, _, _), n in zip(self._pending, counts):
            e = np.stack(rows[o : o + n])  # (n_crops, D)
            reason = nonfinite_reason({"embedding": e})
            if reason:
                raise UtteranceError(u, self.paths.get(u, "<validation batch>"), reason)
            # the crop mean as the engine takes it (float64, then float32)
            self.embeddings[u] = e.astype(np.float64).mean(axis=0).astype(np.float32) if self.average else e
            o += n
        self.n_rows += int(sum(counts))
        self.n_forward += 1
        self._pending = []


def embed_trials(net: torch.nn.Module, iterator: Iterable) -> Tuple[Optional[UniqueEmbedder], List[str], List[str],
                                                                     List[str], np.ndarray]:
    """Embed the unique utterances of this rank's trials once.

    Parameters
    ----------
    net : torch.nn.Module
        The unwrapped model in eval mode (a model whose ``frontend`` is None is fed features).
    iterator : iterable of (list of str, dict)
        ESPnet's validation iterator of trial pairs.

    Returns
    -------
    embedder : UniqueEmbedder or None
        Its ``embeddings`` (None when the iterator yielded nothing).
    enroll, test, trial_ids : list of str
        Per trial, in iterator order.
    labels : np.ndarray of int8, shape (n_trials,)

    Raises
    ------
    ValidationError
        Malformed trial id, label other than 0/1, missing ``speech2``.
    spk_toolkit.UtteranceError
        An utterance with a non-finite embedding.
    """
    features = hasattr(net, "frontend") and net.frontend is None  # (B, n_crops, T, F) / (B, T, F) features
    emb: Optional[UniqueEmbedder] = None
    enroll: List[str] = []
    test: List[str] = []
    trial_ids: List[str] = []
    labels: List[np.ndarray] = []
    for ids, batch in iterator:
        assert isinstance(batch, dict), type(batch)
        if emb is None:
            emb = UniqueEmbedder(net, max(1, len(ids)), average=True, features=features)
            emb.paths = utterance_paths(iterator)
        emb.chunk = max(emb.chunk, len(ids))  # ESPnet's forward batch: as many utterances as the largest batch
        if "task_tokens" in batch:
            emb.task_token = batch["task_tokens"][0]
        labels.append(trial_labels(batch, len(ids)))
        r1s, r2s = utterance_rows(batch, "speech", features), utterance_rows(batch, "speech2", features)
        for tid, (r1, l1), (r2, l2) in zip(ids, r1s, r2s):
            u1, u2 = split_trial_id(tid)
            enroll.append(u1)
            test.append(u2)
            trial_ids.append(tid)
            emb.add(u1, r1, l1)
            emb.add(u2, r2, l2)
    if emb is not None:
        emb.flush()
    return emb, enroll, test, trial_ids, (np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8))


def gather_trials(trial_ids: List[str], scores: np.ndarray, labels: np.ndarray, world: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Every rank's trials, sorted by trial id, each trial once: ``(scores float64, labels int8)``.

    Trials seen on more than one rank (ESPnet's sampler pads the last batch) are counted once, with a warning.
    """
    gathered = _gather_objects((trial_ids, scores, labels), world)
    all_ids = [t for g in gathered for t in g[0]]
    scores = np.concatenate([g[1] for g in gathered]).astype(np.float64)
    labs = np.concatenate([g[2] for g in gathered]).astype(np.int8)
    order = np.argsort(np.asarray(all_ids, dtype=object), kind="stable") if all_ids else np.zeros(0, int)
    ids_sorted = [all_ids[i] for i in order]
    keep = np.ones(len(order), dtype=bool)
    if len(ids_sorted) > 1:
        keep[1:] = np.asarray(ids_sorted[1:], dtype=object) != np.asarray(ids_sorted[:-1], dtype=object)
    if not keep.all():
        logger.warning("validation: %d trials seen on more than one rank counted once", int((~keep).sum()))
    return scores[order][keep], labs[order][keep]


def validation_stats(scores: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """What the validation registers: ``eer`` (%), ``mindcf`` (P_target 0.05), ``mindcf_p01`` (0.01),
    ``n_trials``, ``trg_mean`` / ``trg_std`` / ``nontrg_mean`` / ``nontrg_std`` (population std).

    With no trials, or only one class, EER is undefined: ``eer=100``, ``mindcf=1`` (the worst values, so such an
    epoch never becomes the best model), with a warning. Metrics: :func:`spk_toolkit.metrics.compute_metrics`.
    """
    from spk_toolkit.metrics import compute_metrics

    tar, non = scores[labels == 1], scores[labels == 0]
    stats = {
        "n_trials": int(scores.shape[0]),
        "trg_mean": float(tar.mean()) if tar.size else float("nan"),
        "trg_std": float(tar.std()) if tar.size else float("nan"),
        "nontrg_mean": float(non.mean()) if non.size else float("nan"),
        "nontrg_std": float(non.std()) if non.size else float("nan"),
    }
    if tar.size == 0 or non.size == 0:
        logger.warning("validation: %d target and %d nontarget trials; EER undefined, registering eer=100, "
                       "mindcf=1", tar.size, non.size)
        return dict(eer=100.0, mindcf=1.0, mindcf_p01=1.0, **stats)
    m = compute_metrics(scores, labels, p_targets=P_TARGETS)
    return dict(eer=100.0 * float(m["eer"]), mindcf=float(m["min_dcf"][0.05]), mindcf_p01=float(m["min_dcf"][0.01]),
                **stats)


def validate(net: torch.nn.Module, iterator: Iterable, rank: int, world: int) -> Tuple[Dict[str, float], dict]:
    """One validation: embed (:func:`embed_trials`), cosine-score, gather (:func:`gather_trials`), metrics.

    Parameters
    ----------
    net : torch.nn.Module
        Unwrapped, in eval mode; with ``world > 1`` its buffers are first broadcast from rank 0.
    iterator : iterable of (list of str, dict)
    rank, world : int

    Returns
    -------
    stats : dict
        :func:`validation_stats` of every rank's trials (the same on every rank).
    counts : dict
        This rank's ``rank``, ``world_size``, ``n_trials``, ``n_unique_utts``, ``n_rows``, ``n_forward``.
    """
    from spk_toolkit.scoring import cosine_score

    if world > 1:
        sync_buffers(net)
    emb, enroll, test, trial_ids, labels = embed_trials(net, iterator)
    scores = cosine_score(emb.embeddings, (enroll, test)) if trial_ids else np.zeros(0, dtype=np.float64)
    counts = {
        "rank": rank, "world_size": world, "n_trials": len(trial_ids),
        "n_unique_utts": 0 if emb is None else len(emb.embeddings),
        "n_rows": 0 if emb is None else emb.n_rows, "n_forward": 0 if emb is None else emb.n_forward,
    }  # fmt: skip
    del emb
    return validation_stats(*gather_trials(trial_ids, scores, labels, world)), counts
