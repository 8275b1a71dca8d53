"""ESPnet's ``SpeakerTask`` with :class:`spk_toolkit.train.spk_trainer.SpkTrainer` as its trainer (ESPnet glue only).

Everything else (options, model building, preprocessor, iterators) is ESPnet's; only the trainer's
``validate_one_epoch`` / ``extract_embed`` change (single-pass unique-utterance validation, interpolated EER,
correct score statistics, device from the model, resumable compressed extraction), and
:meth:`SpeakerTask.build_model_from_file` refuses a checkpoint that does not cover the model's embedding path
(ESPnet loads checkpoints with ``strict=False``, which would leave the missing weights randomly initialised).

The checkpoint checks live in :mod:`spk_toolkit.backends.espnet.checkpoint` (so loading a model for inference
does not import spk_toolkit's trainer); they are re-exported here for code that imported them from this module.
"""
from __future__ import annotations

from espnet2.tasks.spk import SpeakerTask as _EspnetSpeakerTask

from spk_toolkit.backends.espnet.checkpoint import (  # noqa: F401 - re-exported for backward compatibility
    NOT_FOR_EMBEDDINGS,
    check_checkpoint,
    checkpoint_coverage,
    legacy_renamed,
    load_embedding_weights,
    read_state_dict,
    unwrap_state_dict,
)
from spk_toolkit.features.espnet import register_espnet_choices
from spk_toolkit.train.spk_trainer import SpkTrainer

# frontend: kaldi_fbank (the cache's Kaldi fbank from audio), preprocessor: spk_frames (crops on the fbank frame grid:
# cached (T, F) features, or audio aligned to them); see spk_toolkit.features.espnet
register_espnet_choices()

__all__ = [
    "NOT_FOR_EMBEDDINGS",
    "SpeakerTask",
    "check_checkpoint",
    "checkpoint_coverage",
    "legacy_renamed",
    "load_embedding_weights",
    "read_state_dict",
    "unwrap_state_dict",
]


class SpeakerTask(_EspnetSpeakerTask):
    """``espnet2.tasks.spk.SpeakerTask`` whose ``trainer`` is spk_toolkit's :class:`SpkTrainer`.

    Also knows ``frontend: kaldi_fbank`` and ``preprocessor: spk_frames`` (:mod:`spk_toolkit.features.espnet`,
    registered into ESPnet's class choices at import) for training from cached fbank or from audio with the same fbank.
    """

    trainer = SpkTrainer

    @classmethod
    def build_model_from_file(cls, config_file=None, model_file=None, device: str = "cpu"):
        """ESPnet's ``build_model_from_file``, then :func:`check_checkpoint` when ``model_file`` is given.

        Parameters
        ----------
        config_file : path, optional
            The experiment's ``config.yaml`` (ESPnet's default: ``config.yaml`` next to ``model_file``).
        model_file : path, optional
            Checkpoint (``*.pth``); ``None`` leaves the model as initialised.
        device : str
            ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (as ESPnet accepts it).

        Returns
        -------
        (model, args)
            As ESPnet returns them.

        Raises
        ------
        ValueError
            The checkpoint lacks weights of the embedding path (see :func:`check_checkpoint`), or is truncated,
            not a checkpoint, or holds pickled objects (:func:`read_state_dict`; names the file).
        FileNotFoundError
            ``model_file`` does not exist.
        """
        # weights only, first: a truncated, foreign or pickled checkpoint is refused naming the file
        sd = read_state_dict(model_file) if model_file is not None else None
        model, args = super().build_model_from_file(config_file, model_file, device)
        if model_file is not None:
            check_checkpoint(model, model_file, config_file, state_dict=sd)
        return model, args
