"""ESPnet's ``SpeakerTask`` with :class:`spk_toolkit.train.spk_trainer.SpkTrainer` as its trainer.

Everything else (options, model building, preprocessor, iterators) is ESPnet's; only the trainer's
``validate_one_epoch`` / ``extract_embed`` change (single-pass unique-utterance validation, interpolated EER,
correct score statistics, device from the model, resumable compressed extraction), and
:meth:`SpeakerTask.build_model_from_file` refuses a checkpoint that does not cover the model's embedding path
(ESPnet loads checkpoints with ``strict=False``, which would leave the missing weights randomly initialised).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Tuple

import torch
from espnet2.tasks.spk import SpeakerTask as _EspnetSpeakerTask

from spk_toolkit.train.spk_trainer import SpkTrainer

logger = logging.getLogger(__name__)

#: State-dict prefixes a checkpoint may lack: the training loss (AAM-softmax / classification head over the
#: training speakers) is not used to compute embeddings.
NOT_FOR_EMBEDDINGS = ("loss.",)


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The parameter dict of a loaded checkpoint: unwraps DeepSpeed ``module`` and Lightning ``state_dict``
    nesting as ESPnet's ``build_model_from_file`` does (espnet2/tasks/abs_task.py).

    Parameters
    ----------
    obj : object
        What ``torch.load`` returned for the checkpoint.

    Returns
    -------
    dict
        Key -> tensor (parameters and buffers, any shapes).

    Raises
    ------
    ValueError
        ``obj`` (after unwrapping) is not a dict.
    """
    if isinstance(obj, dict) and "module" in obj:
        obj = obj["module"]
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"not a state dict (a {type(obj).__name__})")
    return obj


def legacy_renamed(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state_dict`` with ESPnet's legacy key renaming applied where the model needs it.

    SSL frontends saved before ESPnet commit 0a625088 store ``frontend.upstream.model.*`` where current models
    have ``frontend.upstream.upstream.model.*`` (as ``build_model_from_file`` renames them).

    Parameters
    ----------
    model : torch.nn.Module
        The built model (its keys decide whether the renaming applies).
    state_dict : dict
        Checkpoint key -> tensor (any shapes; tensors are not copied).

    Returns
    -------
    dict
        ``state_dict`` itself, or a new dict with the legacy keys renamed. Raises nothing.
    """
    old, new = "frontend.upstream.model", "frontend.upstream.upstream.model"
    if any(old in k for k in state_dict) and any(new in k for k in model.state_dict()):
        return {k.replace(old, new): v for k, v in state_dict.items()}
    return state_dict


def checkpoint_coverage(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Compare a checkpoint's keys with a model's.

    Parameters
    ----------
    model : torch.nn.Module
        The ESPnet speaker model (``frontend``, ``normalize``, ``encoder``, ``pooling``, ``projector``, ``loss``).
    state_dict : dict
        The checkpoint's parameters and buffers (:func:`unwrap_state_dict`).

    Returns
    -------
    missing : list of str
        Keys of the model's embedding path (everything but :data:`NOT_FOR_EMBEDDINGS`, and BatchNorm's
        ``num_batches_tracked`` counters, which inference does not read) that the checkpoint lacks, sorted.
    unexpected : list of str
        Checkpoint keys the model does not have, sorted.
    """
    keys = set(legacy_renamed(model, state_dict))
    model_keys = set(model.state_dict())
    missing = sorted(
        k for k in model_keys - keys
        if not k.startswith(NOT_FOR_EMBEDDINGS) and not k.endswith("num_batches_tracked")
    )
    return missing, sorted(keys - model_keys)


def read_state_dict(model_file: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Load a checkpoint's state dict on the CPU with ESPnet's ``safe_torch_load`` (``weights_only=True``).

    Parameters
    ----------
    model_file : path
        An ESPnet checkpoint (``*.pth``), possibly DeepSpeed/Lightning-wrapped (:func:`unwrap_state_dict`).

    Returns
    -------
    dict
        Key -> CPU tensor (parameters and buffers, any shapes).

    Raises
    ------
    ValueError
        The file holds no state dict (message names the file).
    FileNotFoundError
        No such file.
    RuntimeError
        A file that ``safe_torch_load`` will not load as weights (e.g. not a checkpoint).
    """
    from espnet2.torch_utils.safe_torch_load import safe_torch_load

    try:
        return unwrap_state_dict(safe_torch_load(model_file, map_location="cpu"))
    except ValueError as e:
        raise ValueError(f"{model_file}: {e}") from e


def check_checkpoint(model: torch.nn.Module, model_file: str | os.PathLike, config_file=None, state_dict=None) -> None:
    """Raise unless ``model_file`` holds every parameter and buffer of ``model``'s embedding path.

    Unexpected keys are only logged; a checkpoint without the training loss head passes (embeddings do not
    use it).

    Parameters
    ----------
    model : torch.nn.Module
        The built ESPnet speaker model whose keys must be covered.
    model_file : path
        The checkpoint (named in messages; read unless ``state_dict`` is given: after ESPnet's own loading this
        reads the file a second time, once per model load, off the extraction path).
    config_file : path, optional
        The config the model was built from (named in messages).
    state_dict : dict, optional
        The checkpoint's state dict when already loaded.

    Raises
    ------
    ValueError
        The checkpoint lacks weights of the embedding path (message names the file, the config and the keys)
        or is not a state dict.
    """
    sd = read_state_dict(model_file) if state_dict is None else state_dict
    missing, unexpected = checkpoint_coverage(model, sd)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(
            f"{model_file}: the checkpoint does not match {config_file or 'its config.yaml'}: it lacks {shown}. "
            "ESPnet loads checkpoints with strict=False and would leave these weights randomly initialised; "
            "pass the config.yaml the checkpoint was trained with."
        )
    if unexpected:
        logger.info("%s: %d checkpoint keys not in the model (ignored): %s", model_file, len(unexpected),
                    ", ".join(unexpected[:8]))


def load_embedding_weights(model: torch.nn.Module, model_file: str | os.PathLike, config_file=None) -> None:
    """Load ``model_file`` into ``model`` except the training loss head, after :func:`check_checkpoint`.

    For a model built from a *training* config that does not say ``spk_num`` (ESPnet recipes pass it on the
    command line): the classification head then has an invented size, and skipping it lets the checkpoint of
    any speaker count load. The loss head stays as initialised; embeddings do not use it.

    Raises
    ------
    ValueError
        Missing weights of the embedding path (:func:`check_checkpoint`), or a weight whose shape differs from
        the model's (message names file, config and torch's reason).
    """
    sd = legacy_renamed(model, read_state_dict(model_file))
    check_checkpoint(model, model_file, config_file, state_dict=sd)
    try:
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(NOT_FOR_EMBEDDINGS)}, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{model_file}: the checkpoint does not fit {config_file}: {e}") from e


class SpeakerTask(_EspnetSpeakerTask):
    """``espnet2.tasks.spk.SpeakerTask`` whose ``trainer`` is spk_toolkit's :class:`SpkTrainer`."""

    trainer = SpkTrainer

    @classmethod
    def build_model_from_file(cls, config_file=None, model_file=None, device: str = "cpu"):
        """ESPnet's ``build_model_from_file``, then :func:`check_checkpoint` when ``model_file`` is given.

        Returns
        -------
        (model, args)
            As ESPnet returns them.

        Raises
        ------
        ValueError
            The checkpoint lacks weights of the embedding path (see :func:`check_checkpoint`).
        """
        model, args = super().build_model_from_file(config_file, model_file, device)
        if model_file is not None:
            check_checkpoint(model, model_file, config_file)
        return model, args
