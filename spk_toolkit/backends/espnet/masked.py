"""Masked (padding-invisible) forward functions for ESPnet-SPK encoders and poolings.

Each function reuses the ESPnet module's own sub-modules and parameters (no ESPnet code is copied) and keeps
padded frames at zero after every layer that could make them non-zero, propagating the valid lengths through
every convolution, so that an utterance's output does not depend on the batch it is computed in (see
:mod:`spk_toolkit.backends.espnet` for the coverage). :func:`masked_support` says whether a model is covered.

espnet2 is imported inside the functions that need its classes; this module itself imports only torch.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["masked_support"]


# ----------------------------------------------------------------------------------------------------------------
# small helpers


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


def masked_support(model, features: bool = False) -> Tuple[bool, str]:
    """Whether :class:`EspnetSpeakerModel` has an exact masked forward for this ESPnet speaker model.

    Parameters
    ----------
    model : torch.nn.Module
        An ESPnet speaker model, or any module with ESPnet's ``forward(speech, speech_lengths, ...,
        extract_embd=True)`` contract; a module without ``frontend`` / ``encoder`` / ``pooling`` attributes is
        reported as not covered (never an ``AttributeError``).
    features : bool, default=False
        The input is features (``frontend: null``, e.g. cached fbank, :meth:`EspnetSpeakerModel.embed_features`):
        a model without frontend is then covered when its encoder and pooling are.

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

    if not hasattr(model, "frontend"):
        return False, f"{type(model).__name__} has no frontend attribute (not an ESPnet speaker model)"
    if model.frontend is None and not features:
        return False, "model has no frontend (its input is a waveform, e.g. RawNet3, or features: embed_features)"
    enc = getattr(model, "encoder", None)
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
    pooling = getattr(model, "pooling", None)
    if type(pooling) not in (StatsPooling, MeanPooling, ChnAttnStatPooling):
        return False, f"pooling {type(pooling).__name__} has no masked forward"
    if not hasattr(model, "project_spk_embd"):
        return False, f"{type(model).__name__} has no project_spk_embd (not an ESPnet speaker model)"
    projector = getattr(model, "projector", None)
    if projector is not None and type(projector) not in (
        XvectorProjector,
        RawNet3Projector,
        SkaTdnnProjector,
    ):
        return False, f"projector {type(projector).__name__} not known to be per-utterance"
    return True, ""

