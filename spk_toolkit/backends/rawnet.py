"""RawNet3 for TTS speaker embeddings: ESPnet-SPK's RawNet3 through the espnet backend, with ESPnet's crop convention.

ESPnet's ``extract_spk_embed.py --toolkit rawnet`` (and ESPnet3's x-vector runner) embed every utterance as the mean
of 10 deterministic crops of 3 s at 16 kHz (``_rawnet_extract_embd``: an utterance shorter than 3 s is first
wrapped to 48001 samples with ``np.pad(..., "wrap")``; crop ``j`` starts at ``int(linspace(0, T - 48000, 10)[j])``),
one utterance per forward; PR #6227 keeps that a per-utterance loop. That is exactly the engine's crop option
(``crops=10, crop_duration=3.0``, :func:`spk_toolkit.backends.batch.eval_crops`), which puts the crops of every
utterance of a batch into forwards of equal-length rows (no padding at all), so batching is exact.

:class:`RawNetModel` (registered as ``"rawnet"``) is :class:`~spk_toolkit.backends.espnet.EspnetSpeakerModel` with
that default (:attr:`RawNetModel.default_options`, applied by the TTS extractor and its CLI unless ``--crops`` is
given), ``batch_mode="grouped"`` (ESPnet's own forward on equal-length rows; RawNet3 has no masked forward) and,
without a model, ESPnet's published RawNet3 ``espnet/voxcelebs12_rawnet3`` (the default of ESPnet3's provider;
needs espnet_model_zoo and its cache or the network). ESPnet's ``tts.sh`` passes ``--pretrained_model RawNet`` for
this toolkit (its script loads the jungjee/RawNet checkout from ``tools/``); that placeholder means the default.
Embeddings: the projector output (192 for ``voxcelebs12_rawnet3``), float32, not L2-normalised.
"""
from __future__ import annotations

from spk_toolkit.backends.base import register_backend
from spk_toolkit.backends.espnet.model import EspnetSpeakerModel

#: The published ESPnet-SPK RawNet3 (VoxCeleb1+2) used when no model is given.
DEFAULT_MODEL_TAG = "espnet/voxcelebs12_rawnet3"
#: What ``tts.sh`` passes as ``--pretrained_model`` for ``--spk_embed_tool rawnet``.
TTS_SH_PLACEHOLDER = "RawNet"


@register_backend
class RawNetModel(EspnetSpeakerModel):
    """ESPnet-SPK RawNet3 with ESPnet's TTS convention (10 crops of 3 s, averaged).

    Parameters
    ----------
    train_config, model_file, model_tag, device
        As :class:`~spk_toolkit.backends.espnet.EspnetSpeakerModel`. With none of ``train_config`` /
        ``model_file`` / ``model_tag`` (or ``model_tag="RawNet"``, ``tts.sh``'s placeholder), ``model_tag`` is
        :data:`DEFAULT_MODEL_TAG`.
    batch_mode : {"grouped", "single", "auto", "masked"}
        Default ``grouped``: every crop has the same length, so a batch of crops is one forward with no padding.

    Attributes
    ----------
    default_options : dict
        ``{"crops": 10, "crop_duration": 3.0}``: the engine options of ESPnet's convention.

    Raises
    ------
    As :class:`~spk_toolkit.backends.espnet.EspnetSpeakerModel` (``ImportError`` naming espnet_model_zoo when the
    default model is needed and it is missing).
    """

    name = "rawnet"
    tag_argument = "model_tag"
    description = ("ESPnet-SPK RawNet3 with ESPnet's TTS convention: mean of 10 deterministic 3 s crops, all crops "
                   "of a batch in one forward")
    default_options = {"crops": 10, "crop_duration": 3.0}

    def __init__(self, train_config=None, model_file=None, model_tag=None, device="cpu", batch_mode: str = "grouped"):
        if model_tag == TTS_SH_PLACEHOLDER:
            model_tag = None
        if train_config is None and model_file is None and model_tag is None:
            model_tag = DEFAULT_MODEL_TAG
        super().__init__(train_config=train_config, model_file=model_file, model_tag=model_tag, device=device,
                         batch_mode=batch_mode)
