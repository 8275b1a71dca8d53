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
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from spk_toolkit.backends.base import EmbeddingModel, register_backend

logger = logging.getLogger(__name__)

BATCH_MODES = ("auto", "masked", "grouped", "single")


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _time_mask(lengths: torch.Tensor, T: int, ndim: int) -> torch.Tensor:
    """Float mask of shape ``(B, 1, ..., T)`` with ``ndim`` dimensions: 1 on valid frames, 0 on padding."""
    m = (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).to(torch.float32)
    return m.view(m.shape[0], *([1] * (ndim - 2)), T)


def _conv_time_lengths(conv: torch.nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Output lengths along the last (time) axis of a ``Conv1d``/``Conv2d`` for input ``lengths`` (int64)."""
    k = conv.kernel_size[-1]
    s = conv.stride[-1]
    d = conv.dilation[-1]
    p = conv.padding
    if isinstance(p, str):
        if p == "same":
            return lengths.clone()
        if p == "valid":
            p = 0
        else:  # pragma: no cover - torch only knows "same" / "valid"
            raise ValueError(f"unknown padding {p!r}")
    else:
        p = p[-1]
    return torch.div(lengths + 2 * p - d * (k - 1) - 1, s, rounding_mode="floor") + 1


def _apply_conv(conv: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``conv`` on a masked input; return the masked output and its lengths."""
    y = conv(x)
    new = _conv_time_lengths(conv, lengths)
    return y * _time_mask(new, y.shape[-1], y.dim()), new


# ----------------------------------------------------------------------------------------------------------------
# masked encoders (each reuses the ESPnet module's own sub-modules / parameters)


def _masked_xvector(enc, feats: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked ``espnet2.spk.encoder.xvector_encoder.XvectorEncoder`` forward.

    Parameters
    ----------
    feats : (B, T, F) float, zero after each utterance's ``lengths``
    lengths : (B,) int64 frame counts

    Returns
    -------
    (B, C, T') frame-level features, zero on padded frames, and their lengths (B,).
    """
    x = feats.transpose(1, 2)
    for layer in enc.layers:
        if isinstance(layer, torch.nn.Conv1d):
            x, lengths = _apply_conv(layer, x, lengths)
        else:  # ReLU / BatchNorm1d: pointwise, but BN(0) = shift != 0 -> re-zero
            x = layer(x) * _time_mask(lengths, x.shape[-1], 3)
    return x, lengths


def _masked_se(se_module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Squeeze-excitation ``SEModule`` with a mean over valid frames only (replaces ``AdaptiveAvgPool1d``);
    ``x`` (B, C, T) must be zero on padded frames."""
    s = x.sum(dim=-1, keepdim=True) / lengths.to(x.dtype).clamp(min=1).view(-1, 1, 1)
    for layer in list(se_module.se)[1:]:
        s = layer(s)
    return x * s


def _masked_ecapa_block(blk, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Masked ``espnet2.spk.layers.ecapa_block.EcapaBlock`` (Res2Net + SE); ``x`` (B, C, T) zero-padded."""
    m = _time_mask(lengths, x.shape[-1], 3)
    residual = x
    out = blk.bn1(blk.relu(blk.conv1(x))) * m
    spx = torch.split(out, blk.width, 1)
    pieces: List[torch.Tensor] = []
    sp = None
    for i in range(blk.nums):
        sp = spx[i] if i == 0 else sp + spx[i]
        sp = blk.bns[i](blk.relu(blk.convs[i](sp))) * m
        pieces.append(sp)
    pieces.append(spx[blk.nums])
    out = blk.bn3(blk.relu(blk.conv3(torch.cat(pieces, 1)))) * m
    out = _masked_se(blk.se, out, lengths)
    return (out + residual) * m


def _masked_ecapa(enc, feats: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked ``espnet2.spk.encoder.ecapa_tdnn_encoder.EcapaTdnnEncoder`` forward (any number of blocks).

    Parameters
    ----------
    feats : (B, T, F) float, zero after each utterance's ``lengths``
    lengths : (B,) int64 frame counts

    Returns
    -------
    (B, C, T) frame-level features, zero on padded frames, and their lengths (B,).
    """
    x, lengths = _apply_conv(enc.conv, feats.transpose(1, 2), lengths)
    m = _time_mask(lengths, x.shape[-1], 3)
    x = enc.bn(enc.relu(x)) * m
    blocks = [enc.layer1, enc.layer2, enc.layer3, *enc.extra_layers]
    outputs = []
    total = x
    for i, blk in enumerate(blocks):
        y = _masked_ecapa_block(blk, total, lengths)
        outputs.append(y)
        if i + 1 < len(blocks):
            total = total + y
    x = enc.relu(enc.layer4(torch.cat(outputs, dim=1))) * m
    return x, lengths


def _masked_resnet_block(blk, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked ``BasicBlock`` / ``Bottleneck`` of ``espnet2.spk.layers.resnet_block``; ``x`` (B, C, F, T)."""
    import torch.nn.functional as F
    from espnet2.spk.layers.resnet_block import Bottleneck

    if isinstance(blk, Bottleneck):
        out, L = _apply_conv(blk.conv1, x, lengths)
        out = F.relu(blk.bn1(out)) * _time_mask(L, out.shape[-1], 4)
        out, L = _apply_conv(blk.conv2, out, L)
        out = F.relu(blk.bn2(out)) * _time_mask(L, out.shape[-1], 4)
        out, L = _apply_conv(blk.conv3, out, L)
        out = blk.bn3(out)
    else:
        out, L = _apply_conv(blk.conv1, x, lengths)
        out = F.relu(blk.bn1(out)) * _time_mask(L, out.shape[-1], 4)
        out, L = _apply_conv(blk.conv2, out, L)
        out = blk.bn2(out)
    if len(blk.shortcut) == 0:
        sc, Ls = x, lengths
    else:
        sc, Ls = _apply_conv(blk.shortcut[0], x, lengths)
        for layer in list(blk.shortcut)[1:]:
            sc = layer(sc)
    if not torch.equal(L, Ls):  # pragma: no cover - the model itself would not add these shapes
        raise RuntimeError("ResNet block: residual and main branch lengths differ")
    out = F.relu(out + sc) * _time_mask(L, out.shape[-1], 4)
    return out, L


def _masked_resnet(enc, feats: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked ``espnet2.spk.encoder.resnet_encoder.ResNetEncoder`` forward.

    The time axis is downsampled by the stride-2 stages (x8 for the standard layouts); the output lengths are
    propagated exactly through every convolution. All convolutions are anchored at frame 0 and padded frames
    are zero, so the valid outputs equal those of the utterance alone (exact, not an approximation).

    Parameters
    ----------
    feats : (B, T, F) float, zero after each utterance's ``lengths``
    lengths : (B,) int64 frame counts

    Returns
    -------
    (B, C*F', T') frame-level features (ESPnet's channel/frequency flattening), zero on padded frames,
    and the downsampled lengths (B,).
    """
    import torch.nn.functional as F

    x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
    out, L = _apply_conv(enc.conv1, x, lengths)
    out = F.relu(enc.bn1(out)) * _time_mask(L, out.shape[-1], 4)
    for stage in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
        for blk in stage:
            out, L = _masked_resnet_block(blk, out, L)
    out = out.transpose(1, 3)  # (B, T', F', C)
    out = torch.flatten(out, 2, -1).transpose(1, 2)  # (B, F'*C, T')
    return out, L


# ----------------------------------------------------------------------------------------------------------------
# masked pooling


def _masked_pooling(pool, x: torch.Tensor, lengths: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """Masked ``StatsPooling`` / ``MeanPooling`` / ``ChnAttnStatPooling`` forward.

    Parameters
    ----------
    pool : ESPnet pooling module
    x : (B, C, T') frame-level features, zero on padded frames
    lengths : (B,) int64 valid frames of ``x``
    divisor : (B,) float
        Denominator of the means, exactly what ESPnet's model passes as ``feat_lengths`` (the *frontend*
        frame counts). For length-preserving encoders it equals ``lengths``; for the ResNet (time stride 8) it
        is ~8x larger, an ESPnet quirk the trained models were trained with and which we reproduce so that the
        embedding equals ESPnet's own single-utterance output.

    Returns
    -------
    (B, P) utterance-level features.
    """
    from espnet2.spk.pooling.chn_attn_stat_pooling import ChnAttnStatPooling
    from espnet2.spk.pooling.mean_pooling import MeanPooling

    T = x.shape[-1]
    valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (B, T)
    m = valid[:, None, :].to(x.dtype)
    x = x * m
    n = divisor.to(x.dtype).clamp(min=1)
    if isinstance(pool, MeanPooling):
        return x.sum(dim=-1) / n[:, None]
    if isinstance(pool, ChnAttnStatPooling):
        n3 = n.view(-1, 1, 1)
        mean = x.sum(dim=-1, keepdim=True) / n3
        var = (x**2).sum(dim=-1, keepdim=True) / n3 - mean**2
        std = torch.sqrt(var.clamp(min=torch.finfo(var.dtype).eps, max=1e4))
        global_x = torch.cat((x, mean.expand(-1, -1, T), std.expand(-1, -1, T)), dim=1)
        w = pool.attention(global_x)
        w = w.masked_fill(~valid[:, None, :], float("-inf"))
        w = torch.softmax(w, dim=2)
        mu = torch.sum(x * w, dim=2)
        sg = torch.sqrt((torch.sum((x**2) * w, dim=2) - mu**2).clamp(min=1e-4, max=1e4))
        return torch.cat((mu, sg), dim=1)
    # StatsPooling
    mu = x.sum(dim=-1) / n[:, None]
    var = (((x - mu.unsqueeze(-1)) ** 2) * m).sum(dim=-1) / n[:, None]
    st = torch.sqrt(var.clamp(min=torch.finfo(var.dtype).eps, max=1e4))
    return torch.cat((mu, st), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# support check


def masked_support(model) -> Tuple[bool, str]:
    """Whether :class:`EspnetSpeakerModel` has an exact masked forward for this ESPnet speaker model.

    Parameters
    ----------
    model : espnet2.spk.espnet_model.ESPnetSpeakerModel

    Returns
    -------
    (supported, reason) : (bool, str)
        ``reason`` names the first unsupported part (empty when supported).
    """
    from espnet2.spk.encoder.ecapa_tdnn_encoder import EcapaTdnnEncoder
    from espnet2.spk.encoder.resnet_encoder import ResNetEncoder
    from espnet2.spk.encoder.xvector_encoder import XvectorEncoder
    from espnet2.spk.layers.ecapa_block import EcapaBlock
    from espnet2.spk.layers.resnet_block import BasicBlock, Bottleneck
    from espnet2.spk.pooling.chn_attn_stat_pooling import ChnAttnStatPooling
    from espnet2.spk.pooling.mean_pooling import MeanPooling
    from espnet2.spk.pooling.stat_pooling import StatsPooling
    from espnet2.spk.projector.rawnet3_projector import RawNet3Projector
    from espnet2.spk.projector.ska_tdnn_projector import SkaTdnnProjector
    from espnet2.spk.projector.xvector_projector import XvectorProjector

    if model.frontend is None:
        return False, "model has no frontend (waveform-input encoder such as RawNet3)"
    enc = model.encoder
    if type(enc) not in (XvectorEncoder, EcapaTdnnEncoder, ResNetEncoder):
        return False, f"encoder {type(enc).__name__} has no masked forward"
    for mod in enc.modules():
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)) and mod.padding_mode != "zeros":
            return False, f"convolution with padding_mode={mod.padding_mode!r}"
    if type(enc) is XvectorEncoder:
        for layer in enc.layers:
            if type(layer) not in (torch.nn.Conv1d, torch.nn.ReLU, torch.nn.BatchNorm1d):
                return False, f"x-vector layer {type(layer).__name__} not covered"
    elif type(enc) is EcapaTdnnEncoder:
        for blk in [enc.layer1, enc.layer2, enc.layer3, *enc.extra_layers]:
            if type(blk) is not EcapaBlock:
                return False, f"ECAPA block {type(blk).__name__} not covered"
            first = blk.se.se[0]
            if not (isinstance(first, torch.nn.AdaptiveAvgPool1d) and first.output_size in (1, (1,))):
                return False, "ECAPA SE module does not start with a global average pool"
    else:
        for stage in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
            for blk in stage:
                if type(blk) not in (BasicBlock, Bottleneck):
                    return False, f"ResNet block {type(blk).__name__} not covered"
    if type(model.pooling) not in (StatsPooling, MeanPooling, ChnAttnStatPooling):
        return False, f"pooling {type(model.pooling).__name__} has no masked forward"
    if model.projector is not None and type(model.projector) not in (
        XvectorProjector,
        RawNet3Projector,
        SkaTdnnProjector,
    ):
        return False, f"projector {type(model.projector).__name__} not known to be per-utterance"
    return True, ""


# ----------------------------------------------------------------------------------------------------------------
# model loading


def _complete_config(train_config: str | os.PathLike) -> Tuple[Dict, bool]:
    """Read a SpeakerTask YAML; fill keys a *training* config may omit from SpeakerTask's argument defaults.

    Returns the argument dict and whether anything had to be filled in (an experiment's ``config.yaml`` is
    complete already).
    """
    import yaml
    from espnet2.tasks.spk import SpeakerTask

    with open(train_config, "r", encoding="utf-8") as f:
        conf = yaml.safe_load(f) or {}
    if not isinstance(conf, dict):
        raise ValueError(f"{train_config}: not a YAML mapping")
    needed = [
        "frontend", "frontend_conf", "specaug", "specaug_conf", "normalize", "normalize_conf", "encoder",
        "encoder_conf", "pooling", "pooling_conf", "projector", "projector_conf", "loss", "loss_conf", "init",
        "input_size", "spk_num",
    ]  # fmt: skip
    if all(k in conf for k in needed) and conf.get("spk_num") is not None:
        return conf, False
    defaults = vars(SpeakerTask.get_parser().parse_args([]))
    full = dict(defaults)
    full.update(conf)
    if full.get("spk_num") is None:
        full["spk_num"] = 2  # the classification head is not used for embedding extraction
    return full, True


def _build_espnet_model(train_config, model_file, device):
    # ESPnet's SpeakerTask whose build_model_from_file also refuses a checkpoint that leaves weights random
    from spk_toolkit.tasks.spk import SpeakerTask, load_embedding_weights

    conf, filled = _complete_config(train_config)
    if not filled:  # an experiment's config.yaml: ESPnet's own loading, then the coverage check
        return SpeakerTask.build_model_from_file(str(train_config), model_file, device)
    import yaml

    with tempfile.TemporaryDirectory(prefix="spk_toolkit_espnet_") as tmp:
        path = Path(tmp) / "config.yaml"
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(conf, f)
        model, args = SpeakerTask.build_model_from_file(str(path), None, device)
    if model_file is not None:  # spk_num may be invented: load everything but the loss head
        load_embedding_weights(model, model_file, train_config)
    return model, args


# ----------------------------------------------------------------------------------------------------------------
# the backend


@register_backend
class EspnetSpeakerModel(EmbeddingModel):
    """ESPnet-SPK speaker-embedding model with padding-invisible batched inference.

    Parameters
    ----------
    train_config : str or path, optional
        ESPnet ``config.yaml`` of an experiment (``exp/<spk_exp>/config.yaml``), or a *training* config such as
        ``conf/model_ecapa.yaml`` whose missing keys are filled from ``SpeakerTask``'s defaults. Defaults to
        ``config.yaml`` next to ``model_file``.
    model_file : str or path, optional
        Checkpoint (``*.pth``). ``None`` builds a randomly initialised model from ``train_config`` (tests,
        benchmarks); seed ``torch`` beforehand for reproducible weights.
    model_tag : str, optional
        espnet_model_zoo tag (e.g. a Hugging Face ``espnet/...`` name). Needs ``espnet_model_zoo``.
    device : str or torch.device
        Where the model runs. Inputs are moved there, outputs come back to the CPU.
    batch_mode : {"auto", "masked", "grouped", "single"}
        ``"masked"``: our masked forward (raises if the architecture is not covered). ``"grouped"``: ESPnet's
        own forward on groups of utterances of exactly equal length (no padding ever). ``"single"``: ESPnet's
        own forward one utterance at a time. ``"auto"``: masked when covered, else grouped with a warning.

    Attributes
    ----------
    model : espnet2.spk.espnet_model.ESPnetSpeakerModel
        The ESPnet model, in eval mode.
    sample_rate : int
        Hz the model expects (the frontend's ``fs``; else the config's ``sample_rate``; else 16000).
    embed_dim : int
        Embedding dimension D (projector output size).
    batch_mode : str
        The mode actually used (``"masked"``, ``"grouped"`` or ``"single"``).

    Raises
    ------
    ValueError
        Unknown ``batch_mode``; no ``train_config``/``model_file``/``model_tag``; ``batch_mode="masked"`` for an
        uncovered architecture; a ``model_file`` that lacks weights of the embedding path (ESPnet loads
        checkpoints with ``strict=False``; see :func:`spk_toolkit.tasks.spk.check_checkpoint`).
    ImportError
        ``model_tag`` given but ``espnet_model_zoo`` is not installed, or espnet2 itself is missing.
    FileNotFoundError
        ``train_config`` or ``model_file`` does not exist.

    Notes
    -----
    Embeddings are ESPnet's projector output, float32, **not** L2-normalised; cosine scoring normalises.
    Whole utterances are embedded (no crops).
    """

    name = "espnet"

    def __init__(
        self,
        train_config: Optional[str | os.PathLike] = None,
        model_file: Optional[str | os.PathLike] = None,
        model_tag: Optional[str] = None,
        device: str | torch.device = "cpu",
        batch_mode: str = "auto",
    ):
        super().__init__(device=device)
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        try:
            import espnet2.tasks.spk  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the espnet backend needs espnet2: install with `make setup` "
                "(pip install --no-deps espnet==202611 plus its runtime deps)"
            ) from e

        if model_tag is not None:
            if train_config is not None or model_file is not None:
                raise ValueError("give either model_tag or train_config/model_file, not both")
            try:
                from espnet_model_zoo.downloader import ModelDownloader
            except ImportError as e:
                raise ImportError(
                    f"model_tag={model_tag!r} needs espnet_model_zoo: `pip install --no-deps espnet_model_zoo` "
                    "(or download the model and pass train_config/model_file)"
                ) from e
            files = ModelDownloader().download_and_unpack(model_tag)
            train_config = next((v for k, v in files.items() if k.endswith("train_config")), None)
            model_file = next((v for k, v in files.items() if k.endswith("model_file")), None)
            if train_config is None:
                raise ValueError(f"model_tag {model_tag!r}: no *train_config in {sorted(files)}")
        if train_config is None:
            if model_file is None:
                raise ValueError("EspnetSpeakerModel needs train_config, model_file or model_tag")
            train_config = Path(model_file).parent / "config.yaml"
        for p in (train_config, model_file):
            if p is not None and not Path(p).is_file():
                raise FileNotFoundError(f"no such file: {p}")

        self.train_config = str(Path(train_config).resolve())
        self.model_file = None if model_file is None else str(Path(model_file).resolve())
        self.model_tag = model_tag
        self.model_sha256 = None if model_file is None else _sha256(model_file)

        model, args = _build_espnet_model(self.train_config, self.model_file, str(self.device))
        self.model = model.to(self.device).eval()
        self.train_args = args

        self.sample_rate = int(self._find_sample_rate(args))
        self.embed_dim = int(self._find_embed_dim())
        self.min_samples = int(self._find_min_samples())

        self._choose_batch_mode(batch_mode)

    def _choose_batch_mode(self, batch_mode: str) -> None:
        """Set :attr:`batch_mode` from the requested one; warn when ``"auto"`` has to fall back."""
        ok, reason = masked_support(self.model)
        self.masked_unsupported_reason = reason
        self.requested_batch_mode = batch_mode
        if batch_mode == "masked" and not ok:
            raise ValueError(f"batch_mode='masked' not available: {reason}")
        if batch_mode == "auto":
            if ok:
                batch_mode = "masked"
            else:
                batch_mode = "grouped"
                logger.warning(
                    "espnet backend: %s; falling back to batch_mode='grouped' (ESPnet's own forward on "
                    "utterances of exactly equal length, no padding) so results cannot depend on batching; "
                    "this is slower for bucketed batches of varied lengths",
                    reason,
                )
        self.batch_mode = batch_mode

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, batch_mode: str = "auto", sample_rate: Optional[int] = None
    ) -> "EspnetSpeakerModel":
        """Wrap an in-memory ESPnet speaker model (no copy, no file), e.g. the one a trainer is training.

        Used by :class:`spk_toolkit.train.spk_trainer.SpkTrainer` so validation / ``extract_embed`` share this
        backend's masked forward. The model is used as it is (not moved, not switched to eval mode: the caller
        calls ``model.eval()``; in train mode BatchNorm would use batch statistics). ``device`` is the device of
        the model's parameters.

        Parameters
        ----------
        model : espnet2.spk.espnet_model.ESPnetSpeakerModel
            Unwrapped (not ``DistributedDataParallel``).
        batch_mode : {"auto", "masked", "grouped", "single"}
        sample_rate : int, optional
            Hz; default as for a loaded model (frontend's rate, else 16000).

        Raises
        ------
        ValueError
            Unknown ``batch_mode``, or ``"masked"`` for an uncovered architecture.
        """
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        self = cls.__new__(cls)
        EmbeddingModel.__init__(self, device=next(model.parameters()).device)
        self.train_config = self.model_file = self.model_tag = self.model_sha256 = None
        self.model = model
        self.train_args = None
        self.sample_rate = int(sample_rate) if sample_rate else int(self._find_sample_rate(None))
        self.embed_dim = int(self._find_embed_dim())
        self.min_samples = int(self._find_min_samples())
        self._choose_batch_mode(batch_mode)
        return self

    # ------------------------------------------------------------------------------------------------------------
    # properties of the loaded model

    def _find_sample_rate(self, args) -> int:
        fe = self.model.frontend
        logmel = getattr(fe, "logmel", None)
        if logmel is not None and "sr" in getattr(logmel, "mel_options", {}):
            return int(logmel.mel_options["sr"])
        if getattr(args, "sample_rate", None):
            return int(args.sample_rate)
        return 16000

    def _find_embed_dim(self) -> int:
        m = self.model
        try:
            if m.projector is not None:
                return int(m.projector.output_size())
            return int(m.pooling.output_size())
        except Exception:  # noqa: BLE001 - fall back to a dummy forward
            with torch.inference_mode():
                x = torch.zeros(1, self.sample_rate, device=self.device)
                return int(m(x, torch.tensor([x.shape[1]], device=self.device), extract_embd=True).shape[-1])

    def _find_min_samples(self) -> int:
        fe = self.model.frontend
        for obj in (getattr(fe, "stft", None), getattr(fe, "transform", None)):
            n_fft = getattr(obj, "n_fft", None)
            center = getattr(obj, "center", True)
            if n_fft:
                # STFT with center=True reflect-pads n_fft // 2 samples, which needs a longer input.
                return n_fft // 2 + 1 if center else n_fft
        return 1

    def describe(self) -> dict:
        """JSON-serialisable description (toolkit, files + sha256, sample rate, dimension, batch mode)."""
        return {
            "toolkit": self.name,
            "train_config": self.train_config,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "model_tag": self.model_tag,
            "sample_rate": self.sample_rate,
            "embed_dim": self.embed_dim,
            "batch_mode": self.batch_mode,
            "encoder": type(self.model.encoder).__name__,
            "pooling": type(self.model.pooling).__name__,
            "l2_normalized": False,
        }

    # ------------------------------------------------------------------------------------------------------------
    # inference

    def _check(self, wav: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if wav.dim() != 2:
            raise ValueError(f"wav must be (B, T), got shape {tuple(wav.shape)}")
        lengths = torch.as_tensor(lengths).to(torch.int64).reshape(-1)
        if lengths.numel() != wav.shape[0]:
            raise ValueError(f"{lengths.numel()} lengths for a batch of {wav.shape[0]}")
        if lengths.numel() and int(lengths.max()) > wav.shape[1]:
            raise ValueError(f"length {int(lengths.max())} > padded length {wav.shape[1]}")
        if lengths.numel() and int(lengths.min()) < self.min_samples:
            raise ValueError(
                f"utterance of {int(lengths.min())} samples is shorter than the model's minimum "
                f"{self.min_samples} samples"
            )
        return wav.to(self.device, torch.float32), lengths.to(self.device)

    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed a zero-padded batch; each embedding is independent of the batch it came in.

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
            Waveforms at :attr:`sample_rate` Hz, zero-padded after each utterance's true length.
        lengths : torch.Tensor of shape (B,), int64
            True lengths in samples (``min_samples <= lengths <= T``).

        Returns
        -------
        torch.Tensor of shape (B, D), float32, on the CPU
            ESPnet's projector output (not L2-normalised).

        Raises
        ------
        ValueError
            Bad shapes, a length above ``T`` or below :attr:`min_samples`.
        """
        wav, lengths = self._check(wav, lengths)
        if wav.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        with torch.inference_mode():
            if self.batch_mode == "masked":
                out = self.masked_forward(wav, lengths)
            elif self.batch_mode == "grouped":
                out = self._grouped_forward(wav, lengths)
            else:
                out = torch.cat(
                    [self.model(wav[i : i + 1, : int(L)], lengths[i : i + 1], extract_embd=True)
                     for i, L in enumerate(lengths.tolist())]
                )  # fmt: skip
        return out.float().cpu()

    def _grouped_forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ESPnet's own forward on groups of exactly equal length (no padding reaches the model)."""
        out = [None] * wav.shape[0]
        for L, idx in self._groups(lengths):
            emb = self.model(wav[idx, :L], lengths[idx], extract_embd=True)
            for j, i in enumerate(idx.tolist()):
                out[i] = emb[j]
        return torch.stack(out)

    @staticmethod
    def _groups(lengths: torch.Tensor):
        for L in torch.unique(lengths).tolist():
            yield int(L), torch.nonzero(lengths == L).flatten()

    def features(self, wav: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frontend + normalize per utterance (equal lengths share a call), zero-padded into a batch.

        Returns
        -------
        feats : (B, T_f, F) float, zero after each utterance's frames
        frames : (B,) int64 valid frame counts
        divisor : (B,) float, the ``feat_lengths`` ESPnet's model would hand to its pooling
        """
        m = self.model
        per: List[Optional[torch.Tensor]] = [None] * wav.shape[0]
        div = torch.zeros(wav.shape[0], dtype=torch.float32, device=wav.device)
        for L, idx in self._groups(lengths):
            lens = torch.full((len(idx),), L, dtype=torch.int64, device=wav.device)
            f, flens = m.frontend(wav[idx, :L], lens)
            if m.normalize is not None:
                f, flens2 = m.normalize(f, flens)
                flens = flens if flens2 is None else flens2
            if flens is None:
                flens = torch.full((len(idx),), f.shape[1], device=wav.device)
            for j, i in enumerate(idx.tolist()):
                per[i] = f[j]
            div[idx] = flens.to(div.device, torch.float32)
        frames = torch.tensor([p.shape[0] for p in per], dtype=torch.int64, device=wav.device)
        feats = torch.nn.utils.rnn.pad_sequence(per, batch_first=True)
        return feats, frames, div

    def masked_forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Padding-invisible forward: per-utterance frontend, masked encoder and pooling, projector.

        Parameters
        ----------
        wav : (B, T) float32 on :attr:`device`, zero-padded
        lengths : (B,) int64 samples

        Returns
        -------
        (B, D) embeddings on :attr:`device`.

        Raises
        ------
        ValueError
            If the architecture has no masked forward (see :func:`masked_support`).
        """
        from espnet2.spk.encoder.ecapa_tdnn_encoder import EcapaTdnnEncoder
        from espnet2.spk.encoder.resnet_encoder import ResNetEncoder

        ok, reason = masked_support(self.model)
        if not ok:
            raise ValueError(f"no masked forward: {reason}")
        feats, frames, divisor = self.features(wav, lengths)
        enc = self.model.encoder
        if type(enc) is EcapaTdnnEncoder:
            x, L = _masked_ecapa(enc, feats, frames)
        elif type(enc) is ResNetEncoder:
            x, L = _masked_resnet(enc, feats, frames)
        else:
            x, L = _masked_xvector(enc, feats, frames)
        pooled = _masked_pooling(self.model.pooling, x, L, divisor)
        return self.model.project_spk_embd(pooled)

    def espnet_forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ESPnet's own (padding-sensitive) batched forward, for comparisons: (B, T), (B,) -> (B, D) on CPU."""
        wav, lengths = self._check(wav, lengths)
        with torch.inference_mode():
            return self.model(wav, lengths, extract_embd=True).float().cpu()


def build_random_model(train_config: str | os.PathLike, seed: int = 0, **kwargs) -> EspnetSpeakerModel:
    """Build a random-init :class:`EspnetSpeakerModel` from a (training) config with seeded weights.

    Besides PyTorch's default initialisation, every BatchNorm gets random running statistics and affine
    parameters, so that ``BN(0) != 0`` (an untrained BatchNorm would hide padding leaks through its shift).

    Parameters
    ----------
    train_config : str or path
    seed : int
    **kwargs
        Passed to :class:`EspnetSpeakerModel` (``device``, ``batch_mode``).
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        m = EspnetSpeakerModel(train_config=train_config, model_file=None, **kwargs)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for mod in m.model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                    n = mod.running_mean.numel()
                    mod.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                    mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                    if mod.affine:
                        mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                        mod.bias.copy_(0.5 * torch.randn(n, generator=g))
    finally:
        torch.random.set_rng_state(state)
    return m
