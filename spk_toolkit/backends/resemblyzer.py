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

INSTALL = ("pip install resemblyzer==0.1.4 webrtcvad (both come with `pip install spk_toolkit`; "
           "webrtcvad builds with a C compiler)")


def _webrtcvad_without_pkg_resources():
    """A ``webrtcvad`` module over the same C extension, for when ``webrtcvad.py`` cannot import.

    webrtcvad 2.0.10's ``webrtcvad.py`` only reads its version through ``pkg_resources``, which setuptools >= 81
    no longer has; everything it does is the ``Vad`` wrapper below around ``_webrtcvad`` (the same functions,
    copied from webrtcvad 2.0.10, MIT licence, John Wiseman), so the VAD decisions are identical.
    """
    import types

    import _webrtcvad

    mod = types.ModuleType("webrtcvad", "webrtcvad (spk_toolkit: same _webrtcvad C extension, no pkg_resources)")

    class Vad:
        def __init__(self, mode=None):
            self._vad = _webrtcvad.create()
            _webrtcvad.init(self._vad)
            if mode is not None:
                self.set_mode(mode)

        def set_mode(self, mode):
            _webrtcvad.set_mode(self._vad, mode)

        def is_speech(self, buf, sample_rate, length=None):
            length = length or int(len(buf) / 2)
            if length * 2 > len(buf):
                raise IndexError(f"buffer has {int(len(buf) / 2.0)} frames, but length argument was {length}")
            return _webrtcvad.process(self._vad, sample_rate, buf, length)

    mod.Vad = Vad
    mod.valid_rate_and_frame_length = lambda rate, frame_length: _webrtcvad.valid_rate_and_frame_length(
        rate, frame_length)
    try:
        from importlib.metadata import version

        mod.__version__ = version("webrtcvad")
    except Exception:  # webrtcvad-wheels or a vendored build
        mod.__version__ = "unknown"
    return mod


