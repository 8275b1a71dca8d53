"""SpeechBrain speaker encoders (``speechbrain.inference.speaker.EncoderClassifier``), batched with padding invisible.

``EncoderClassifier.encode_batch(wavs, wav_lens)`` computes Fbank features on the padded batch, normalises them
per sentence (``mean_var_norm``) and runs the encoder with relative lengths. Relative lengths mask the
squeeze-excitation means and the attentive statistics pooling, but not everything: the encoder's ``"same"``
convolutions pad each side of the *batch* by reflection, so an utterance's last frames see the batch's padding
instead of its own reflection, and the number of valid frames is rounded from ``wav_lens`` (measured with a
random ECAPA-TDNN, docs/tts.md). PR #6227's parallel extractor calls ``encode_batch`` without ``wav_lens`` and
``torch.stack``s the waveforms, which fails on unequal lengths.

:class:`SpeechBrainModel` (registered as ``"speechbrain"``) runs SpeechBrain's own modules so that an embedding
does not depend on the batch (``batch_mode="masked"``):

* ``compute_features`` and ``mean_var_norm`` per utterance (utterances of exactly equal length share a call), so
  the STFT edges and the sentence statistics are those of the utterance alone;
* the encoder on the zero-padded features, with *frame-exact* relative lengths ``(F_i - 1/4) / F_max`` (every
  ``length_to_mask(lengths * L)`` and ``round(lengths * L)`` in SpeechBrain then gives exactly ``F_i`` frames,
  with no floating-point off-by-one), and forward hooks on every SpeechBrain ``Conv1d`` that, before the
  convolution, write each utterance's own right-edge padding (its reflection, edge value or zeros, as the
  layer's ``padding_mode``) just after its last valid frame; the valid outputs of every layer are then those of
  the utterance alone. The hooks are inactive outside this backend's forward (thread-local state), so the
  ``EncoderClassifier`` still works as usual.

``"masked"`` covers ``ECAPA_TDNN`` and ``Xvector`` encoders whose convolutions are stride-1 ``"same"`` (or
kernel 1) SpeechBrain ``Conv1d`` layers; for other encoders ``"auto"`` falls back to ``"grouped"`` (the encoder
on groups of exactly equal length, no padding) with a warning. ``"padded"`` is SpeechBrain's own
``encode_batch`` with true relative ``wav_lens`` (not exact; for comparisons).

Audio: the engine decodes, down-mixes (channel mean, as SpeechBrain's ``AudioNormalizer(mix="avg-to-mono")``)
and resamples with soxr (HQ) to the model's rate, ``EncoderClassifier.audio_normalizer.sample_rate`` (16 kHz for
the VoxCeleb models). ESPnet's ``extract_spk_embed.py`` resamples with the ``AudioNormalizer`` (torchaudio's
sinc interpolation) instead; both are band-limited resamplers, the embeddings differ at the resampler's
precision. Embeddings are the encoder output ``(D,)`` float32 (192 for ``spkrec-ecapa-voxceleb``), not
L2-normalised; ``normalize=True`` applies the model's ``mean_var_norm_emb`` as ``encode_batch(...,
normalize=True)`` does (ESPnet does not).

Source: speechbrain 1.1.2, ``speechbrain/inference/classifiers.py`` (``EncoderClassifier.encode_batch``),
``speechbrain/nnet/CNN.py`` (``Conv1d._manage_padding``), ``speechbrain/lobes/models/ECAPA_TDNN.py``.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from spk_toolkit.backends.base import EmbeddingModel, register_backend

logger = logging.getLogger(__name__)

BATCH_MODES = ("auto", "masked", "grouped", "padded")
#: Encoder classes whose forward is covered by the masked mode (speechbrain.lobes.models).
MASKED_ENCODERS = ("ECAPA_TDNN", "Xvector")
_PAD_MODES = ("reflect", "replicate", "constant")


def _frame_lengths_rel(frames: torch.Tensor, f_max: int) -> torch.Tensor:
    """Relative lengths that SpeechBrain turns back into exactly ``frames`` (see the module docstring).

    float32 like SpeechBrain's own ``wav_lens`` (the masks take their dtype); ``(F - 1/4) / F_max * F_max`` stays
    within 1/4 of ``F - 1/4`` in float32 for any ``F_max`` below 10**6 frames (almost 3 hours at 10 ms).
    """
    return (frames.to(torch.float32) - 0.25) / float(f_max)


def masked_support(embedding_model: torch.nn.Module) -> Tuple[bool, str]:
    """Whether :class:`SpeechBrainModel`'s masked forward is exact for ``embedding_model``.

    Returns
    -------
    (bool, str)
        ``(True, "")``, or ``(False, reason)`` naming the first module that is not covered.
    """
    from speechbrain.nnet.CNN import Conv1d as SBConv1d

    name = type(embedding_model).__name__
    if name not in MASKED_ENCODERS:
        return False, f"encoder {name} has no masked forward (covered: {', '.join(MASKED_ENCODERS)})"
    inner = set()
    for mod in embedding_model.modules():
        if isinstance(mod, SBConv1d):
            inner.add(id(mod.conv))
            if mod.stride != 1 or mod.unsqueeze or (mod.kernel_size > 1 and mod.padding != "same"):
                return False, f"Conv1d with stride {mod.stride}, padding {mod.padding!r} is not covered"
            if mod.kernel_size > 1 and mod.padding_mode not in _PAD_MODES:
                return False, f"Conv1d padding_mode {mod.padding_mode!r} is not covered"
    for mod in embedding_model.modules():
        if isinstance(mod, (torch.nn.RNNBase, torch.nn.MultiheadAttention)):
            return False, f"{type(mod).__name__} layers are not covered"
        if isinstance(mod, torch.nn.modules.conv._ConvNd) and id(mod) not in inner and max(mod.kernel_size) > 1:
            return False, f"a bare {type(mod).__name__} with kernel {mod.kernel_size} is not covered"
        if isinstance(mod, (torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd)):
            return False, f"{type(mod).__name__} layers are not covered"
    return True, ""


class _EdgeHooks:
    """Forward hooks on SpeechBrain ``Conv1d`` layers writing each utterance's own right-edge padding.

    Active only while :attr:`frames` (thread-local) holds the valid frame counts ``(B,)`` of the batch being
    encoded; elsewhere the layers behave as SpeechBrain's.
    """

    def __init__(self, embedding_model: torch.nn.Module):
        from speechbrain.nnet.CNN import Conv1d as SBConv1d

        self.local = threading.local()
        self.handles = []
        for mod in embedding_model.modules():
            if isinstance(mod, SBConv1d) and mod.kernel_size > 1:
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(self._post))

    @property
    def frames(self) -> Optional[torch.Tensor]:
        return getattr(self.local, "frames", None)

    def set(self, frames: Optional[torch.Tensor]) -> None:
        self.local.frames = frames

    def _pre(self, mod, args):
        frames = self.frames
        if frames is None:
            return None
        x = args[0]
        tdim = 2 if mod.skip_transpose else 1  # (B, C, T) or (B, T, C)
        T = x.shape[tdim]
        if T != int(frames.max()):
            raise RuntimeError(f"masked forward: a Conv1d sees {T} frames, expected {int(frames.max())} "
                               "(the encoder changes the time axis; use batch_mode='grouped')")
        p = mod.dilation * (mod.kernel_size - 1) // 2
        # positions 0 .. T+p-1 of each utterance: itself, then its own padding of p frames after frame L-1
        t = torch.arange(T + p, device=x.device).unsqueeze(0)  # (1, T+p)
        L = frames.to(x.device).unsqueeze(1)  # (B, 1)
        if mod.padding_mode == "reflect":
            src = torch.where(t < L, t, 2 * (L - 1) - t)
        else:  # replicate: the last valid frame; constant: any valid frame, zeroed below
            src = torch.where(t < L, t, L - 1)
        src = src.clamp(0, T - 1)
        if tdim == 2:
            y = torch.gather(x, 2, src.unsqueeze(1).expand(x.shape[0], x.shape[1], T + p))
        else:
            y = torch.gather(x, 1, src.unsqueeze(2).expand(x.shape[0], T + p, x.shape[2]))
        if mod.padding_mode == "constant":
            keep = (t < L).to(x.dtype)
            y = y * (keep.unsqueeze(1) if tdim == 2 else keep.unsqueeze(2))
        mod._spk_T = T
        return (y,) + tuple(args[1:])

    def _post(self, mod, args, out):
        if self.frames is None:
            return None
        T = mod._spk_T
        return out[:, :, :T] if mod.skip_transpose else out[:, :T]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _hparams_file_defines(path: Path, key: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(rf"^{re.escape(key)}\s*:", text, flags=re.M) is not None



def drop_unloaded_lazy_modules() -> int:
    """Remove SpeechBrain's not-yet-imported ``LazyModule`` placeholders from ``sys.modules``; returns how many.

    SpeechBrain 1.x registers lazy placeholders (e.g. ``speechbrain.integrations.k2_fsa``) in ``sys.modules``.
    Code that walks ``sys.modules`` and reads module attributes (hypothesis, ``inspect.getmodule`` from another
    frame, pickling helpers) then triggers their import, and an optional dependency that is absent (``k2``) raises
    ``ImportError`` in code that never asked for it. Without the placeholder a later ``import`` of such a module
    is simply a real import; the attribute on the parent package is untouched.
    """
    import sys

    try:
        from speechbrain.utils.importutils import LazyModule
    except ImportError:  # pragma: no cover - another speechbrain layout
        return 0
    lazy = [n for n, m in list(sys.modules.items()) if isinstance(m, LazyModule) and m.lazy_module is None]
    for n in lazy:
        del sys.modules[n]
    return len(lazy)

@register_backend
class SpeechBrainModel(EmbeddingModel):
    """A SpeechBrain ``EncoderClassifier`` (ECAPA-TDNN, x-vector, ...) with padding-invisible batches.

    Parameters
    ----------
    source : str or path
        A local model directory (``hyperparams.yaml`` plus the checkpoint files its ``pretrainer`` names, e.g.
        ``embedding_model.ckpt``) or a Hugging Face id such as ``speechbrain/spkrec-ecapa-voxceleb`` (needs the
        network or the HF cache). For a local directory whose ``hyperparams.yaml`` defines ``pretrained_path``
        (the hub id it was downloaded from), ``pretrained_path`` is set to the directory, so nothing is fetched.
    device : str or torch.device
        ``cpu``, ``cuda``, ``cuda:N``.
    batch_mode : {"auto", "masked", "grouped", "padded"}
        See the module docstring (``auto``: masked where covered, else grouped with a warning).
    normalize : bool
        Apply the model's ``mean_var_norm_emb`` to the embeddings (``encode_batch(normalize=True)``).
    savedir : str or path, optional
        Where SpeechBrain links fetched files (default: none; files are used where they are: the local
        directory, or the HF cache).

    Attributes
    ----------
    classifier : speechbrain.inference.classifiers.EncoderClassifier
    sample_rate : int
        ``classifier.audio_normalizer.sample_rate`` (the rate the model was trained at).
    embed_dim : int
        Found by embedding 1 s of silence.
    batch_mode : str
        The mode in use (``masked``, ``grouped`` or ``padded``).

    Raises
    ------
    ImportError
        speechbrain is not installed (``pip install -c constraints.txt speechbrain==1.1.2``, ``make setup``).
    ValueError
        Unknown ``batch_mode``; ``"masked"`` for an encoder it does not cover; ``source`` missing.
    FileNotFoundError
        A local ``source`` without ``hyperparams.yaml``.
    """

    name = "speechbrain"
    tag_argument = "source"  # --model speechbrain:<source> (spk_toolkit.models)
    requires = ("speechbrain", "torchaudio", "hyperpyyaml")
    install = "pip install -c constraints.txt speechbrain==1.1.2 (or `make setup`; no network needed for a local model)"
    description = ("SpeechBrain EncoderClassifier (ECAPA-TDNN, x-vector) from a local directory or hub id; masked, "
                   "padding-invisible batches")

    def __init__(self, source: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu",
                 batch_mode: str = "auto", normalize: bool = False, savedir: Optional[str | os.PathLike] = None):
        super().__init__(device=device)
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        if source is None:
            raise ValueError("the speechbrain backend needs source= (a model directory or a hub id; "
                             "--pretrained_model on the command line)")
        try:
            from speechbrain.inference.speaker import EncoderClassifier
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the speechbrain backend needs speechbrain: `make setup`, or "
                              "`pip install -c constraints.txt speechbrain==1.1.2`") from e
        drop_unloaded_lazy_modules()
        src = os.fspath(source)
        overrides = {}
        self.local = Path(src).is_dir()
        if self.local:
            hp = Path(src) / "hyperparams.yaml"
            if not hp.is_file():
                raise FileNotFoundError(f"{hp} not found (a SpeechBrain model directory needs hyperparams.yaml)")
            src = str(Path(src).resolve())
            if _hparams_file_defines(hp, "pretrained_path"):
                overrides["pretrained_path"] = src
        self.source = src
        self.classifier = EncoderClassifier.from_hparams(
            source=src, savedir=None if savedir is None else os.fspath(savedir), overrides=overrides,
            run_opts={"device": str(self.device)})
        self.classifier.mods.eval()
        self.normalize = bool(normalize)
        self.sample_rate = int(getattr(self.classifier.audio_normalizer, "sample_rate", 16000))
        self.encoder = self.classifier.mods.embedding_model
        ok, reason = masked_support(self.encoder)
        if batch_mode == "masked" and not ok:
            raise ValueError(f"batch_mode='masked' not available: {reason}")
        if batch_mode == "auto":
            batch_mode = "masked" if ok else "grouped"
            if not ok:
                logger.warning("speechbrain backend: %s; falling back to batch_mode='grouped' (the encoder on "
                               "utterances of exactly equal length, no padding)", reason)
        self.batch_mode = batch_mode
        self._hooks = _EdgeHooks(self.encoder) if batch_mode == "masked" else None
        self.hop = self._find_hop()
        pads = [m.dilation * (m.kernel_size - 1) // 2 for m in self._sb_convs()]
        # reflect padding needs more frames than the widest pad (SpeechBrain's own forward refuses fewer too)
        self.min_samples = max(1, (max(pads, default=0) + 1) * self.hop)
        self.embed_dim = int(self._features_embed([torch.zeros(self.sample_rate)]).shape[-1])

    def _sb_convs(self) -> List[torch.nn.Module]:
        from speechbrain.nnet.CNN import Conv1d as SBConv1d

        return [m for m in self.encoder.modules() if isinstance(m, SBConv1d)]

    def _find_hop(self) -> int:
        """Samples per feature frame (the Fbank's STFT hop), else 160."""
        stft = getattr(getattr(self.classifier.mods, "compute_features", None), "compute_STFT", None)
        hop = getattr(stft, "hop_length", None)
        return int(hop) if hop else 160

    # ------------------------------------------------------------------------------------------------ inference
    def _features(self, wav: torch.Tensor) -> torch.Tensor:
        """Features + sentence normalisation of a group of equal-length waveforms ``(n, L)`` -> ``(n, F, C)``."""
        mods = self.classifier.mods
        ones = torch.ones(wav.shape[0], device=wav.device)
        feats = mods.compute_features(wav)
        return mods.mean_var_norm(feats, ones)

    def _finish(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D)`` encoder output -> ``(B, D)``, with ``mean_var_norm_emb`` when :attr:`normalize`."""
        if self.normalize:
            emb = self.classifier.hparams.mean_var_norm_emb(emb, torch.ones(emb.shape[0], device=emb.device))
        return emb.reshape(emb.shape[0], -1)

    def _features_embed(self, wavs: List[torch.Tensor]) -> torch.Tensor:
        """Embed one utterance at a time (used for the dimension): list of ``(L,)`` -> ``(N, D)`` on the device."""
        with torch.inference_mode():
            out = []
            for w in wavs:
                f = self._features(w.to(self.device, torch.float32).unsqueeze(0))
                out.append(self._finish(self.encoder(f, torch.ones(1, device=self.device))))
            return torch.cat(out)

    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed a zero-padded batch; each embedding is independent of the batch it came in (masked / grouped).

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
            Waveforms at :attr:`sample_rate` Hz, zero-padded after each utterance's true length.
        lengths : torch.Tensor of shape (B,), int64
            True lengths in samples.

        Returns
        -------
        torch.Tensor of shape (B, D), float32, on the CPU

        Raises
        ------
        ValueError
            Bad shapes, or a length above ``T`` or below :attr:`min_samples`.
        """
        if wav.dim() != 2:
            raise ValueError(f"wav must be (B, T), got shape {tuple(wav.shape)}")
        lengths = torch.as_tensor(lengths).to(torch.int64).reshape(-1)
        if lengths.numel() != wav.shape[0]:
            raise ValueError(f"{lengths.numel()} lengths for a batch of {wav.shape[0]}")
        if wav.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        if int(lengths.max()) > wav.shape[1] or int(lengths.min()) < self.min_samples:
            raise ValueError(f"lengths must be in [{self.min_samples}, {wav.shape[1]}] samples, got "
                             f"{int(lengths.min())}..{int(lengths.max())}")
        wav = wav.to(self.device, torch.float32)
        dev_len = lengths.to(self.device)
        with torch.inference_mode():
            if self.batch_mode == "padded":
                rel = lengths.to(torch.float32) / float(wav.shape[1])
                out = self.classifier.encode_batch(wav, rel.to(self.device), normalize=self.normalize)
                return out.reshape(out.shape[0], -1).float().cpu()
            per: List[Optional[torch.Tensor]] = [None] * wav.shape[0]
            for L in torch.unique(lengths).tolist():
                idx = torch.nonzero(dev_len == L).flatten()
                f = self._features(wav[idx, : int(L)])
                for j, i in enumerate(idx.tolist()):
                    per[i] = f[j]
            if self.batch_mode == "grouped":
                out = [None] * wav.shape[0]
                for n in sorted({p.shape[0] for p in per}):
                    idx = [i for i, p in enumerate(per) if p.shape[0] == n]
                    emb = self._finish(self.encoder(torch.stack([per[i] for i in idx]),
                                                    torch.ones(len(idx), device=self.device)))
                    for j, i in enumerate(idx):
                        out[i] = emb[j]
                return torch.stack(out).float().cpu()
            frames = torch.tensor([p.shape[0] for p in per], dtype=torch.int64, device=self.device)
            feats = torch.nn.utils.rnn.pad_sequence(per, batch_first=True)  # (B, F_max, C), zero after each
            self._hooks.set(frames)
            try:
                emb = self.encoder(feats, _frame_lengths_rel(frames, feats.shape[1]).to(self.device))
            finally:
                self._hooks.set(None)
            return self._finish(emb).float().cpu()

    def describe(self) -> dict:
        """JSON-serialisable description (toolkit, source, checkpoint sha256s, rate, dimension, batch mode)."""
        import hashlib

        d = {**super().describe(), "source": self.source, "batch_mode": self.batch_mode,
             "normalize": self.normalize, "encoder": type(self.encoder).__name__, "l2_normalized": False}
        if self.local:
            h = hashlib.sha256()
            for p in sorted(Path(self.source).iterdir()):
                if p.is_file() and p.suffix in (".ckpt", ".yaml", ".txt"):
                    h.update(p.name.encode() + b"\0" + p.read_bytes())
            d["files_sha256"] = h.hexdigest()
        return d
