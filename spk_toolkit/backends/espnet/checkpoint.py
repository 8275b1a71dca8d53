"""Loading ESPnet-SPK models and checking their checkpoints, without ESPnet's or spk_toolkit's trainer code.

ESPnet's ``build_model_from_file`` loads checkpoints with ``strict=False``, which would silently leave the
weights a checkpoint lacks randomly initialised. The functions here compare a checkpoint with the model it is
loaded into and refuse one that does not cover the model's embedding path (everything but the training loss
head), and :func:`build_espnet_model` builds a model from an experiment's ``config.yaml`` or a *training*
config (missing keys filled from ``SpeakerTask``'s defaults) and loads a checkpoint into it, checked.

Models are built with ESPnet's own ``espnet2.tasks.spk.SpeakerTask`` (never spk_toolkit's subclass in
:mod:`spk_toolkit.tasks.spk`, which exists to plug in spk_toolkit's trainer). Importing ``espnet2.tasks.spk``
imports ``espnet2.train.trainer`` (``espnet2/tasks/abs_task.py`` and ``espnet2/tasks/spk.py`` import ESPnet's
trainers at module level), so it happens only inside :func:`build_espnet_model` and :func:`_complete_config`;
the checkpoint functions only need torch (:func:`read_state_dict`: weights only, never an unsafe fallback).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_FOR_EMBEDDINGS",
    "build_espnet_model",
    "check_checkpoint",
    "checkpoint_coverage",
    "legacy_renamed",
    "load_embedding_weights",
    "read_state_dict",
    "unwrap_state_dict",
]

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
    """Load a checkpoint's state dict on the CPU, weights only (``torch.load(..., weights_only=True)``).

    Never falls back to unpickling arbitrary objects and never asks (ESPnet's ``safe_torch_load`` can prompt on a
    terminal, or unpickle when ``ESPNET_ALLOW_UNSAFE_TORCH_LOAD`` is set): a file that is not plain weights is
    refused with a message naming it.

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
    FileNotFoundError
        No such file.
    ValueError
        Names the file: ``empty file``, ``truncated or not a PyTorch checkpoint (...)``, ``holds pickled Python
        objects besides tensors (refused ...)``, or holds no state dict.
    """
    import pickle
    import zipfile

    p = os.fspath(model_file)
    if not os.path.exists(p):
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", p)
    if os.path.isdir(p):
        raise ValueError(f"{p}: a directory, not a checkpoint file")
    if os.path.getsize(p) == 0:
        raise ValueError(f"{p}: empty file (0 bytes), not a checkpoint")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip, or the legacy pickle format
        raise ValueError(f"{p}: not a PyTorch checkpoint (neither torch.save's zip format nor its legacy format)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise ValueError(f"{p}: holds pickled Python objects besides tensors; refused (only weights are "
                             "loaded: save the model's state_dict())") from None
        raise ValueError(f"{p}: not a PyTorch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{p}: truncated or not a PyTorch checkpoint ({_first_line(e)})") from None
    try:
        return unwrap_state_dict(obj)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0].strip().split(". ")[0].rstrip(".") if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


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

    Parameters
    ----------
    model : torch.nn.Module
        The built ESPnet speaker model; its parameters and buffers are overwritten in place (on their device).
    model_file : path
        The checkpoint (read on the CPU with :func:`read_state_dict`; named in messages).
    config_file : path, optional
        The config the model was built from (named in messages).

    Raises
    ------
    ValueError
        Missing weights of the embedding path (:func:`check_checkpoint`), or a weight whose shape differs from
        the model's (message names file, config and torch's reason), or a file that holds no state dict.
    FileNotFoundError
        No such file.
    """
    sd = legacy_renamed(model, read_state_dict(model_file))
    check_checkpoint(model, model_file, config_file, state_dict=sd)
    try:
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(NOT_FOR_EMBEDDINGS)}, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{model_file}: the checkpoint does not fit {config_file}: {e}") from e



# ----------------------------------------------------------------------------------------------------------------
# building a model from a config (ESPnet's SpeakerTask)

#: Keys of an experiment's ``config.yaml`` that a *training* config may omit (filled from SpeakerTask's defaults).
_MODEL_KEYS = (
    "frontend", "frontend_conf", "specaug", "specaug_conf", "normalize", "normalize_conf", "encoder",
    "encoder_conf", "pooling", "pooling_conf", "projector", "projector_conf", "loss", "loss_conf", "init",
    "input_size", "spk_num",
)  # fmt: skip


