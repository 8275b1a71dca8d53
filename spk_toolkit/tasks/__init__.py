"""ESPnet task subclasses using spk_toolkit's trainer (``from spk_toolkit.tasks.spk import SpeakerTask``)."""
