"""SpkTrainer: ESPnet-SPK's trainer with open-set EER validation and extraction on spk_toolkit's engine.

A drop-in replacement for ``espnet2.train.spk_trainer.SpkTrainer`` (same class methods, same signatures; use it
through :class:`spk_toolkit.tasks.spk.SpeakerTask` or ``python -m spk_toolkit.bin.spk_train``). It is a thin
shell (DESIGN.md property 9): embeddings come from the espnet backend's padding-invisible forward
(:meth:`spk_toolkit.backends.espnet.EspnetSpeakerModel.from_model`), extraction from the one engine
(:func:`spk_toolkit.engine.extract`), scores from :func:`spk_toolkit.scoring.cosine_score`, metrics from
:func:`spk_toolkit.metrics.compute_metrics`.

Models
------
Any module with ESPnet's contract ``forward(speech (B, T), speech_lengths (B,) = None, ..., extract_embd=True)
-> (B, D)``: an ``ESPnetSpeakerModel`` (masked, padding-invisible forward where
:func:`spk_toolkit.backends.espnet.masked_support` covers the architecture) or anything else, with or without
parameters or ESPnet's ``frontend`` / ``encoder`` / ``projector`` attributes (the module's own forward on groups
of exactly equal length, said once in the log). The device is that of the module's parameters (else buffers,
else the CPU), never a hard-coded one.

Inputs (ESPnet's validation iterator)
-------------------------------------
Each step yields ``(ids, batch)``: ``ids`` are trial ids ``"<enroll>*<test>"`` (B,), ``batch["speech"]`` /
``batch["speech2"]`` are either

* crops ``(B, n_crops, T_crop)`` from ESPnet's ``SpkPreprocessor`` in validation mode (``num_eval`` crops of
  ``target_duration`` seconds, start points ``linspace(0, len - T_crop, n_crops)``, short utterances wrapped), or
* whole utterances ``(B, T)`` zero-padded, with true lengths in ``speech_lengths`` / ``speech2_lengths``
  (samples; all of ``T`` when absent),

plus ``batch["spk_labels"]`` (B,) or (B, 1) with 1 = target, 0 = nontarget, and optionally ``task_tokens``.
A model whose ``frontend`` is None (``frontend: null``, trained from cached features such as the ``kaldi_ark``
fbank of :func:`spk_toolkit.cache_features`) is fed features instead: ``(B, n_crops, T, F)`` crops (the
``spk_frames`` preprocessor, :mod:`spk_toolkit.features.espnet`) or ``(B, T, F)`` with frame counts, embedded by
:meth:`spk_toolkit.backends.espnet.EspnetSpeakerModel.embed_features`.

Policies (documented choices)
-----------------------------
* **Each unique utterance is embedded once** per validation (a dict keyed by utterance id, O(1) look-up), in
  chunks of as many utterances as the largest batch seen so far has trials (ESPnet's forward batch is the
  largest batch's size). Utterances waiting for a chunk are the only audio held; ESPnet instead keeps every crop
  of every utterance on the device and reads the iterator twice.
* **Crops are averaged**: an utterance's validation embedding is the mean of its raw (not L2-normalised) crop
  embeddings; the score is the cosine of the two means (:func:`spk_toolkit.scoring.cosine_score`, which treats an
  ``(n_crops, D)`` value the same way). This is also what scoring an ``extract_embed`` npz gives. ESPnet instead
  scores ``-mean(cdist)`` over all crop pairs of L2-normalised crops.
* **extract_embed runs on the engine** (:func:`spk_toolkit.engine.extract`): for ESPnet's DataLoader the corpus
  (unique utterances and their audio files) is read from the dataset's trial lists without decoding anything,
  ESPnet's evaluation crops are the engine's ``crops`` option (same start points, same wrapping), and each rank
  decodes only its own duration-balanced shards; shards are committed atomically and a rerun reuses the verified
  ones. No L2 normalisation (ESPnet normalises only its last partial batch): the stored values are the model's
  output as the backend computes it.
* **Metrics** (:mod:`spk_toolkit.metrics`, one sort): ``eer`` in % with linear interpolation between the
  operating points where P_miss - P_fa changes sign; ``mindcf`` at P_target = 0.05 (ESPnet's/VoxSRC's value) and
  ``mindcf_p01`` at P_target = 0.01, C_miss = C_fa = 1, normalised (NIST SRE 2016 eval plan eq. 2-4);
  ``trg_mean``/``trg_std``/``nontrg_mean``/``nontrg_std`` are population mean and standard deviation of the
  target / nontarget cosine scores; ``n_trials``.
* **Distributed**: the device is that of the model (CPU/gloo and CUDA/NCCL alike); the model's buffers are first
  broadcast from rank 0 (ranks' BatchNorm statistics diverge in the last training step, see
  :func:`sync_buffers`), so every rank uses the model rank 0 saves; a ``DistributedDataParallel`` wrapper is
  removed before any forward (its forward would run a collective per call, and ranks embed different numbers of
  utterances). Validation runs no collective inside the loop; afterwards each rank's (trial ids, scores, labels)
  are gathered with ``all_gather_object`` so every rank registers the same metrics. ``extract_embed`` uses the
  engine's torchrun executor inside the existing process group (rank 0 plans and merges).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from espnet2.train.distributed_utils import DistributedOption
from espnet2.train.reporter import SubReporter
from espnet2.train.trainer import Trainer, TrainerOptions

from spk_toolkit.io.datadir import Utterance

logger = logging.getLogger(__name__)

P_TARGETS = (0.01, 0.05)
#: ``path`` of the in-memory utterances built from a custom iterator's batches (a description only)
IN_MEMORY_PATH = "<in memory, from the trainer's iterator>"
#: engine options :meth:`SpkTrainer.extract_embed` sets itself (not settable through ``extract_options``)
EXTRACT_FIXED = ("output_format", "on_error", "max_errors", "max_batch_size", "crops", "crop_duration",
                 "average_crops")


class ValidationError(ValueError):
    """Malformed validation/extraction batch (bad trial id, label other than 0/1, unknown speech layout)."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (the model itself otherwise)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def dist_info(distributed_option: Optional[DistributedOption]) -> Tuple[int, int]:
    """``(rank, world_size)`` of an initialised process group when ``distributed_option.distributed``, else (0, 1)."""
    if (
        distributed_option is not None
        and getattr(distributed_option, "distributed", False)
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def split_trial_id(trial_id: str) -> Tuple[str, str]:
    """``"enr*tst"`` -> ``("enr", "tst")``.

    Raises
    ------
    ValidationError
        The id does not contain exactly one ``*``.
    """
    parts = trial_id.split("*")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValidationError(f"trial id {trial_id!r} is not '<enroll>*<test>' (ESPnet trial.scp keys)")
    return parts[0], parts[1]


def utterance_rows(batch: Dict[str, torch.Tensor], key: str,
                   features: bool = False) -> List[Tuple[torch.Tensor, int]]:
    """Per batch item, the rows to embed and their true length in samples (frames for features).

    Parameters
    ----------
    batch : dict
        ESPnet collated batch.
    key : {"speech", "speech2"}
    features : bool, default=False
        The model has no frontend (``frontend: null``): ``speech`` holds features, ``(B, n_crops, T, F)`` crops
        or ``(B, T, F)`` whole zero-padded utterances (frames in ``<key>_lengths``), e.g. cached fbank.

    Returns
    -------
    list of (rows, length)
        ``rows`` is ``(n_crops, T_crop)`` for crops (``length = T_crop``) or ``(1, T)`` for a whole zero-padded
        utterance (``length`` from ``<key>_lengths``); with ``features``, the same with a trailing ``F`` axis.

    Raises
    ------
    ValidationError
        Missing key or a tensor of another layout.
    """
    if key not in batch:
        raise ValidationError(f"batch has no {key!r} (keys: {sorted(batch)}); validation needs trial pairs")
    x = batch[key]
    if features:
        if x.dim() == 4:
            return [(x[i], int(x.shape[2])) for i in range(x.shape[0])]
        if x.dim() == 3:
            lens = batch.get(f"{key}_lengths")
            lens = [int(x.shape[1])] * x.shape[0] if lens is None else [int(v) for v in lens.reshape(-1).tolist()]
            return [(x[i : i + 1], lens[i]) for i in range(x.shape[0])]
        raise ValidationError(f"{key} must be (B, n_crops, T, F) feature crops or (B, T, F) features (the model has "
                              f"no frontend), got {tuple(x.shape)}")
    if x.dim() == 3:
        return [(x[i], int(x.shape[2])) for i in range(x.shape[0])]
    if x.dim() == 2:
        lens = batch.get(f"{key}_lengths")
        lens = [int(x.shape[1])] * x.shape[0] if lens is None else [int(v) for v in lens.reshape(-1).tolist()]
        return [(x[i : i + 1], lens[i]) for i in range(x.shape[0])]
    raise ValidationError(f"{key} must be (B, n_crops, T) crops or (B, T) utterances, got {tuple(x.shape)}")


def trial_labels(batch: Dict[str, torch.Tensor], n: int) -> np.ndarray:
    """``spk_labels`` of a validation batch as int8 (n,), checked to be 0/1.

    Raises
    ------
    ValidationError
        Missing labels, wrong count, or a value other than 0/1.
    """
    if "spk_labels" not in batch:
        raise ValidationError("validation batch has no spk_labels (trial_label file)")
    lab = batch["spk_labels"].reshape(-1).cpu().numpy()
    if lab.shape[0] != n:
        raise ValidationError(f"{lab.shape[0]} labels for {n} trials")
    bad = ~np.isin(lab, (0, 1))
    if bad.any():
        raise ValidationError(f"trial labels must be 0/1, got {lab[bad][:5].tolist()}")
    return lab.astype(np.int8)


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


def sync_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Broadcast every buffer (BatchNorm running statistics, ...) of ``model`` from rank ``src``.

    After the last training step each DDP rank has updated its BatchNorm running statistics with its own batch
    (DDP re-broadcasts rank 0's buffers only at the *next* forward), so without this every rank would validate a
    slightly different model and the EER would not be that of the checkpoint rank 0 saves. Parameters are
    identical across ranks already (DDP averages gradients).
    """
    for b in model.buffers():
        torch.distributed.broadcast(b.data, src)


def _gather_objects(obj, world: int):
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# extract_embed: the corpus of a trial iterator, for the engine


def check_custom_bs(custom_bs) -> int:
    """``custom_bs`` of :meth:`SpkTrainer.extract_embed` as an int, checked.

    Raises
    ------
    ValueError
        Not an integer >= 1 (``True``, ``2.5``, ``0`` and ``-1`` are refused).
    """
    if isinstance(custom_bs, bool) or not isinstance(custom_bs, (int, np.integer)) or custom_bs < 1:
        raise ValueError(f"custom_bs (utterances per forward) must be an integer >= 1, got {custom_bs!r}")
    return int(custom_bs)


class TaskTokenModel(torch.nn.Module):
    """A speaker model with one task token bound: ``forward(speech, speech_lengths=None, ..., extract_embd=True)``.

    ESPnet's ``extract_embed`` passes the task token of the iterator to every forward as ``task_tokens`` ``(B, 1)``;
    the engine's backend calls the bare contract, so the token is bound here (a buffer, so that it is part of the
    weights fingerprint of :meth:`EspnetSpeakerModel.describe`). The wrapper has no ``frontend`` attribute: the
    backend runs its forward on groups of exactly equal length.

    Parameters
    ----------
    model : torch.nn.Module
        The speaker model (unwrapped).
    token : int
        The task token.
    """

    def __init__(self, model: torch.nn.Module, token: int):
        super().__init__()
        self.model = model
        self.register_buffer("token", torch.tensor([int(token)], dtype=torch.long))

    def forward(self, speech: torch.Tensor, speech_lengths: Optional[torch.Tensor] = None, spk_labels=None,
                extract_embd: bool = True, **kwargs) -> torch.Tensor:
        """``(B, T)`` speech -> ``(B, D)``: ``model(speech, speech_lengths, task_tokens=(B, 1), extract_embd=True)``."""
        tok = self.token.to(speech.device).repeat(speech.shape[0]).unsqueeze(1)
        return self.model(speech, speech_lengths, spk_labels=None, task_tokens=tok, extract_embd=True)


@dataclasses.dataclass
class TrialCorpus:
    """The unique utterances of a trial iterator and how ESPnet would have fed them to the model.

    Attributes
    ----------
    utts : list of Utterance
        Unique utterances sorted by id (the corpus does not depend on the iterator's batching or order): audio
        paths (``source="espnet_dataset"``) or in-memory waveforms (``source="batches"``).
    crops : int
        ESPnet's ``num_eval`` evaluation crops (0 = whole utterances).
    crop_duration : float
        Seconds per crop (``target_duration / sample_rate`` of the preprocessor).
    task_token : int or None
        The one task token of the trials, if they have one.
    source : {"espnet_dataset", "batches"}
        Read from the dataset's trial lists (nothing decoded) or from the iterator's batches.
    """

    utts: List[Utterance]
    crops: int = 0
    crop_duration: float = 3.0
    task_token: Optional[int] = None
    source: str = "espnet_dataset"

    def options(self) -> tuple:
        """``(crops, crop_duration, task_token, source)``."""
        return self.crops, self.crop_duration, self.task_token, self.source

    def digest(self) -> str:
        """sha256 over the options and each utterance's id, path and (in memory) length."""
        h = hashlib.sha256(json.dumps(self.options()).encode())
        for u in self.utts:
            n = "" if u.audio is None else len(u.audio)
            h.update(f"{u.utt_id}\t{u.path}\t{n}\n".encode())
        return h.hexdigest()


def _one_token(tokens: set) -> Optional[int]:
    if len(tokens) > 1:
        raise ValidationError(f"trials with different task tokens {sorted(tokens)[:5]}: extract_embed binds one "
                              "token to every forward (as ESPnet); extract each task separately")
    return next(iter(tokens)) if tokens else None


def _sound_paths(loader) -> Optional[Dict[str, str]]:
    """key -> audio path of an ESPnet ``sound`` loader (one file per key), None for any other loader."""
    from espnet2.fileio.sound_scp import SoundScpReader
    from espnet2.train.dataset import AdapterForSoundScpReader

    inner = getattr(loader, "loader", None)
    if (isinstance(loader, AdapterForSoundScpReader) and isinstance(inner, SoundScpReader)
            and not inner.multi_columns and isinstance(inner.data, dict)):
        return inner.data
    return None


def utterance_paths(iterator) -> Dict[str, str]:
    """``utt_id -> audio path`` of ESPnet's trial DataLoader (its ``trial.scp`` / ``trial2.scp``), to name an
    utterance's file in an error; ``{}`` for any other iterator (the error then names ``<validation batch>``)."""
    loaders = getattr(getattr(iterator, "dataset", None), "loader_dict", None)
    if not isinstance(loaders, dict):
        return {}
    out: Dict[str, str] = {}
    for side, key in enumerate(("speech", "speech2")):
        for tid, path in ((_sound_paths(loaders[key]) if key in loaders else None) or {}).items():
            if tid.count("*") == 1:
                out.setdefault(split_trial_id(tid)[side], path)
    return out


def _sampler_trial_ids(iterator, keys: List[str]) -> List[str]:
    """The trial ids the DataLoader would yield (its ``batch_sampler``), or every key when it has none."""
    bs = getattr(iterator, "batch_sampler", None)
    if bs is None:
        return list(keys)
    out = []
    for batch in bs:
        for k in batch:
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                k = keys[int(k)]  # ESPnetDataset maps an integer index to the first loader's key order
            if not isinstance(k, str):
                raise ValidationError(f"the iterator's batch sampler yields {type(k).__name__} keys, not trial ids")
            out.append(k)
    return out


def espnet_trial_corpus(iterator, sample_rate: Optional[int] = None) -> Optional[TrialCorpus]:
    """The corpus of ESPnet's trial DataLoader, read from its dataset's trial lists without decoding any audio.

    ``iterator.dataset`` must be ESPnet's ``ESPnetDataset`` (``espnet2/train/dataset.py``) whose ``loader_dict``
    has ``speech`` (``trial.scp``: ``enr*tst enroll_wav``) and ``speech2`` (``trial2.scp``: ``enr*tst
    test_wav``) ``sound`` loaders; the trials are those of the DataLoader's ``batch_sampler``. Its ``preprocess``
    gives the crops: None = whole utterances; ESPnet's ``SpkPreprocessor`` in validation mode = ``num_eval``
    crops of ``target_duration`` samples (``espnet2/train/preprocessor.py`` ``SpkPreprocessor._speech_process``,
    reproduced by :func:`spk_toolkit.backends.batch.eval_crops`). A ``task_tokens`` text loader gives the task token.

    Parameters
    ----------
    iterator : object
        Anything; only a DataLoader over such a dataset is recognised.
    sample_rate : int, optional
        The model's rate, to warn when the preprocessor's ``sample_rate`` differs (crop lengths are in seconds).

    Returns
    -------
    TrialCorpus or None
        None when ``iterator`` is not such a DataLoader (another dataset, another loader type such as
        ``kaldi_ark`` or multi-column sound, or a preprocessor other than ``SpkPreprocessor``): read its batches
        with :func:`batch_corpus` instead.

    Raises
    ------
    ValidationError
        A trial id that is not ``enr*tst``, missing from one trial list, or with ``None`` audio; an utterance with
        two different audio paths; a ``SpkPreprocessor`` in training mode (random crops) or with ``num_eval`` <
        1; several task tokens; no trials.
    """
    ds = getattr(iterator, "dataset", None)
    loaders = getattr(ds, "loader_dict", None)
    if not isinstance(loaders, dict) or "speech" not in loaders or "speech2" not in loaders:
        return None
    maps = {k: _sound_paths(loaders[k]) for k in ("speech", "speech2")}
    if any(m is None for m in maps.values()):
        return None
    pre = getattr(ds, "preprocess", None)
    crops, crop_duration = 0, 3.0
    if pre is not None:
        from espnet2.train.preprocessor import SpkPreprocessor

        if type(pre) is not SpkPreprocessor:  # unknown preprocessing: only its batches say what the model sees
            return None
        if pre.train:
            raise ValidationError("the iterator's SpkPreprocessor is in training mode (random crops); extract_embed "
                                  "needs ESPnet's validation iterator (mode='valid': deterministic num_eval crops)")
        if int(pre.num_eval) < 1 or int(pre.target_duration) < 1:
            raise ValidationError(f"SpkPreprocessor num_eval={pre.num_eval}, target_duration={pre.target_duration} "
                                  "samples: both must be >= 1")
        crops, crop_duration = int(pre.num_eval), float(pre.target_duration) / float(pre.sample_rate)
        if sample_rate and int(pre.sample_rate) != int(sample_rate):
            logger.warning("extract_embed: the preprocessor's sample_rate %d differs from the model's %d Hz; crops "
                           "are %.3f s at the model's rate", pre.sample_rate, sample_rate, crop_duration)
    info = getattr(ds, "debug_info", {}) or {}
    names = {k: (info.get(k) or (k,))[0] for k in maps}
    tok_map = loaders.get("task_tokens")
    paths: Dict[str, str] = {}
    tokens = set()
    for tid in _sampler_trial_ids(iterator, list(maps["speech"])):
        sides = split_trial_id(tid)
        for u, key in zip(sides, ("speech", "speech2")):
            p = maps[key].get(tid)
            if p is None:
                raise ValidationError(f"trial {tid!r} is not in {names[key]} ({key})")
            if p == "None":
                raise ValidationError(f"trial {tid!r} has no {key} audio ('None' in {names[key]})")
            old = paths.setdefault(u, p)
            if old != p:
                raise ValidationError(f"utterance {u!r} has two audio paths in the trial lists: {old} and {p} "
                                      f"(trial {tid!r})")
        if tok_map is not None and tid in tok_map:
            tokens.add(int(tok_map[tid]))
    if not paths:
        raise ValidationError(f"no trials in {names['speech']}: nothing to extract")
    return TrialCorpus([Utterance(u, paths[u]) for u in sorted(paths)], crops, crop_duration, _one_token(tokens),
                       "espnet_dataset")


def batch_corpus(iterator: Iterable, sample_rate: int) -> TrialCorpus:
    """The corpus of any other trial iterator: read it once, keep each unique utterance's true-length waveform.

    Parameters
    ----------
    iterator : iterable of (list of str, dict)
        Batches of trials ``ids`` (``enr*tst``) with whole utterances ``speech`` / ``speech2`` ``(B, T)``
        zero-padded and optionally ``speech_lengths`` / ``speech2_lengths`` ``(B,)`` samples (all of ``T``
        when absent), and optionally ``task_tokens``.
    sample_rate : int
        Rate of the waveforms (the model's: ESPnet feeds batches to the model as they are).

    Returns
    -------
    TrialCorpus
        ``source="batches"``, in-memory utterances (``Utterance.audio`` ``(T_i,)`` float32, first occurrence of
        each id) sorted by id. All of them are held in memory.

    Raises
    ------
    ValidationError
        A step that is not ``(ids, dict)``, a missing ``speech`` / ``speech2``, crops ``(B, n_crops, T)`` (their
        source utterances cannot be recovered: pass ESPnet's DataLoader, whose dataset names the audio files, or
        whole utterances), ids and rows of different counts, a malformed trial id, several task tokens, no trials.
    """
    audio: Dict[str, np.ndarray] = {}
    tokens = set()
    for step in iterator:
        if not (isinstance(step, (tuple, list)) and len(step) == 2 and isinstance(step[1], dict)):
            raise ValidationError(f"each step of the iterator must be (trial ids, batch dict), got {type(step).__name__}")
        ids, batch = step
        for key in ("speech", "speech2"):
            if key not in batch:
                raise ValidationError(f"batch has no {key!r} (keys: {sorted(batch)}); extract_embed needs trial pairs")
            if batch[key].dim() == 3:
                raise ValidationError(
                    f"{key} holds crops {tuple(batch[key].shape)} (B, n_crops, T), which cannot be mapped back to "
                    "their utterances: pass ESPnet's DataLoader (its dataset names the audio files and the "
                    "preprocessor the crops) or batches of whole utterances (B, T) with speech_lengths")
        if "task_tokens" in batch:
            tokens.update(int(v) for v in torch.as_tensor(batch["task_tokens"]).reshape(-1).tolist())
        rows = utterance_rows(batch, "speech"), utterance_rows(batch, "speech2")
        if not len(ids) == len(rows[0]) == len(rows[1]):
            raise ValidationError(f"{len(ids)} trial ids for {len(rows[0])} / {len(rows[1])} speech rows")
        for tid, r1, r2 in zip(ids, *rows):
            for u, (r, length) in zip(split_trial_id(tid), (r1, r2)):
                if u not in audio:  # a copy of the true samples only, not a view pinning the batch
                    audio[u] = r[0, :length].detach().to("cpu", torch.float32).numpy().copy()
    if not audio:
        raise ValidationError("the iterator yielded no trials: nothing to extract")
    utts = [Utterance(u, IN_MEMORY_PATH, audio=audio[u], sample_rate=int(sample_rate)) for u in sorted(audio)]
    return TrialCorpus(utts, task_token=_one_token(tokens), source="batches")


def corpus_on_every_rank(build, world: int) -> TrialCorpus:
    """``build()`` on this rank; with ``world > 1``, the same corpus on every rank, or the same error on every rank.

    Ranks exchange a digest (``all_gather_object``). When they differ, ESPnet-dataset corpora (an iterator sharded
    per rank) are united (each rank contributes its utterances and paths); batch corpora must agree.

    Parameters
    ----------
    build : callable
        ``build() -> TrialCorpus`` (may raise).
    world : int

    Raises
    ------
    ValidationError
        Another rank failed (its message), ranks disagree on crops / task token / source, a batch corpus differs
        between ranks, or two ranks give one utterance different paths. This rank's own error is re-raised as
        it is (after the exchange, so no rank waits for a failed one).
    """
    if world == 1:
        return build()
    corpus, err = None, None
    try:
        corpus = build()
    except Exception as e:  # noqa: BLE001 - re-raised after every rank knows
        err = e
    got = _gather_objects((None, corpus.digest()) if err is None else (f"{type(err).__name__}: {err}", None), world)
    if err is not None:
        raise err
    failed = [(r, m) for r, (m, _) in enumerate(got) if m is not None]
    if failed:
        raise ValidationError("; ".join(f"rank {r}: {m}" for r, m in failed))
    if len({d for _, d in got}) == 1:
        return corpus
    parts = _gather_objects((corpus.options(), {u.utt_id: u.path for u in corpus.utts}), world)
    if len({p[0] for p in parts}) != 1 or corpus.source != "espnet_dataset":
        raise ValidationError("the ranks' iterators give different corpora (utterances, crops, task token or "
                              f"source: {[p[0] for p in parts]}); with a custom iterator every rank must yield the "
                              "same whole-utterance trials (or pass ESPnet's DataLoader)")
    paths: Dict[str, str] = {}
    for r, (_, m) in enumerate(parts):
        for u, p in m.items():
            if paths.setdefault(u, p) != p:
                raise ValidationError(f"utterance {u!r}: rank {r} has audio {p}, another rank {paths[u]}")
    return dataclasses.replace(corpus, utts=[Utterance(u, paths[u]) for u in sorted(paths)])


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class SpkTrainer(Trainer):
    """ESPnet speaker trainer: closed-set classification training, open-set EER validation.

    Class methods only (like ESPnet's ``SpkTrainer``); instantiating raises ``RuntimeError``.

    Attributes
    ----------
    last_validation : dict
        This process's counts of the latest :meth:`validate_one_epoch` (``rank``, ``world_size``, ``n_trials``,
        ``n_unique_utts``, ``n_rows``, ``n_forward``), for tests and logs.
    last_extraction : dict
        The latest :meth:`extract_embed` on this rank: ``rank``, ``world_size``, ``executor``, ``source``
        (``espnet_dataset`` | ``batches``), ``n_utts`` (unique utterances of the corpus), ``embedded`` (in
        ``embeddings.npz``), ``crops``, ``average``, ``task_token``, ``decoded`` / ``computed`` (utterances this
        rank decoded / embedded in this call), ``shards`` (the shard ids it computed), ``n_shards``,
        ``shards_resumed`` (reused from a previous run), ``output`` (the merged npz), ``summary`` (the engine's
        summary on rank 0, None elsewhere).
    extract_options : dict
        Extra :class:`spk_toolkit.engine.ExtractOptions` fields for :meth:`extract_embed` (ESPnet's signature has
        no room for them), e.g. ``{"shard_duration": 60.0, "num_workers": 4}``; the fields of
        :data:`EXTRACT_FIXED` are refused. Empty by default (the engine's defaults, ``num_workers=0``).
    """

    last_validation: dict = {}
    last_extraction: dict = {}
    extract_options: dict = {}

    def __init__(self):
        raise RuntimeError("This class can't be instantiated.")

    @classmethod
    @torch.no_grad()
    def validate_one_epoch(
        cls,
        model: torch.nn.Module,
        iterator: Iterable[Dict[str, torch.Tensor]],
        reporter: SubReporter,
        options: TrainerOptions,
        distributed_option: DistributedOption,
    ) -> None:
        """Embed the unique utterances of this rank's trials once, cosine-score the trials, register metrics.

        Parameters
        ----------
        model : torch.nn.Module
            ``ESPnetSpeakerModel`` or any module with its contract (see the module docstring), possibly
            ``DistributedDataParallel``-wrapped. Runs on its own device (parameters, else buffers, else the CPU).
        iterator : iterable of (list of str, dict)
            ESPnet's validation iterator of trial pairs (see the module docstring for the layouts).
        reporter : SubReporter
            Receives ``eer`` (%), ``mindcf`` (P_target 0.05), ``mindcf_p01`` (P_target 0.01), ``n_trials``,
            ``trg_mean``, ``trg_std``, ``nontrg_mean``, ``nontrg_std`` (cosine scores; population std).
        options : TrainerOptions
            Unused (kept for ESPnet's signature).
        distributed_option : DistributedOption
            When distributed, trial ids/scores/labels of all ranks are gathered, so every rank registers the
            same metrics.

        Raises
        ------
        ValidationError
            Malformed trial id, label other than 0/1, missing ``speech2``.

        Notes
        -----
        With no trials, or only one class, EER is undefined: ``eer=100``, ``mindcf=1`` are registered (the
        worst values, so such an epoch never becomes the best model) with a warning.
        """
        from spk_toolkit.metrics import compute_metrics
        from spk_toolkit.scoring import cosine_score

        rank, world = dist_info(distributed_option)
        net = unwrap_model(model)
        net.eval()
        if world > 1:
            sync_buffers(net)
        # a model without frontend (frontend: null) is fed features (cached fbank): (B, n_crops, T, F) / (B, T, F)
        features = hasattr(net, "frontend") and net.frontend is None
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
            # ESPnet's forward batch: as many utterances as the largest batch has trials
            emb.chunk = max(emb.chunk, len(ids))
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
        local_scores = (
            cosine_score(emb.embeddings, (enroll, test)) if trial_ids else np.zeros(0, dtype=np.float64)
        )
        local_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8)
        cls.last_validation = {
            "rank": rank, "world_size": world, "n_trials": len(trial_ids),
            "n_unique_utts": 0 if emb is None else len(emb.embeddings),
            "n_rows": 0 if emb is None else emb.n_rows, "n_forward": 0 if emb is None else emb.n_forward,
        }  # fmt: skip
        del emb

        gathered = _gather_objects((trial_ids, local_scores, local_labels), world)
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
        scores, labs = scores[order][keep], labs[order][keep]

        n = int(scores.shape[0])
        tar, non = scores[labs == 1], scores[labs == 0]
        stats = {
            "n_trials": n,
            "trg_mean": float(tar.mean()) if tar.size else float("nan"),
            "trg_std": float(tar.std()) if tar.size else float("nan"),
            "nontrg_mean": float(non.mean()) if non.size else float("nan"),
            "nontrg_std": float(non.std()) if non.size else float("nan"),
        }
        if tar.size == 0 or non.size == 0:
            logger.warning("validation: %d target and %d nontarget trials; EER undefined, registering eer=100, "
                           "mindcf=1", tar.size, non.size)
            reporter.register(stats=dict(eer=100.0, mindcf=1.0, mindcf_p01=1.0, **stats))
            return
        m = compute_metrics(scores, labs, p_targets=P_TARGETS)
        reporter.register(
            stats=dict(
                eer=100.0 * float(m["eer"]),
                mindcf=float(m["min_dcf"][0.05]),
                mindcf_p01=float(m["min_dcf"][0.01]),
                **stats,
            )
        )

    @classmethod
    @torch.no_grad()
    def extract_embed(
        cls,
        model: torch.nn.Module,
        iterator: Iterable[Dict[str, torch.Tensor]],
        reporter: SubReporter,
        options: TrainerOptions,
        distributed_option: DistributedOption,
        output_dir: str,
        custom_bs: int,
        average: bool = False,
    ) -> None:
        """Embed every unique utterance of a trial iterator through the engine into ``<output_dir>/embeddings.npz``.

        Parameters
        ----------
        model : torch.nn.Module
            ``ESPnetSpeakerModel`` or any module with its contract (see the module docstring), possibly
            ``DistributedDataParallel``-wrapped (unwrapped here); runs on its own device.
        iterator : iterable of (list of str, dict)
            ESPnet's trial DataLoader (``iterator.dataset`` an ``ESPnetDataset`` over ``trial.scp`` /
            ``trial2.scp``): the corpus is read from its trial lists without decoding
            (:func:`espnet_trial_corpus`), its ``SpkPreprocessor`` (validation mode) gives the crops, and each rank
            decodes only its own shards. Any other iterable of whole-utterance batches (``speech`` ``(B, T)``
            with ``speech_lengths``) is read once into memory (:func:`batch_corpus`).
        reporter : SubReporter
            Receives ``n_utts``: the utterances this rank embedded in this call (0 when every shard was resumed).
        options : TrainerOptions
            Unused (ESPnet's signature).
        distributed_option : DistributedOption
            When distributed (world size > 1) the engine's torchrun executor runs in the existing process group:
            rank 0 plans and merges, every rank computes its own duration-balanced shards.
        output_dir : str
            The engine's output directory: ``embeddings.npz`` (``np.savez_compressed``, keys = utterance ids,
            input order = sorted ids, readable with ``np.load``), ``plan.json``, ``shards/``, ``errors.tsv``,
            ``summary.json``. A rerun with the same corpus, model weights and options reuses the verified shards.
        custom_bs : int
            Utterances per batch (>= 1; the engine's ``max_batch_size``; batches are also bounded by padded
            samples, and crops of a batch go through forwards of at most ``batch_bins`` samples).
        average : bool
            With ESPnet's crops: store the crop mean ``(D,)`` instead of the crops ``(num_eval, D)``. Whole
            utterances (no preprocessor, or a batch iterator) are always stored as ``(D,)``.

        Raises
        ------
        ValueError
            ``custom_bs`` is not an integer >= 1, or :attr:`extract_options` sets an option fixed here (both
            before any work, on every rank, so no rank waits at a barrier for a failed one).
        ValidationError
            Malformed trials or batches (see :func:`espnet_trial_corpus`, :func:`batch_corpus`,
            :func:`corpus_on_every_rank`); raised on every rank.
        spk_toolkit.engine.ExtractionError
            An utterance failed (``on_error="raise"``: no partial ``embeddings.npz``), ``output_dir`` holds a
            plan of another corpus, model (weights) or crop setting (use another directory), or is in use.
        spk_toolkit.io.datadir.CorpusError
            From the engine's corpus checks.

        Notes
        -----
        Values are float32 model outputs, never L2-normalised. Engine options besides the fixed ones
        (:data:`EXTRACT_FIXED`) come from :attr:`extract_options` (e.g. ``shard_duration``, ``batch_bins``,
        ``num_workers``); defaults: ``num_workers=0``, ``progress=False``, ``min_duration=0`` (ESPnet embeds every
        utterance; the model's own minimum length still applies). :attr:`last_extraction` holds this rank's
        counts and, on rank 0, the engine's summary.
        """
        from spk_toolkit.backends.espnet import EspnetSpeakerModel
        from spk_toolkit.backends.espnet.model import model_sample_rate
        from spk_toolkit.engine import extract
        from spk_toolkit.engine.run import default_worker_name
        from spk_toolkit.io.rundir import RunDir

        bs = check_custom_bs(custom_bs)
        extra = dict(cls.extract_options or {})
        fixed = sorted(set(extra) & set(EXTRACT_FIXED))
        if fixed:
            raise ValueError(f"SpkTrainer.extract_options cannot set {fixed}: extract_embed fixes them "
                             "(npz output, on_error=raise, max_batch_size=custom_bs, crops from the preprocessor)")
        rank, world = dist_info(distributed_option)
        net = unwrap_model(model)
        net.eval()
        if world > 1:
            sync_buffers(net)
        sr = model_sample_rate(net)
        corpus = corpus_on_every_rank(lambda: espnet_trial_corpus(iterator, sr) or batch_corpus(iterator, sr), world)
        backend = EspnetSpeakerModel.from_model(
            net if corpus.task_token is None else TaskTokenModel(net, corpus.task_token), sample_rate=sr)
        opts = {"num_workers": 0, "progress": False, "min_duration": 0.0, **extra,
                "output_format": ["npz"], "on_error": "raise", "max_batch_size": bs, "crops": corpus.crops,
                "crop_duration": corpus.crop_duration, "average_crops": bool(average)}
        executor = "torchrun" if world > 1 else "inprocess"
        logger.info("extract_embed: %d unique utterances (%s, %s) on the %s executor, rank %d of %d",
                    len(corpus.utts), corpus.source,
                    f"{corpus.crops} crops of {corpus.crop_duration:g} s" if corpus.crops else "whole utterances",
                    executor, rank, world)
        # the torchrun executor runs on the trainer's initialised process group (however ESPnet launched it)
        summary = extract(corpus.utts, output_dir, model=backend, executor=executor, **opts)
        if summary is None:  # ranks > 0: rank 0 merged before releasing them
            summary = RunDir(output_dir).read_summary()
            mine = None
        else:
            mine = summary
        worker = f"rank {rank} ({socket.gethostname()})" if world > 1 else default_worker_name()
        me = summary.get("workers", {}).get(worker, {})
        cls.last_extraction = {
            "rank": rank, "world_size": world, "executor": executor, "source": corpus.source,
            "n_utts": int(summary["utterances"]), "embedded": int(summary["embedded"]),
            "crops": corpus.crops, "average": bool(average), "task_token": corpus.task_token,
            "decoded": int(me.get("decoded", 0)), "computed": int(me.get("utterances", 0)),
            "shards": list(me.get("shards", [])), "n_shards": int(summary["shards"]),
            "shards_resumed": int(summary.get("shards_resumed", 0)),
            "output": str(Path(output_dir) / Path(summary["outputs"]["npz"]).name), "summary": mine,
        }  # fmt: skip
        reporter.register(stats=dict(n_utts=cls.last_extraction["computed"]))


# ----------------------------------------------------------------------------------------------------------------
# standalone validation of a checkpoint


def build_valid_iterator(train_args, distributed_option: Optional[DistributedOption] = None):
    """ESPnet's validation iterator for an experiment's arguments (``valid_data_path_and_name_and_type``, ...).

    Parameters
    ----------
    train_args : argparse.Namespace
        As returned by ``SpeakerTask.build_model_from_file`` (the experiment's ``config.yaml``).
    distributed_option : DistributedOption, optional
        Default: not distributed (every trial).
    """
    from espnet2.tasks.spk import SpeakerTask  # ESPnet's own: the iterator does not depend on the trainer

    from spk_toolkit.features.espnet import register_espnet_choices

    register_espnet_choices()  # preprocessor: spk_frames
    dopt = distributed_option or DistributedOption(distributed=False)
    return SpeakerTask.build_iter_factory(args=train_args, distributed_option=dopt, mode="valid").build_iter(0)


def validate_checkpoint(config: str | os.PathLike, model_file: str | os.PathLike, device: str = "cpu") -> dict:
    """Run :meth:`SpkTrainer.validate_one_epoch` on an experiment's validation trials, in this process.

    Parameters
    ----------
    config : path
        The experiment's ``config.yaml`` (its ``valid_data_path_and_name_and_type`` and preprocessor are used).
    model_file : path
        Checkpoint, e.g. ``exp/<name>/valid.eer.best.pth`` or ``<N>epoch.pth``.
    device : str

    Returns
    -------
    dict
        The registered statistics (``eer`` %, ``mindcf``, ``mindcf_p01``, ``n_trials``, score statistics).
    """
    from espnet2.train.reporter import Reporter

    from spk_toolkit.backends.espnet.checkpoint import build_espnet_model

    model, args = build_espnet_model(str(config), str(model_file), device)  # ESPnet's loader + our checkpoint check
    reporter = Reporter()
    reporter.set_epoch(1)
    with reporter.observe("valid") as sub:
        SpkTrainer.validate_one_epoch(model, build_valid_iterator(args), sub, None,
                                      DistributedOption(distributed=False))
    keys = ("eer", "mindcf", "mindcf_p01", "n_trials", "trg_mean", "trg_std", "nontrg_mean", "nontrg_std")
    return {k: float(reporter.get_value("valid", k)) for k in keys}
