"""ESPnet-SPK backend with padding-invisible batched inference.

ESPnet's speaker models (``espnet2.spk.espnet_model.ESPnetSpeakerModel``) accept ``speech_lengths`` but do not
use them everywhere: the frontend's edge padding, the convolutions, the squeeze-excitation means of ECAPA-TDNN
and (for strided encoders) the pooling all see the zero padding of a batch. A 2 s utterance zero-padded to 6 s
gets a visibly different embedding than alone (cosine 0.74-0.91 depending on the architecture).

:class:`EspnetSpeakerModel` runs its *own* masked forward functions that reuse the ESPnet model's parameters
and sub-modules (no ESPnet code is copied) so that an utterance's embedding does not depend on the batch:

* **frontend + normalize** run per utterance on the true-length waveform (utterances of exactly equal length
  share one call). Any ESPnet frontend / normalize layer is therefore exact, including the STFT's reflect
  padding at the right edge and per-utterance mean normalisation.
* **encoder** (time axis masked, padded frames re-zeroed after every layer that can make them non-zero:
  convolutions (bias and right-edge context), BatchNorm in eval mode (affine shift), activations, residual
  sums). Because a lone utterance's convolutions see zero padding beyond its end and a batched one sees
  re-zeroed padded frames, the valid outputs are identical. Lengths are propagated through every convolution
  with ``floor((L + 2p - d (k - 1) - 1) / s) + 1``; since all convolutions are anchored at frame 0, strided
  convolutions are exact too. Covered:

  - ``XvectorEncoder`` (``encoder: xvector``): ``Conv1d``/``ReLU``/``BatchNorm1d`` stack.
  - ``EcapaTdnnEncoder`` (``encoder: ecapa_tdnn``) with ``EcapaBlock`` (Res2Net convolutions and a masked
    mean in the squeeze-excitation ``SEModule``).
  - ``ResNetEncoder`` (``encoder: resnet``, any ``resnet_type``) with ``BasicBlock`` or ``Bottleneck``
    (2-D convolutions, stride 2 in time in layers 2-4).

* **pooling** with masked statistics: ``StatsPooling`` (``stats``), ``MeanPooling`` (``mean``) and
  ``ChnAttnStatPooling`` (``chn_attn_stat``: masked global mean/std context and masked softmax over time).
* **projector**: any of ESPnet's projectors (they act on one utterance-level vector; BatchNorm in eval mode is
  per sample).

Other architectures (RawNet3, SKA-TDNN, MFA-Conformer, models without a frontend, ...) fall back to a mode that
cannot change results (ESPnet's own forward on groups of exactly equal length) and log a warning.

The embedding is the projector output as ESPnet computes it, float32, **not** L2-normalised.

Layout
------
:mod:`~spk_toolkit.backends.espnet.model`
    :class:`EspnetSpeakerModel` (registered as ``"espnet"``), :func:`build_random_model`, :data:`BATCH_MODES`.
:mod:`~spk_toolkit.backends.espnet.masked`
    The masked forward functions and :func:`masked_support`.
:mod:`~spk_toolkit.backends.espnet.checkpoint`
    :func:`build_espnet_model` (ESPnet's own ``espnet2.tasks.spk.SpeakerTask``) and the checkpoint checks
    (:func:`check_checkpoint`, :func:`load_embedding_weights`, ...).

Nothing here imports :mod:`spk_toolkit.tasks` or :mod:`spk_toolkit.train`, and importing this package imports
no espnet2 module. Building a model imports ``espnet2.tasks.spk``, which imports ESPnet's trainers
(``espnet2.train.trainer``, ``espnet2.train.spk_trainer``) at module level; reading and checking a checkpoint
does not.
"""
from spk_toolkit.backends.espnet.checkpoint import (
    NOT_FOR_EMBEDDINGS,
    _build_espnet_model,
    _complete_config,
    build_espnet_model,
    check_checkpoint,
    checkpoint_coverage,
    legacy_renamed,
    load_embedding_weights,
    read_state_dict,
    unwrap_state_dict,
)
from spk_toolkit.backends.espnet.masked import masked_support
from spk_toolkit.backends.espnet.model import BATCH_MODES, EspnetSpeakerModel, build_random_model

__all__ = [
    "BATCH_MODES",
    "EspnetSpeakerModel",
    "NOT_FOR_EMBEDDINGS",
    "build_espnet_model",
    "build_random_model",
    "check_checkpoint",
    "checkpoint_coverage",
    "legacy_renamed",
    "load_embedding_weights",
    "masked_support",
    "read_state_dict",
    "unwrap_state_dict",
]