def import_resemblyzer():
    """Import resemblyzer's ``VoiceEncoder``, ``audio`` and ``hparams`` quietly and with any setuptools.

    ``webrtcvad`` (imported by resemblyzer) needs ``pkg_resources``, which warns that it is deprecated
    (setuptools 67-80) or is gone (setuptools >= 81): the warning is silenced, and without ``pkg_resources`` the
    same C extension is used through :func:`_webrtcvad_without_pkg_resources`. scipy's and librosa's
    deprecation warnings raised by resemblyzer's own imports are silenced too.

    Returns
    -------
    (VoiceEncoder, audio, hparams)

    Raises
    ------
    ImportError
        resemblyzer or webrtcvad is not installed (the message says how to install them).
    """
    import sys
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        if "webrtcvad" not in sys.modules:
            try:
                import webrtcvad  # noqa: F401
            except ModuleNotFoundError as e:
                if e.name in ("webrtcvad", "_webrtcvad"):
                    raise ImportError(f"the resemblyzer backend needs webrtcvad: {INSTALL}") from e
                sys.modules["webrtcvad"] = _webrtcvad_without_pkg_resources()  # no pkg_resources
            except Exception:  # pkg_resources.DistributionNotFound: the module comes from another distribution
                sys.modules.pop("webrtcvad", None)
                sys.modules["webrtcvad"] = _webrtcvad_without_pkg_resources()
        try:
            from resemblyzer import VoiceEncoder, audio, hparams
        except ImportError as e:
            raise ImportError(f"the resemblyzer backend needs resemblyzer: {INSTALL} ({e})") from e
    return VoiceEncoder, audio, hparams


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
        resemblyzer or webrtcvad is not installed (both are dependencies of spk_toolkit).
    """

    name = "resemblyzer"
    requires = ("resemblyzer", "_webrtcvad", "librosa")
    install = INSTALL
    description = "GE2E speaker encoder (256-d, 16 kHz), pretrained weights in the resemblyzer wheel; offline default"
    sample_rate = 16000
    embed_dim = 256
    min_samples = 1600  # 0.1 s

    def __init__(self, device="cpu", vad: bool = True, rate: float = 1.3, min_coverage: float = 0.75,
                 max_partials: int = 32):
        super().__init__(device)
        VoiceEncoder, audio, hparams = import_resemblyzer()
        self._audio, self._hp = audio, hparams
        self.encoder = VoiceEncoder(device=self.device, verbose=False).eval()
        self.vad, self.rate, self.min_coverage, self.max_partials = vad, rate, min_coverage, max_partials
        self.samples_per_frame = int(hparams.sampling_rate * hparams.mel_window_step / 1000)

    def prepare(self, wav: np.ndarray) -> np.ndarray:
        """resemblyzer's ``preprocess_wav`` on a 16 kHz waveform (T,) -> (T',) when ``vad`` is on.

        The same operations as ``resemblyzer.audio.normalize_volume(wav, -30, increase_only=True)`` followed by
        ``trim_long_silences``, with the same numpy expressions (so the same samples, bit for bit), in bounded
        memory: resemblyzer builds the VAD's 16-bit PCM with ``struct.pack("%dh" % T, *samples)``, one Python int
        per sample (about 2 GB for an hour of audio); here the PCM is one int16 array given to the VAD window by
        window, and the result is one copy of the kept samples (peak: about twice the waveform).

        Parameters
        ----------
        wav : np.ndarray of shape (T,), float32 at 16 kHz
            Not all zero (the engine refuses silent audio before this).

        Returns
        -------
        np.ndarray of shape (T',), float32
        """
        if not self.vad:
            return wav
        from scipy.ndimage import binary_dilation

        hp, int16_max = self._hp, self._audio.int16_max
        # normalize_volume: rms = np.sqrt(np.mean((wav * int16_max) ** 2)), one temporary squared in place
        t = wav * int16_max
        np.square(t, out=t)
        rms = np.sqrt(np.mean(t))
        del t
        wave_dBFS = 20 * np.log10(rms / int16_max)
        dBFS_change = hp.audio_norm_target_dBFS - wave_dBFS
        factor = None if dBFS_change < 0 else (10 ** (dBFS_change / 20))  # increase only
        # trim_long_silences on the normalised waveform (wav * factor), never materialised as a whole
        spw = (hp.vad_window_length * hp.sampling_rate) // 1000
        n = len(wav) - (len(wav) % spw)
        pcm = np.empty(n, dtype=np.int16)
        block = spw * 4096
        for s0 in range(0, n, block):
            seg = wav[s0: min(s0 + block, n)]
            if factor is not None:
                seg = seg * factor
            pcm[s0: s0 + len(seg)] = (np.round(seg * int16_max)).astype(np.int16)
        vad = self._audio.webrtcvad.Vad(mode=3)
        voice_flags = np.array([vad.is_speech(pcm[w: w + spw].tobytes(), sample_rate=hp.sampling_rate)
                                for w in range(0, n, spw)])
        del pcm
        width = hp.vad_moving_average_width
        padded = np.concatenate((np.zeros((width - 1) // 2), voice_flags, np.zeros(width // 2)))
        ret = np.cumsum(padded, dtype=float)
        ret[width:] = ret[width:] - ret[:-width]
        audio_mask = np.round(ret[width - 1:] / width).astype(bool)
        audio_mask = binary_dilation(audio_mask, np.ones(hp.vad_max_silence_length + 1))
        out = wav[:n][np.repeat(audio_mask, spw)]
        if factor is not None:
            out *= factor  # (wav * factor)[mask] == wav[mask] * factor, element by element
        return out.astype(np.float32, copy=False)

    def _partial_mels(self, wav: np.ndarray):
        """Yield the mel partial windows of one prepared utterance, ``max_partials`` at a time: (n, 160, 40).

        Equal to resemblyzer's ``wav_to_mel_spectrogram`` of the whole (zero-padded) utterance followed by its
        partial slices: librosa's centred STFT pads with zeros, so frame ``j`` covers samples
        ``[j * hop - n_fft // 2, j * hop - n_fft // 2 + n_fft)`` of the waveform (zeros outside it), and each block
        of partials is computed from just the samples its frames cover (``center=False``). Memory is bounded by a
        block, whatever the utterance's length (a whole-hour spectrogram and its partials took gigabytes).
        """
        import librosa

        hp = self._hp
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), self.rate, self.min_coverage)
        hop = self.samples_per_frame
        n_fft = int(hp.sampling_rate * hp.mel_window_length / 1000)
        half = n_fft // 2
        for g in range(0, len(mel_slices), self.max_partials):
            group = mel_slices[g: g + self.max_partials]
            f0, f1 = group[0].start, group[-1].stop
            a, b = f0 * hop - half, (f1 - 1) * hop - half + n_fft
            seg = np.zeros(b - a, dtype=np.float32)
            lo, hi = max(a, 0), min(b, len(wav))
            if hi > lo:
                seg[lo - a: hi - a] = wav[lo:hi]
            mel = librosa.feature.melspectrogram(y=seg, sr=hp.sampling_rate, n_fft=n_fft, hop_length=hop,
                                                 n_mels=hp.mel_n_channels, center=False).astype(np.float32).T
            yield np.stack([mel[s.start - f0: s.stop - f0] for s in group])

    def _partials(self, wav: np.ndarray) -> np.ndarray:
        """Mel partial windows of one prepared utterance: (n_partials, 160, 40) (see :meth:`_partial_mels`)."""
        return np.concatenate(list(self._partial_mels(wav)))

    @torch.inference_mode()
    def embed(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed prepared waveforms ``wav (B, T)`` at 16 kHz with true ``lengths (B,)`` -> ``(B, 256)``.

        The partial windows of all utterances go through the LSTM ``max_partials`` at a time, in utterance order
        (the same forwards as concatenating them all), and are summed per utterance as they come: memory is
        bounded by ``max_partials`` windows, not by the batch's or one utterance's length.

        Raises
        ------
        ValueError
            ``wav`` is not (B, T) or ``lengths`` not (B,).
        """
        if wav.ndim != 2 or lengths.shape != (wav.shape[0],):
            raise ValueError(f"expected wav (B, T) and lengths (B,), got {tuple(wav.shape)} and {tuple(lengths.shape)}")
        x = wav.cpu().numpy()
        B = x.shape[0]
        sums = None
        counts = np.zeros(B, dtype=np.int64)
        pending, owners = [], []

        def forward(k: int):
            nonlocal sums, pending, owners
            mels, own = np.concatenate(pending), np.concatenate(owners)
            pending, owners = ([mels[k:]], [own[k:]]) if k < len(mels) else ([], [])
            with full_fp32():  # TF32 on a GPU would move results by ~3e-4 from embed_utterance on the CPU
                partial = self.encoder(torch.from_numpy(np.ascontiguousarray(mels[:k])).to(self.device))
            if sums is None:
                sums = torch.zeros(B, partial.shape[1], dtype=partial.dtype, device=partial.device)
            # regroup: sum of each utterance's partial embeddings (mean and L2 norm below, as embed_utterance)
            sums.index_add_(0, torch.from_numpy(own[:k]).to(partial.device), partial)

        n_pending = 0
        for i in range(B):
            for block in self._partial_mels(x[i, : int(lengths[i])]):
                pending.append(block)
                owners.append(np.full(len(block), i, dtype=np.int64))
                counts[i] += len(block)
                n_pending += len(block)
                while n_pending >= self.max_partials:
                    forward(self.max_partials)
                    n_pending -= self.max_partials
        if n_pending:
            forward(n_pending)
        means = sums / torch.from_numpy(counts).unsqueeze(1).to(sums.dtype).to(sums.device)
        return torch.nn.functional.normalize(means, dim=1).float().cpu()

    def describe(self) -> dict:
        return {**super().describe(), "model": "resemblyzer-0.1.4 GE2E pretrained.pt", "vad": self.vad,
                "rate": self.rate, "min_coverage": self.min_coverage}