def _complete_config(train_config: str | os.PathLike) -> Tuple[Dict, bool]:
    """Read a SpeakerTask YAML; fill keys a *training* config may omit from SpeakerTask's argument defaults.

    Parameters
    ----------
    train_config : path
        An experiment's ``config.yaml`` (complete already) or a training config such as
        ``conf/model_xvector.yaml``.

    Returns
    -------
    conf : dict
        The argument dict (``spk_num`` defaults to 2 when the config does not say it: the classification head
        is not used for embeddings).
    filled : bool
        Whether anything had to be filled in.

    Raises
    ------
    ValueError
        The file is not a YAML mapping.
    FileNotFoundError
        No such file.
    """
    import yaml
    from espnet2.tasks.spk import SpeakerTask  # imports espnet2.train.trainer (see the module docstring)

    with open(train_config, "r", encoding="utf-8") as f:
        conf = yaml.safe_load(f) or {}
    if not isinstance(conf, dict):
        raise ValueError(f"{train_config}: not a YAML mapping")
    if all(k in conf for k in _MODEL_KEYS) and conf.get("spk_num") is not None:
        return conf, False
    defaults = vars(SpeakerTask.get_parser().parse_args([]))
    full = dict(defaults)
    full.update(conf)
    if full.get("spk_num") is None:
        full["spk_num"] = 2  # the classification head is not used for embedding extraction
    return full, True


def build_espnet_model(
    train_config: str | os.PathLike,
    model_file: Optional[str | os.PathLike] = None,
    device: str = "cpu",
) -> Tuple[torch.nn.Module, argparse.Namespace]:
    """Build an ESPnet speaker model with ``espnet2.tasks.spk.SpeakerTask`` and load a checked checkpoint.

    An experiment's complete ``config.yaml`` goes through ESPnet's own ``build_model_from_file``, then
    :func:`check_checkpoint`. A training config is completed (:func:`_complete_config`), built without weights,
    and the checkpoint is loaded by :func:`load_embedding_weights` (everything but the loss head, whose speaker
    count the training config may not say).

    Parameters
    ----------
    train_config : path
        An experiment's ``config.yaml`` or a training config (``conf/model_*.yaml``).
    model_file : path, optional
        Checkpoint (``*.pth``); ``None`` leaves the model as initialised (seed ``torch`` for reproducibility).
    device : str
        Where the model is built (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Returns
    -------
    model : espnet2.spk.espnet_model.ESPnetSpeakerModel
        On ``device``, in the mode ESPnet's ``build_model_from_file`` leaves it; the caller calls ``eval()``.
    args : argparse.Namespace
        The (completed) configuration as ESPnet returns it.

    Raises
    ------
    ValueError
        A config that is not a YAML mapping; a checkpoint that lacks weights of the embedding path, holds no
        state dict, or whose shapes do not fit the model (messages name the file and the config).
    FileNotFoundError
        ``train_config`` or ``model_file`` does not exist.
    """
    import yaml
    from espnet2.tasks.spk import SpeakerTask  # ESPnet's own task; imports espnet2.train.trainer

    from spk_toolkit.features.espnet import register_espnet_choices

    register_espnet_choices()  # frontend: kaldi_fbank, preprocessor: spk_frames (models trained with them)
    conf, filled = _complete_config(train_config)
    if not filled:  # an experiment's config.yaml: ESPnet's own loading, then the coverage check
        # read (weights only) first: a truncated or pickled file is refused naming it, before ESPnet's loader
        sd = read_state_dict(model_file) if model_file is not None else None
        model, args = SpeakerTask.build_model_from_file(str(train_config), model_file, device)
        if model_file is not None:
            check_checkpoint(model, model_file, train_config, state_dict=sd)
        return model, args
    with tempfile.TemporaryDirectory(prefix="spk_toolkit_espnet_") as tmp:
        path = Path(tmp) / "config.yaml"
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(conf, f)
        model, args = SpeakerTask.build_model_from_file(str(path), None, device)
    if model_file is not None:  # spk_num may be invented: load everything but the loss head
        load_embedding_weights(model, model_file, train_config)
    return model, args


#: Former private name, kept for callers of ``spk_toolkit.backends.espnet._build_espnet_model``.
_build_espnet_model = build_espnet_model
