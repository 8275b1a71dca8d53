"""ESPnet's ``SpeakerTask`` with :class:`spk_toolkit.train.spk_trainer.SpkTrainer` as its trainer.

Everything else (options, model building, preprocessor, iterators) is ESPnet's; only the trainer's
``validate_one_epoch`` / ``extract_embed`` change (single-pass unique-utterance validation, interpolated EER,
correct score statistics, device from the model, resumable compressed extraction).
"""
from __future__ import annotations

from espnet2.tasks.spk import SpeakerTask as _EspnetSpeakerTask

from spk_toolkit.train.spk_trainer import SpkTrainer


class SpeakerTask(_EspnetSpeakerTask):
    """``espnet2.tasks.spk.SpeakerTask`` whose ``trainer`` is spk_toolkit's :class:`SpkTrainer`."""

    trainer = SpkTrainer
