"""The ESPnet-SPK backend class: :class:`EspnetSpeakerModel` (loading, batch modes, padding-invisible inference).

The masked forward functions are in :mod:`spk_toolkit.backends.espnet.masked`, model building and checkpoint
checks in :mod:`spk_toolkit.backends.espnet.checkpoint`; :mod:`spk_toolkit.backends.espnet` describes the whole.
This module imports only torch and spk_toolkit's backend base; espnet2 is imported when a model is built.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from spk_toolkit.backends.base import EmbeddingModel, register_backend, toolkit_output
from spk_toolkit.backends.espnet.checkpoint import build_espnet_model
from spk_toolkit.backends.espnet.masked import (
    _masked_ecapa,
    _masked_pooling,
    _masked_resnet,
    _masked_xvector,
    masked_support,
)

logger = logging.getLogger(__name__)

BATCH_MODES = ("auto", "masked", "grouped", "single")


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces (``OSError`` if it cannot be read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def module_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` runs: the device of its first parameter, else of its first buffer, else the CPU.

    A module without parameters or buffers (e.g. a fixed feature extractor honouring ESPnet's contract) has no
    device of its own; its inputs are then kept on the CPU.
    """
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 over a module's ``state_dict`` (names, dtypes, shapes and values, in key order).

    Identifies in-memory weights (a model being trained has no checkpoint file to hash), so that an extraction
    plan made with other weights is never resumed. A module without state hashes its class name.
    """
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}\t{t!r}\n".encode())
            continue
        t = t.detach()
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_sample_rate(model: torch.nn.Module, args=None) -> int:
    """Hz a speaker model expects: its frontend's mel rate (``frontend.logmel.mel_options["sr"]``), else
    ``args.sample_rate``, else 16000 (also for modules without a ``frontend``)."""
    fe = getattr(model, "frontend", None)
    logmel = getattr(fe, "logmel", None)
    if logmel is not None and "sr" in getattr(logmel, "mel_options", {}):
        return int(logmel.mel_options["sr"])
    if isinstance(getattr(fe, "sample_rate", None), int):  # spk_toolkit's KaldiFbankFrontend
        return int(fe.sample_rate)
    if getattr(args, "sample_rate", None):
        return int(args.sample_rate)
    return 16000


#: fallback reasons already logged in this process (the fallback is said once, not at every validation)
_FALLBACK_LOGGED: set = set()


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
        checkpoints with ``strict=False``; see :func:`spk_toolkit.backends.espnet.checkpoint.check_checkpoint`).
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
    tag_argument = "model_tag"
    requires = ("espnet2", "torch_complex", "sentencepiece", "librosa")
    install = ("pip install 'spk_toolkit[espnet]' -c constraints.txt && pip install --no-deps espnet==202611 "
               "(pip must not resolve espnet: it would replace torch); model tags also need espnet_model_zoo")
    description = ("ESPnet-SPK models (x-vector, ECAPA-TDNN, ResNet, ...) from train_config + model_file, or a "
                   "model_tag / unpacked model directory; masked, padding-invisible batches")

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
            with toolkit_output("espnet2"):  # its import prints "Failed to import Flash Attention" on stderr
                import espnet2.tasks.spk  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"the espnet backend needs espnet2 ({e}): {self.install}") from e

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

        model, args = build_espnet_model(self.train_config, self.model_file, str(self.device))
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
                key = (type(self.model).__qualname__, reason)
                (logger.info if key in _FALLBACK_LOGGED else logger.warning)(
                    "espnet backend: %s; falling back to batch_mode='grouped' (ESPnet's own forward on "
                    "utterances of exactly equal length, no padding) so results cannot depend on batching; "
                    "this is slower for bucketed batches of varied lengths",
                    reason,
                )
                _FALLBACK_LOGGED.add(key)
        self.batch_mode = batch_mode

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, batch_mode: str = "auto", sample_rate: Optional[int] = None
    ) -> "EspnetSpeakerModel":
        """Wrap an in-memory speaker model (no copy, no file), e.g. the one a trainer is training.

        Used by :class:`spk_toolkit.train.spk_trainer.SpkTrainer` so validation / ``extract_embed`` share this
        backend's masked forward. The model is used as it is (not moved, not switched to eval mode: the caller
        calls ``model.eval()``; in train mode BatchNorm would use batch statistics). ``device`` is that of the
        model's parameters, else of its buffers, else the CPU (:func:`module_device`).

        Any module with ESPnet's contract ``forward(speech (B, T), speech_lengths (B,) = None, ...,
        extract_embd=True) -> (B, D)`` is accepted, with or without parameters and with or without ESPnet's
        ``frontend`` / ``encoder`` / ``pooling`` / ``projector`` attributes: where :func:`masked_support` does not
        cover it, ``batch_mode="auto"`` uses the module's own forward on groups of exactly equal length
        (logged once per process and architecture).

        Parameters
        ----------
        model : torch.nn.Module
            ``espnet2.spk.espnet_model.ESPnetSpeakerModel`` or any module with its contract; unwrapped (not
            ``DistributedDataParallel``).
        batch_mode : {"auto", "masked", "grouped", "single"}
        sample_rate : int, optional
            Hz; default as for a loaded model (frontend's rate, else 16000).

        Raises
        ------
        ValueError
            Unknown ``batch_mode``, ``"masked"`` for an uncovered architecture, or a module whose embedding
            dimension cannot be found (no ``projector`` / ``pooling`` ``output_size()`` and a dummy forward of
            one second of silence fails or does not return ``(1, D)``).
        """
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        self = cls.__new__(cls)
        EmbeddingModel.__init__(self, device=module_device(model))
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
        """:func:`model_sample_rate` of the wrapped model."""
        return model_sample_rate(self.model, args)

    def _find_embed_dim(self) -> int:
        """D from ``projector.output_size()``, else ``pooling.output_size()``, else a dummy forward.

        The dummy forward embeds one second of silence (``(1, sample_rate)``) with ESPnet's contract.

        Raises
        ------
        ValueError
            The dummy forward fails or does not return a ``(1, D)`` tensor.
        """
        m = self.model
        for name in ("projector", "pooling"):
            part = getattr(m, name, None)
            if part is not None and callable(getattr(part, "output_size", None)):
                try:
                    return int(part.output_size())
                except Exception:  # noqa: BLE001 - try the next source, finally a dummy forward
                    pass
        try:
            with torch.inference_mode():
                x = torch.zeros(1, self.sample_rate, device=self.device)
                out = m(x, torch.tensor([x.shape[1]], device=self.device), extract_embd=True)
        except Exception as e:  # noqa: BLE001 - reported with the module named
            raise ValueError(f"cannot find the embedding dimension of {type(m).__name__}: a forward of 1 s of "
                             f"silence (1, {self.sample_rate}) failed ({type(e).__name__}: {e})") from e
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            raise ValueError(f"{type(m).__name__}.forward(speech (1, T), extract_embd=True) must return (1, D), got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return int(out.shape[-1])

    def _find_min_samples(self) -> int:
        """Shortest input the frontend's STFT accepts (``n_fft // 2 + 1`` when centred), else 1."""
        fe = getattr(self.model, "frontend", None)
        for obj in (getattr(fe, "stft", None), getattr(fe, "transform", None)):
            n_fft = getattr(obj, "n_fft", None)
            center = getattr(obj, "center", True)
            if n_fft:
                # STFT with center=True reflect-pads n_fft // 2 samples, which needs a longer input.
                return n_fft // 2 + 1 if center else n_fft
        return 1

    def describe(self) -> dict:
        """JSON-serialisable description (toolkit, files + sha256, sample rate, dimension, batch mode).

        A model without a checkpoint file (:meth:`from_model`, random init) also carries ``weights_sha256``
        (:func:`weights_sha256`, computed now: a model being trained changes), so that an extraction plan is
        only resumed with the same weights. ``encoder`` / ``pooling`` are None for modules without them.
        """
        m = self.model
        enc, pool = getattr(m, "encoder", None), getattr(m, "pooling", None)
        d = {
            "toolkit": self.name,
            "train_config": self.train_config,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "model_tag": self.model_tag,
            "sample_rate": self.sample_rate,
            "embed_dim": self.embed_dim,
            "batch_mode": self.batch_mode,
            "module": type(m).__name__,
            "encoder": None if enc is None else type(enc).__name__,
            "pooling": None if pool is None else type(pool).__name__,
            "l2_normalized": False,
        }
        if self.model_sha256 is None:
            d["weights_sha256"] = weights_sha256(m)
        return d

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
            if getattr(m, "normalize", None) is not None:
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
        ok, reason = masked_support(self.model)
        if not ok:
            raise ValueError(f"no masked forward: {reason}")
        feats, frames, divisor = self.features(wav, lengths)
        return self._masked_from_features(feats, frames, divisor)

    def _masked_from_features(self, feats: torch.Tensor, frames: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        """Masked encoder + pooling + projector on zero-padded features ``(B, T_f, F)`` (after normalize)."""
        from espnet2.spk.encoder.ecapa_tdnn_encoder import EcapaTdnnEncoder
        from espnet2.spk.encoder.resnet_encoder import ResNetEncoder

        enc = self.model.encoder
        if type(enc) is EcapaTdnnEncoder:
            x, L = _masked_ecapa(enc, feats, frames)
        elif type(enc) is ResNetEncoder:
            x, L = _masked_resnet(enc, feats, frames)
        else:
            x, L = _masked_xvector(enc, feats, frames)
        pooled = _masked_pooling(self.model.pooling, x, L, divisor)
        return self.model.project_spk_embd(pooled)

    def embed_features(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Embed features of a model without frontend (``frontend: null``, e.g. trained from cached fbank).

        The features go where the frontend's output would: ``normalize`` (per group of equal length, as
        :meth:`features` does), then the masked encoder and pooling (divisor: the frame counts, what ESPnet's model
        uses for an unpadded utterance) when :func:`masked_support` covers the architecture with ``features=True``,
        else ESPnet's own forward on groups of exactly equal length. So an utterance's embedding equals that of the
        same model with a frontend computing these features (:class:`spk_toolkit.features.espnet.KaldiFbankFrontend`)
        on its audio, and does not depend on its batch.

        Parameters
        ----------
        feats : torch.Tensor of shape (B, T, F), float
            Zero-padded after each utterance's frames.
        frames : torch.Tensor of shape (B,), int64
            True frame counts (``1 <= frames <= T``).

        Returns
        -------
        torch.Tensor of shape (B, D), float32, on the CPU

        Raises
        ------
        ValueError
            Bad shapes or frame counts.
        """
        if feats.dim() != 3:
            raise ValueError(f"features must be (B, T, F), got shape {tuple(feats.shape)}")
        frames = torch.as_tensor(frames).to(torch.int64).reshape(-1)
        if frames.numel() != feats.shape[0]:
            raise ValueError(f"{frames.numel()} frame counts for a batch of {feats.shape[0]}")
        if feats.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        if int(frames.max()) > feats.shape[1] or int(frames.min()) < 1:
            raise ValueError(f"frame counts must lie in [1, {feats.shape[1]}], got {frames.tolist()}")
        feats, frames = feats.to(self.device, torch.float32), frames.to(self.device)
        m = self.model
        ok, _ = masked_support(m, features=True)
        with torch.inference_mode():
            if ok and self.requested_batch_mode in ("auto", "masked"):
                per: List[Optional[torch.Tensor]] = [None] * feats.shape[0]
                for L, idx in self._groups(frames):
                    f = feats[idx, :L]
                    if getattr(m, "normalize", None) is not None:
                        f, _ = m.normalize(f, None)
                    for j, i in enumerate(idx.tolist()):
                        per[i] = f[j]
                padded = torch.nn.utils.rnn.pad_sequence(per, batch_first=True)
                out = self._masked_from_features(padded, frames, frames.to(torch.float32))
            else:
                out = [None] * feats.shape[0]
                for L, idx in self._groups(frames):
                    emb = m(feats[idx, :L], None, extract_embd=True)
                    for j, i in enumerate(idx.tolist()):
                        out[i] = emb[j]
                out = torch.stack(out)
        return out.float().cpu()

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
