"""spk_toolkit.tasks.spk: ESPnet's SpeakerTask with our trainer, keeping the old names of the checkpoint checks."""
from __future__ import annotations

import pytest


def test_tasks_reexports_the_backend_checks():
    """spk_toolkit.tasks.spk keeps the old names (same objects) and its SpeakerTask uses our trainer."""
    pytest.importorskip("espnet2.tasks.spk")
    import spk_toolkit.backends.espnet as E
    import spk_toolkit.tasks.spk as T
    from spk_toolkit.train.spk_trainer import SpkTrainer

    for name in ("unwrap_state_dict", "legacy_renamed", "checkpoint_coverage", "read_state_dict",
                 "check_checkpoint", "load_embedding_weights", "NOT_FOR_EMBEDDINGS"):
        assert getattr(T, name) is getattr(E, name), name
    assert T.SpeakerTask.trainer is SpkTrainer
