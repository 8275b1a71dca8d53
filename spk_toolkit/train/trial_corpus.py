"""The trials of ESPnet's validation iterator: trial ids, batch layouts, labels, and the corpus of unique utterances
an iterator holds (read from the dataset's trial lists without decoding, or from its batches), the same on every
rank. Used by :mod:`spk_toolkit.train.validation` and :meth:`spk_toolkit.train.spk_trainer.SpkTrainer.extract_embed`
(the module docstring of :mod:`spk_toolkit.train.spk_trainer` has the layouts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from espnet2.train.distributed_utils import DistributedOption

from spk_toolkit.io.datadir import Utterance

logger = logging.getLogger(__name__)


#: ``path`` of the in-memory utterances built from a custom iterator's batches (a description only)
IN_MEMORY_PATH = "<in memory, from the trainer's iterator>"


class ValidationError(ValueError):
    """Malformed validation/extraction batch (bad trial id, label other than 0/1, unknown speech layout)."""


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
