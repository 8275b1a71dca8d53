"""Frame-level hidden states of a local torch model at a chosen layer, exact for each utterance whatever its batch.

Two ways, chosen per layer (``batch_mode="auto"``):

* **masked** (ESPnet speaker models whose architecture :func:`spk_toolkit.backends.espnet.masked_support`
  covers: x-vector, ECAPA-TDNN, ResNet): the backend's padding-invisible forward
  (:class:`spk_toolkit.backends.espnet.EspnetSpeakerModel`) stopped at the layer. ``layer="frontend"``: the
  frontend + normalize output the encoder sees ``(T_f, F)``, computed per utterance; ``"encoder"``: the
  encoder output ``(T', C)``; ``"encoder.layers.N"`` (x-vector): after ``enc.layers[N]``. Padded frames are
  re-zeroed after every layer and lengths propagated through every convolution, so valid frames equal the
  utterance's own up to float rounding (cosine >= 0.99999 per frame, tested).
* **single** (any ``torch.nn.Module``, any layer: a dotted name of ``module.named_modules()``): a forward hook
  captures the layer's output while the module runs on each utterance alone, on its true length (a batch of
  one: exact for any architecture), and the forward stops at the hooked layer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from spk_toolkit.backends.base import OutputKind, register_backend
from spk_toolkit.features.base import (
    FEATURE_DTYPES,
    FeatureExtractor,
    check_batch,
    check_dtype,
    module_weights_sha256,
    pad_frames,
)

__all__ = ["HiddenStates"]

HIDDEN_BATCH_MODES = ("auto", "masked", "single")


class _Stop(Exception):
    """Raised by the capture hook to end the forward once the chosen layer has run."""


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise ValueError(f"the hooked layer returned {type(out).__name__}, not a tensor")


def _is_espnet_speaker_model(module) -> bool:
    return all(hasattr(module, a) for a in ("frontend", "encoder", "pooling")) and hasattr(module, "extract_feats")


@register_backend
class HiddenStates(FeatureExtractor):
    """Frame-level activations ``(T', C)`` of one layer of a local torch model, per utterance.

    Parameters
    ----------
    train_config : path, optional
        ESPnet speaker ``config.yaml`` (or training config such as ``conf/model_xvector.yaml``): the model is
        built by :class:`spk_toolkit.backends.espnet.EspnetSpeakerModel`.
    model_file : path, optional
        Its checkpoint (``*.pth``, checked for missing weights). Without one, ``seed`` must be given: a
        random-init model with seeded weights (tests, ablations; identical on every worker).
    seed : int, optional
        Seed of the random-init model (:func:`spk_toolkit.backends.espnet.build_random_model`).
    module : torch.nn.Module, optional
        An in-memory model instead (Python API; not for executors that build the model elsewhere). An ESPnet
        speaker model gets the masked way; any other module the single way.
    layer : str, default="encoder"
        ``"frontend"``, ``"encoder"``, ``"encoder.layers.N"`` (masked way where covered), or any dotted module
        name of ``module.named_modules()`` (single way).
    time_axis : {1, 2}, optional
        Single way: the axis of the layer's output that is time: 1 for ``(1, T', C)``, 2 for ``(1, C, T')``.
        Default 2 for ESPnet speaker models (their encoders are ``Conv1d`` stacks), else 1.
    forward : callable, optional
        Single way: ``forward(module, wav (1, T), lengths (1,))`` running the module (default: ESPnet's
        ``module(wav, lengths, extract_embd=True)`` for ESPnet speaker models, else ``module(wav, lengths)``).
    sample_rate : int, optional
        Hz (default: the ESPnet model's frontend rate, else 16000).
    batch_mode : {"auto", "masked", "single"}, default="auto"
        ``auto``: masked where covered, else single. ``masked`` raises where not covered.
    dtype : {"float32", "float16", "float64"}, default="float32"
    output : str, default="hidden"
        Output name.
    device : str or torch.device
        Where the model runs (a given ``module`` stays where it is).

    Attributes
    ----------
    dim : int
        C, the channels per frame (found by one forward of 1 s of seeded noise).
    batch_mode : str
        The way used, ``masked`` or ``single``.

    Raises
    ------
    ValueError
        Neither or both of ``train_config`` and ``module``; ``model_file`` and ``seed`` both missing; an unknown
        layer (the available names listed); ``batch_mode="masked"`` where not covered; a layer output that is
        not 3-D; unknown dtype.
    FileNotFoundError, ImportError
        From the ESPnet backend (missing files, espnet2 not installed).

    Examples
    --------
    >>> hs = HiddenStates(train_config="conf/model_xvector.yaml", seed=0, layer="encoder")  # doctest: +SKIP
    >>> feats, frames = hs.compute(wav, lengths)["hidden"]                                 # doctest: +SKIP
    """

    name = "hidden_states"
    description = "frame-level hidden states (T', C) of one layer of a torch model (ESPnet speaker models: masked)"

    def __init__(self, train_config: Optional[str | os.PathLike] = None, model_file: Optional[str | os.PathLike] = None,
                 seed: Optional[int] = None, module: Optional[torch.nn.Module] = None, layer: str = "encoder",
                 time_axis: Optional[int] = None, forward: Optional[Callable] = None,
                 sample_rate: Optional[int] = None, batch_mode: str = "auto", dtype: str = "float32",
                 output: str = "hidden", device: str | torch.device = "cpu"):
        if batch_mode not in HIDDEN_BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {HIDDEN_BATCH_MODES}, got {batch_mode!r}")
        if (train_config is None) == (module is None):
            raise ValueError("give either train_config (+ model_file or seed) or module")
        self.spk = None
        self.seed = None if seed is None else int(seed)
        if train_config is not None:
            from spk_toolkit.backends.espnet import EspnetSpeakerModel, build_random_model

            if model_file is None:
                if seed is None:
                    raise ValueError("HiddenStates without model_file needs seed= (a random-init model must be the "
                                     "same on every worker)")
                self.spk = build_random_model(train_config, seed=int(seed), device=device)
            else:
                self.spk = EspnetSpeakerModel(train_config=train_config, model_file=model_file, device=device)
            module = self.spk.model
        elif _is_espnet_speaker_model(module):
            from spk_toolkit.backends.espnet import EspnetSpeakerModel

            self.spk = EspnetSpeakerModel.from_model(module.eval(), sample_rate=sample_rate)
        super().__init__(device=self.spk.device if self.spk is not None else _device_of(module))
        self.module = module.eval()
        self.layer = str(layer)
        self.dtype = check_dtype(dtype, FEATURE_DTYPES, self.name)
        self.output = output
        self.forward_fn = forward
        self.sample_rate = int(sample_rate or (self.spk.sample_rate if self.spk is not None else 16000))
        self.min_samples = self.spk.min_samples if self.spk is not None else 1
        self.time_axis = int(time_axis) if time_axis is not None else (2 if self.spk is not None else 1)
        if self.time_axis not in (1, 2):
            raise ValueError(f"time_axis must be 1 ((1, T', C) outputs) or 2 ((1, C, T')), got {time_axis!r}")
        masked_ok, why = self._masked_available()
        if batch_mode == "masked" and not masked_ok:
            raise ValueError(f"batch_mode='masked' not available for layer {self.layer!r}: {why}")
        self.batch_mode = "masked" if (masked_ok and batch_mode != "single") else "single"
        if self.batch_mode == "single" and self.layer not in dict(self.module.named_modules()):
            names = [n for n, _ in self.module.named_modules() if n]
            extra = "frontend, encoder, encoder.layers.N (masked), " if self.spk is not None else ""
            raise ValueError(f"unknown layer {self.layer!r}; available: {extra}{', '.join(names[:40])}"
                             + (" ..." if len(names) > 40 else ""))
        self.train_config = None if train_config is None else str(train_config)
        self.model_file = None if model_file is None else str(model_file)
        g = torch.Generator().manual_seed(0)
        probe = 0.1 * torch.randn(1, self.sample_rate, generator=g)
        feats, _ = self._compute(probe, torch.tensor([self.sample_rate]))
        self.dim = int(feats.shape[-1])

    # ------------------------------------------------------------------------------------------------- metadata
    def _masked_available(self):
        if self.spk is None:
            return False, "not an ESPnet speaker model"
        if self.layer == "frontend":
            return True, ""
        ok, why = (self.spk.batch_mode == "masked", self.spk.masked_unsupported_reason)
        if not ok:
            return False, why
        if self.layer == "encoder":
            return True, ""
        from espnet2.spk.encoder.xvector_encoder import XvectorEncoder

        parts = self.layer.split(".")
        if len(parts) == 3 and parts[:2] == ["encoder", "layers"] and parts[2].isdigit() \
                and type(self.module.encoder) is XvectorEncoder:
            if int(parts[2]) >= len(self.module.encoder.layers):
                return False, f"the encoder has {len(self.module.encoder.layers)} layers"
            return True, ""
        return False, f"layer {self.layer!r} has no masked forward (frontend, encoder, x-vector encoder.layers.N)"

    def output_kinds(self) -> Dict[str, OutputKind]:
        return {self.output: OutputKind("sequence", self.dtype, (self.dim,))}

    def config(self) -> dict:
        return {"layer": self.layer, "batch_mode": self.batch_mode, "time_axis": self.time_axis,
                "sample_rate": self.sample_rate, "dtype": self.dtype, "output": self.output, "seed": self.seed,
                "module": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                "forward": None if self.forward_fn is None else getattr(self.forward_fn, "__qualname__", "callable")}

    def code_parts(self) -> List[object]:
        parts = [*super().code_parts(), type(self.module)]
        if self.spk is not None:
            from spk_toolkit.backends.espnet import masked, model

            parts += [Path(masked.__file__), Path(model.__file__)]
        if self.forward_fn is not None:
            parts.append(self.forward_fn)
        return parts

    def extra_description(self) -> dict:
        d = {"weights_sha256": module_weights_sha256(self.module)}
        if self.spk is not None and self.spk.model_sha256:
            d["model_sha256"] = self.spk.model_sha256
        return d

    # -------------------------------------------------------------------------------------------------- compute
    def _masked(self, wav: torch.Tensor, lengths: torch.Tensor):
        from spk_toolkit.backends.espnet.masked import _apply_conv, _masked_ecapa, _masked_resnet, _time_mask

        feats, frames, _ = self.spk.features(wav, lengths)  # per utterance, (B, T_f, F), zero-padded
        if self.layer == "frontend":
            return feats, frames
        from espnet2.spk.encoder.ecapa_tdnn_encoder import EcapaTdnnEncoder
        from espnet2.spk.encoder.resnet_encoder import ResNetEncoder

        enc = self.module.encoder
        if self.layer == "encoder" and type(enc) is EcapaTdnnEncoder:
            x, L = _masked_ecapa(enc, feats, frames)
        elif self.layer == "encoder" and type(enc) is ResNetEncoder:
            x, L = _masked_resnet(enc, feats, frames)
        else:  # x-vector: the masked Conv1d / ReLU / BatchNorm1d stack, up to the chosen layer
            last = len(enc.layers) - 1 if self.layer == "encoder" else int(self.layer.split(".")[2])
            x, L = feats.transpose(1, 2), frames
            for layer in list(enc.layers)[: last + 1]:
                if isinstance(layer, torch.nn.Conv1d):
                    x, L = _apply_conv(layer, x, L)
                else:
                    x = layer(x) * _time_mask(L, x.shape[-1], 3)
        return x.transpose(1, 2), L  # (B, C, T') -> (B, T', C)

    def _run_module(self, wav: torch.Tensor, lengths: torch.Tensor) -> None:
        if self.forward_fn is not None:
            self.forward_fn(self.module, wav, lengths)
        elif self.spk is not None:
            self.module(wav, lengths, extract_embd=True)
        else:
            self.module(wav, lengths)

    def _single(self, wav: torch.Tensor, lengths: torch.Tensor):
        target = dict(self.module.named_modules())[self.layer]
        got: list = []

        def hook(_mod, _inp, out):
            got.append(_first_tensor(out))
            raise _Stop

        rows = []
        handle = target.register_forward_hook(hook)
        try:
            for i, L in enumerate(lengths.tolist()):
                got.clear()
                try:
                    self._run_module(wav[i: i + 1, :L], lengths[i: i + 1])
                except _Stop:
                    pass
                if not got:
                    raise ValueError(f"layer {self.layer!r} did not run in the module's forward")
                y = got[0]
                if y.dim() != 3 or y.shape[0] != 1:
                    raise ValueError(f"layer {self.layer!r} output has shape {tuple(y.shape)}; expected (1, T', C) "
                                     "or (1, C, T') (set time_axis)")
                y = y[0] if self.time_axis == 1 else y[0].transpose(0, 1)
                rows.append(y.float())
        finally:
            handle.remove()
        return pad_frames(rows)

    def _compute(self, wav: torch.Tensor, lengths: torch.Tensor):
        wav, lengths = check_batch(wav, lengths, self.min_samples)
        wav, lengths = wav.to(self.device), lengths.to(self.device)
        with torch.inference_mode():
            data, L = self._masked(wav, lengths) if self.batch_mode == "masked" else self._single(wav, lengths)
        return data.float().cpu(), L.to(torch.int64).cpu()

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor):
        """Hidden states of a padded batch.

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
            At :attr:`sample_rate` Hz, zero-padded.
        lengths : torch.Tensor of shape (B,), int64
            True lengths in samples.

        Returns
        -------
        dict
            ``{output: (states (B, T'_max, C) float32 on the CPU, frame_lengths (B,) int64)}``.

        Raises
        ------
        ValueError
            Bad shapes, a too-short utterance, or a layer output that is not 3-D.
        """
        return {self.output: self._compute(wav, lengths)}


def _device_of(module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
