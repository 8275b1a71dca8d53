"""Kaldi-compatible log-mel filterbanks and MFCCs (``torchaudio.compliance.kaldi``), per utterance on its true length.

Why ``torchaudio.compliance.kaldi``: it reproduces Kaldi's ``compute-fbank-feats`` / ``compute-mfcc-feats``
(povey window, pre-emphasis, DC removal, ``snip_edges``, Kaldi's mel banks and DCT; torchaudio tests it against
Kaldi's binaries), it is the fbank that WeSpeaker, 3D-Speaker and SpeechBrain's ``Fbank(..., kaldi)`` users feed
their speaker models, it is pure PyTorch (CPU or GPU, no compiled extension: it imports with torchaudio's
Python part alone, which this project already has) and adds no dependency. kaldi-native-fbank (C++, one more
wheel) computes the same features; ESPnet's ``DefaultFrontend`` is not Kaldi-compatible (librosa mel banks,
centred STFT). docs/features.md has the measured cost.

Each utterance is computed alone on its true length (Kaldi's own way: one waveform per call), so its features
equal those of a batch of one exactly, whatever it was batched with (DESIGN.md property 1), and no padded frame
exists. ``dither`` must be 0: dithered features are random, a cache of them would not be reproducible.

Input scale: Kaldi reads 16-bit samples as integers; our waveforms are float in [-1, 1]. ``scale=32768``
(default) multiplies them back, so the features equal Kaldi's on the same 16-bit file (WeSpeaker's
``waveform * (1 << 15)``); ``scale=1`` gives torchaudio's convention (log energies lower by ``2 ln 32768``).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from spk_toolkit.backends.base import OutputKind, register_backend
from spk_toolkit.features.base import FEATURE_DTYPES, FeatureExtractor, check_batch, check_dtype, pad_frames

__all__ = ["KaldiFbank", "KaldiMfcc"]

# options we set ourselves (sample_frequency from sample_rate; one channel; no minimum duration: the engine's)
_RESERVED = ("waveform", "channel", "sample_frequency", "min_duration")


def _kaldi():
    try:
        import torchaudio.compliance.kaldi as kaldi
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Kaldi-compatible fbank/mfcc need torchaudio's Python part "
                          "(pip install --no-deps torchaudio matching your torch)") from e
    return kaldi


def _coerce(name: str, value, default):
    """``value`` as the type of torchaudio's ``default`` (bool, int, float, str).

    Raises
    ------
    ValueError
        A value that is not of that kind (``num_mel_bins=80.5``, ``snip_edges="yes"``), naming the option.
    """
    kind = type(default)
    ok = True
    if kind is bool:
        ok = isinstance(value, (bool, np.bool_))
    elif kind is int:
        ok = not isinstance(value, bool) and isinstance(value, (int, np.integer, float)) and float(value).is_integer()
    elif kind is float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    elif kind is str:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"option {name}={value!r} must be {kind.__name__} like its default {default!r}")
    return kind(value)


class _KaldiFeature(FeatureExtractor):
    """Common part of :class:`KaldiFbank` and :class:`KaldiMfcc` (one torchaudio function, its options)."""

    _function = ""
    _defaults: Dict[str, object] = {}
    _output = ""

    def __init__(self, sample_rate: int = 16000, scale: float = 32768.0, dtype: str = "float32",
                 output: str | None = None, device: str | torch.device = "cpu", **kaldi_options):
        super().__init__(device=device)
        fn = getattr(_kaldi(), self._function)
        params = {n: p.default for n, p in inspect.signature(fn).parameters.items() if n not in _RESERVED}
        unknown = sorted(set(kaldi_options) - set(params))
        if unknown:
            bad = [u for u in unknown if u in _RESERVED]
            hint = f" ({', '.join(bad)} is set from sample_rate / by the engine)" if bad else ""
            raise ValueError(f"unknown {self.name} option(s) {', '.join(unknown)}{hint}; known: "
                             f"{', '.join(sorted(params))}")
        # values as the defaults' types (25 and 25.0 are one config: the same fingerprint from YAML or Python)
        given = {k: _coerce(k, v, params[k]) for k, v in {**self._defaults, **kaldi_options}.items()}
        opts = {**params, **given}
        if float(opts["dither"]) != 0.0:
            raise ValueError(f"dither={opts['dither']}: dithered features are random and a cache of them is not "
                             "reproducible; use dither=0 (add noise at training time instead)")
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
        if not float(opts["frame_shift"]) > 0 or not float(opts["frame_length"]) > 0:
            raise ValueError(f"frame_length and frame_shift must be > 0 ms, got {opts['frame_length']}, "
                             f"{opts['frame_shift']}")
        self.sample_rate = int(sample_rate)
        self.scale = float(scale)
        self.dtype = check_dtype(dtype, FEATURE_DTYPES, self.name)
        self.output = output or self._output
        self.options = opts
        self._fn = fn
        # torchaudio's own checks (window in [2, T]); shorter utterances become errors, not crashes
        self.min_samples = max(2, int(self.sample_rate * float(opts["frame_length"]) * 0.001))
        x = torch.zeros(1, self.min_samples)
        x[0, ::7] = 0.01
        try:  # validates the options once, here (torchaudio checks with assert)
            self.dim = int(self._compute_one(x[0]).shape[1])
        except (AssertionError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{self.name} options rejected by torchaudio.compliance.kaldi: {e or type(e).__name__}"
                             ) from None

    @property
    def frame_rate(self) -> float:
        """Frames per second (``1000 / frame_shift``)."""
        return 1000.0 / float(self.options["frame_shift"])

    def num_frames(self, num_samples: int) -> int:
        """Frames of an utterance of ``num_samples`` samples (Kaldi's ``NumFrames``; 0 if too short).

        ``snip_edges=True``: ``1 + (T - window) // shift`` for ``T >= window``; else ``(T + shift // 2) // shift``.
        """
        shift = int(self.sample_rate * float(self.options["frame_shift"]) * 0.001)
        window = int(self.sample_rate * float(self.options["frame_length"]) * 0.001)
        if self.options["snip_edges"]:
            return 0 if num_samples < window else 1 + (num_samples - window) // shift
        return (num_samples + shift // 2) // shift

    def output_kinds(self) -> Dict[str, OutputKind]:
        return {self.output: OutputKind("sequence", self.dtype, (self.dim,))}

    def config(self) -> dict:
        return {"function": f"torchaudio.compliance.kaldi.{self._function}", **dict(sorted(self.options.items())),
                "sample_rate": self.sample_rate, "scale": self.scale, "dtype": self.dtype, "output": self.output}

    def code_parts(self) -> List[object]:
        import torchaudio.compliance.kaldi as kaldi

        return [*super().code_parts(), Path(kaldi.__file__)]  # torchaudio's implementation, by bytes

    def extra_description(self) -> dict:
        import torchaudio

        return {"torchaudio_version": getattr(torchaudio, "__version__", "unknown"), "frame_rate": self.frame_rate}

    def _compute_one(self, x: torch.Tensor) -> torch.Tensor:
        """(T,) float32 waveform in [-1, 1] -> (T', F) float32."""
        return self._fn(x[None] * self.scale if self.scale != 1.0 else x[None], sample_frequency=self.sample_rate,
                        **self.options)

    def compute(self, wav: torch.Tensor, lengths: torch.Tensor):
        """Features of a padded batch, each utterance alone on its true length.

        Parameters
        ----------
        wav : torch.Tensor of shape (B, T), float32
            At :attr:`sample_rate` Hz, zero-padded.
        lengths : torch.Tensor of shape (B,), int64
            True lengths in samples (at least one window, :attr:`min_samples`).

        Returns
        -------
        dict
            ``{output: (feats (B, T'_max, F) float32 on the CPU, frame_lengths (B,) int64)}``; frames past an
            utterance's length are zero and never stored.

        Raises
        ------
        ValueError
            Bad shapes, or an utterance shorter than one window.
        """
        wav, lengths = check_batch(wav, lengths, self.min_samples)
        wav = wav.to(self.device)
        rows = []
        with torch.inference_mode():
            for i, L in enumerate(lengths.tolist()):
                rows.append(self._compute_one(wav[i, :L]).cpu())
        return {self.output: pad_frames(rows, (self.dim,))}


@register_backend
class KaldiFbank(_KaldiFeature):
    """Kaldi ``compute-fbank-feats`` log-mel filterbank energies (``torchaudio.compliance.kaldi.fbank``).

    Parameters
    ----------
    sample_rate : int, default=16000
        Hz; the engine resamples every utterance to it (soxr), Kaldi's ``--sample-frequency``.
    scale : float, default=32768.0
        Factor applied to the float waveform first (Kaldi's 16-bit integer scale; see the module docstring).
    dtype : {"float32", "float16", "float64"}, default="float32"
        Stored dtype (float16 halves the cache; log-mel values ~[-15, 30] keep ~3 significant digits: absolute
        error below 2**-11 * |x|, i.e. < 0.016 for |x| < 32).
    output : str, default="fbank"
        Output name (file stem ``fbank.h5``, ``fbank.scp`` ...).
    device : str or torch.device
        Where the FFTs run.
    **kaldi_options
        Any option of ``torchaudio.compliance.kaldi.fbank`` but ``channel``, ``sample_frequency`` and
        ``min_duration``: ``num_mel_bins`` (default here 80, the speaker recipes' choice; Kaldi's 23),
        ``frame_length`` / ``frame_shift`` (ms, 25 / 10), ``low_freq``, ``high_freq``, ``window_type``
        (``povey``), ``snip_edges`` (True), ``use_energy``, ``energy_floor``, ``preemphasis_coefficient``,
        ``remove_dc_offset``, ``subtract_mean`` (per utterance), ``use_log_fbank``, ``use_power``, VTLN ...

    Attributes
    ----------
    dim : int
        F = ``num_mel_bins`` (+1 with ``use_energy``).
    min_samples : int
        One window; shorter utterances are recorded in ``errors.tsv``.

    Raises
    ------
    ValueError
        An unknown option (the known ones listed), ``dither != 0``, non-positive frame sizes, an unknown dtype,
        or options torchaudio rejects.
    ImportError
        torchaudio is not importable.

    References
    ----------
    Kaldi ``src/feat/feature-fbank.cc``, ``feature-window.cc`` (``compute-fbank-feats``); torchaudio
    documentation, ``torchaudio.compliance.kaldi.fbank``.

    Examples
    --------
    >>> import torch
    >>> fb = KaldiFbank(num_mel_bins=80)
    >>> feats, frames = fb.compute(0.1 * torch.randn(2, 16000), torch.tensor([16000, 8000]))["fbank"]
    >>> tuple(feats.shape), frames.tolist()
    ((2, 98, 80), [98, 48])
    """

    name = "fbank"
    requires = ("torchaudio",)
    install = "pip install --no-deps torchaudio (its Python part, matching your torch)"
    description = "Kaldi-compatible log-mel filterbank (T', num_mel_bins) (torchaudio.compliance.kaldi)"
    _function = "fbank"
    _defaults = {"num_mel_bins": 80}
    _output = "fbank"


@register_backend
class KaldiMfcc(_KaldiFeature):
    """Kaldi ``compute-mfcc-feats`` cepstra (``torchaudio.compliance.kaldi.mfcc``), per utterance.

    Parameters
    ----------
    sample_rate, scale, dtype, device
        As :class:`KaldiFbank`.
    output : str, default="mfcc"
    **kaldi_options
        Options of ``torchaudio.compliance.kaldi.mfcc`` (Kaldi's defaults: ``num_ceps=13``,
        ``num_mel_bins=23``, ``cepstral_lifter=22``, ``use_energy=False``; the VoxCeleb x-vector recipe uses
        ``num_ceps=30, num_mel_bins=30, low_freq=20, high_freq=7600``).

    Raises
    ------
    ValueError
        As :class:`KaldiFbank`.

    References
    ----------
    Kaldi ``src/feat/feature-mfcc.cc``; torchaudio documentation, ``torchaudio.compliance.kaldi.mfcc``.
    """

    name = "mfcc"
    requires = ("torchaudio",)
    install = "pip install --no-deps torchaudio (its Python part, matching your torch)"
    description = "Kaldi-compatible MFCC (T', num_ceps) (torchaudio.compliance.kaldi)"
    _function = "mfcc"
    _defaults: Dict[str, object] = {}
    _output = "mfcc"
