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

import logging
import os
import socket
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import torch
from espnet2.train.distributed_utils import DistributedOption
from espnet2.train.reporter import SubReporter
from espnet2.train.trainer import Trainer, TrainerOptions

# the trial corpus and the validation live in their own modules; their names stay importable from here
from spk_toolkit.train.trial_corpus import (  # noqa: F401
    IN_MEMORY_PATH, TaskTokenModel, TrialCorpus, ValidationError, batch_corpus, corpus_on_every_rank, dist_info,
    espnet_trial_corpus, split_trial_id, sync_buffers, trial_labels, unwrap_model, utterance_paths, utterance_rows)
from spk_toolkit.train.validation import P_TARGETS, UniqueEmbedder, validate  # noqa: F401

logger = logging.getLogger(__name__)

#: engine options :meth:`SpkTrainer.extract_embed` sets itself (not settable through ``extract_options``)
EXTRACT_FIXED = ("output_format", "on_error", "max_errors", "max_batch_size", "crops", "crop_duration",
                 "average_crops")


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
        rank, world = dist_info(distributed_option)
        net = unwrap_model(model)
        net.eval()
        stats, cls.last_validation = validate(net, iterator, rank, world)
        reporter.register(stats=stats)

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
