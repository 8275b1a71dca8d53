"""ESPnet trainer integration (imports espnet2: load lazily, ``from spk_toolkit.train.spk_trainer import SpkTrainer``)."""
