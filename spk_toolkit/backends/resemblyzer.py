"""Offline default backend: resemblyzer's GE2E speaker encoder (256-d, 16 kHz, weights shipped in the wheel).

Reference: Wan et al., "Generalized End-to-End Loss for Speaker Verification", ICASSP 2018; resemblyzer 0.1.4
(Apache-2.0). ``VoiceEncoder.embed_utterance`` cuts an utterance into 1.6 s partial windows (rate 1.3 /s,
min coverage 0.75), embeds each with a 3-layer LSTM and averages. Each partial is independent, so batching is
exact: we gather the partial windows of every utterance in a batch into one forward and regroup them per
utterance. Results equal ``embed_utterance`` on the same prepared waveform (tested within 1e-5; on a GPU the
LSTM runs in full float32, not TF32, to keep that).
"""
from __future__ import annotations

import numpy as np
import torch

from spk_toolkit.backends.base import EmbeddingModel, full_fp32, register_backend


@register_backend
class ResemblyzerModel(EmbeddingModel):
    """GE2E x-vector-like embeddings from resemblyzer, batched over partial windows.

    Parameters
    ----------
    device : str or torch.device
        Where the LSTM runs.
    vad : bool
        Apply resemblyzer's preparation (volume normalisation to -30 dBFS, increase only, and webrtcvad
        trimming of long silences) in :meth:`prepare`, as ``resemblyzer.preprocess_wav`` does. Default True.
    rate : float
        Partial windows per second (resemblyzer default 1.3).
    min_coverage : float
        Keep the last partial window if it covers at least this fraction (default 0.75).
    max_partials : int
        Partial windows per LSTM forward (memory bound).

    Embeddings are L2-normalised (as resemblyzer returns them), float32, shape (256,).

    Raises
    ------
    ImportError
        resemblyzer is not installed (``pip install resemblyzer==0.1.4 webrtcvad``).
    """

    name = "resemblyzer"
    sample_rate = 16000
    embed_dim = 256
    min_samples = 1600  # 0.1 s

    def __init__(self, device="cpu", vad: bool = True, rate: float = 1.3, min_coverage: float = 0.75,
                 max_partials: int = 32):
        super().__init__(device)
        try:
            from resemblyzer import VoiceEncoder, audio, hparams
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the resemblyzer backend needs `pip install resemblyzer==0.1.4 webrtcvad` (setuptools<81)"
            ) from e
        self._audio, self._hp = audio, hparams
        self.encoder = VoiceEncoder(device=self.device, verbose=False).eval()
        self.vad, self.rate, self.min_coverage, self.max_partials = vad, rate, min_coverage, max_partials
        self.samples_per_frame = int(hparams.sampling_rate * hparams.mel_window_step / 1000)

    def prepare(self, wav: np.ndarray) -> np.ndarray:
        """resemblyzer's ``preprocess_wav`` on a 16 kHz waveform (T,) -> (T',) when ``vad`` is on."""
        if not self.vad:
            return wav
        return self._audio.preprocess_wav(wav).astype(np.float32, copy=False)

    def _partials(self, wav: np.ndarray) -> np.ndarray:
        """Mel partial windows of one prepared utterance: (n_partials, 160, 40)."""
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), self.rate, self.min_coverage)
        need = wav_slices[-1].stop
        if need >= len(wav):
            wav = np.pad(wav, (0, need - len(wav)))
        mel = self._audio.wav_to_mel_spectrogram(wav)
        return np.stack([mel[s] for s in mel_slices])

    @torch.inference_mode()
    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed prepared waveforms ``wav (B, T)`` at 16 kHz with true ``lengths (B,)`` -> ``(B, 256)``."""
        if wav.ndim != 2 or lengths.shape != (wav.shape[0],):
            raise ValueError(f"expected wav (B, T) and lengths (B,), got {tuple(wav.shape)} and {tuple(lengths.shape)}")
        x = wav.cpu().numpy()
        parts = [self._partials(x[i, : int(lengths[i])]) for i in range(x.shape[0])]
        owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        mels = torch.from_numpy(np.concatenate(parts)).to(self.device)
        with full_fp32():  # TF32 on a GPU would move results by ~3e-4 from embed_utterance on the CPU
            partial = torch.cat(
                [self.encoder(mels[k : k + self.max_partials]) for k in range(0, len(mels), self.max_partials)]
            )
        # Regroup: mean of each utterance's partial embeddings, then L2-normalise (as embed_utterance does).
        owner_t = torch.from_numpy(owner).to(partial.device)
        sums = torch.zeros(len(parts), partial.shape[1], dtype=partial.dtype, device=partial.device)
        sums.index_add_(0, owner_t, partial)
        means = sums / torch.bincount(owner_t, minlength=len(parts)).unsqueeze(1).to(partial.dtype)
        return torch.nn.functional.normalize(means, dim=1).float().cpu()

    def describe(self) -> dict:
        return {**super().describe(), "model": "resemblyzer-0.1.4 GE2E pretrained.pt", "vad": self.vad,
                "rate": self.rate, "min_coverage": self.min_coverage}
