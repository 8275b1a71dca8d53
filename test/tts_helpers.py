"""Helpers for the TTS speaker-embedding tests and bench/tts_extract.py: random-init models saved the way users have
them (an ESPnet ``model.pth`` + ``config.yaml``, a SpeechBrain ``EncoderClassifier`` source directory), and
ESPnet-style TTS data dirs built from real speech. No network, no pytest fixtures (benchmarks import it too).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from espnet_helpers import CONFIGS

#: hyperparams.yaml of a small random ECAPA-TDNN ``EncoderClassifier`` (the layout of speechbrain/spkrec-ecapa-voxceleb:
#: Fbank -> sentence mean normalisation -> ECAPA_TDNN; pretrained_path is replaced by the directory when loaded).
SB_HPARAMS = """# random-init ECAPA-TDNN (spk_toolkit tests), laid out as speechbrain/spkrec-ecapa-voxceleb
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
sample_rate: 16000
n_mels: 40
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [32, 32, 32, 32, 96]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 16
    lin_neurons: 24
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 24
    out_neurons: 4
mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


def _randomise_batchnorm(module: torch.nn.Module, seed: int) -> None:
    """Random running statistics and affine parameters for every BatchNorm (so BN(0) != 0 and padding leaks show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                n = mod.running_mean.numel()
                mod.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if mod.affine:
                    mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                    mod.bias.copy_(0.5 * torch.randn(n, generator=g))


def save_speechbrain_ecapa(directory: str | Path, seed: int = 0) -> Path:
    """A random ECAPA-TDNN saved as a local ``EncoderClassifier`` source directory (hyperparams.yaml +
    embedding_model.ckpt); returns the directory."""
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "hyperparams.yaml").write_text(SB_HPARAMS)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        m = ECAPA_TDNN(40, channels=[32, 32, 32, 32, 96], kernel_sizes=[5, 3, 3, 3, 1], dilations=[1, 2, 3, 4, 1],
                       attention_channels=16, lin_neurons=24)
    finally:
        torch.random.set_rng_state(state)
    _randomise_batchnorm(m, seed + 1)
    torch.save(m.state_dict(), d / "embedding_model.ckpt")
    return d


def save_espnet_model(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """A random-init ESPnet-SPK model (:data:`espnet_helpers.CONFIGS`) saved as ``model.pth`` + ``config.yaml``
    (what ``--pretrained_model dir/model.pth`` loads, as ESPnet's script does); returns the ``.pth``."""
    from spk_toolkit.backends.espnet import build_random_model

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    m = build_random_model(CONFIGS[arch], seed=seed)
    torch.save(m.model.state_dict(), d / "model.pth")
    shutil.copy(CONFIGS[arch], d / "config.yaml")
    return d / "model.pth"


def write_tts_dir(utts: Sequence, directory: str | Path, seed: int = 0) -> Dict[str, List[str]]:
    """An ESPnet TTS data dir (wav.scp, text, utt2spk, spk2utt) whose files list the utterances in *different*
    seeded orders (none sorted, none in insertion order), so only a writer that follows ``text`` gets it right.

    Returns
    -------
    dict
        ``{"text": keys in text order, "spk2utt": speakers in spk2utt order}``.
    """
    rng = random.Random(seed)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    wav = list(utts)
    rng.shuffle(wav)
    text = list(utts)
    rng.shuffle(text)
    (d / "wav.scp").write_text("".join(f"{u.utt_id} {u.path}\n" for u in wav))
    (d / "text").write_text("".join(f"{u.utt_id} some words {i}\n" for i, u in enumerate(text)))
    u2s = list(utts)
    rng.shuffle(u2s)
    (d / "utt2spk").write_text("".join(f"{u.utt_id} {u.spk_id}\n" for u in u2s))
    spk: Dict[str, List[str]] = {}
    for u in text:
        spk.setdefault(u.spk_id, []).append(u.utt_id)
    order = list(spk)
    rng.shuffle(order)
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(spk[s])}\n" for s in order))
    return {"text": [u.utt_id for u in text], "spk2utt": order}


def rawnet_crops_reference(model, wav: np.ndarray, n_samples: int = 48000, n_segments: int = 10) -> np.ndarray:
    """ESPnet's ``extract_spk_embed.py`` RawNet convention for one utterance (``_rawnet_extract_embd``): wrap to
    ``n_samples + 1`` when shorter, ``n_segments`` crops at ``int(linspace(0, T - n_samples, n_segments))``, one
    forward of the crops through ESPnet's own model, mean over crops. ``model``: an EspnetSpeakerModel."""
    audio = np.asarray(wav, dtype=np.float32)
    if len(audio) < n_samples:
        audio = np.pad(audio, (0, n_samples - len(audio) + 1), "wrap")
    starts = np.linspace(0, len(audio) - n_samples, num=n_segments)
    crops = torch.from_numpy(np.stack([audio[int(s): int(s) + n_samples] for s in starts]).astype(np.float32))
    with torch.no_grad():
        out = model.model(crops, torch.full((n_segments,), n_samples), extract_embd=True)
    return out.mean(0).numpy()
