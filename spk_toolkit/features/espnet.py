"""ESPnet glue for training from cached Kaldi fbank (issue 16 criterion 6): a frontend and a frame-grid preprocessor.

* :class:`KaldiFbankFrontend` (``frontend: kaldi_fbank``): an ESPnet ``AbsFrontend`` computing the same Kaldi fbank
  as the cache's ``fbank`` extractor (:class:`spk_toolkit.features.kaldi.KaldiFbank`, same options, same code), each
  utterance alone on its true length. A model trained from audio with it sees exactly the features a model trained
  from the cache reads (``frontend: null``, ``input_size: 80``).
* :class:`SpkFramePreprocessor` (``preprocessor: spk_frames``): ESPnet's ``SpkPreprocessor`` with its crops on the
  fbank frame grid. ``input: features`` crops ``(T, F)`` cached features along frames (ESPnet's preprocessor crops
  ``target_duration * sample_rate`` *samples*, and its ``np.pad(..., "wrap")`` of a short utterance would pad both
  axes of a 2-D array); ``input: audio`` crops waveforms at frame boundaries, ``window + (n - 1) * shift`` samples
  from sample ``k * shift``, whose fbank is exactly frames ``k .. k + n - 1`` of the whole utterance's fbank
  (``snip_edges=True``: every Kaldi frame depends only on its own window). Both draw the start frame the same way
  (one ``random.random()`` per training utterance, as ESPnet does), so with the same seed both arms train on equal
  crops; validation crops start at ``linspace(0, frames - n, num_eval)`` frames (ESPnet's rule, in frames).

:func:`register_espnet_choices` adds both to ESPnet's ``espnet2.tasks.spk`` class choices (``frontend_choices``,
``preprocessor_choices``: module-level ``ClassChoices`` that ESPnet's ``SpeakerTask.build_model`` /
``build_preprocess_fn`` read); :mod:`spk_toolkit.tasks.spk` and the model loader call it, so configs naming them
train, validate and load through ``python -m spk_toolkit.bin.spk_train`` and the espnet backend.
"""
from __future__ import annotations

import random
from typing import Optional, Tuple

import numpy as np
import torch
from espnet2.asr.frontend.abs_frontend import AbsFrontend
from espnet2.train.preprocessor import SpkPreprocessor

from spk_toolkit.features.kaldi import KaldiFbank

__all__ = ["KaldiFbankFrontend", "SpkFramePreprocessor", "register_espnet_choices"]

FRONTEND_NAME = "kaldi_fbank"
PREPROCESSOR_NAME = "spk_frames"


class KaldiFbankFrontend(AbsFrontend):
    """Kaldi fbank (``torchaudio.compliance.kaldi.fbank`` through :class:`KaldiFbank`) as an ESPnet frontend.

    Parameters
    ----------
    fs : int, default=16000
        Sample rate, Hz (ESPnet's frontend argument name).
    num_mel_bins : int, default=80
    scale : float, default=32768.0
        As :class:`KaldiFbank` (16-bit integer scale, Kaldi's convention).
    **kaldi_options
        Any other :class:`KaldiFbank` option (``frame_length``, ``frame_shift``, ``low_freq``, ...; ``dither``
        must be 0).

    Notes
    -----
    No parameters, no gradient (features are computed under ``torch.no_grad``). ``forward`` returns lengths
    ``None`` when no input row is padded (every ``input_lengths == T``: a batch of training or validation crops):
    ESPnet's convention for an unpadded batch, the one a model without frontend (cached features) also gets, so
    the pooling of both runs does the same arithmetic. Padded batches get the true frame counts.
    """

    def __init__(self, fs: int = 16000, num_mel_bins: int = 80, scale: float = 32768.0, **kaldi_options):
        super().__init__()
        self.fbank = KaldiFbank(sample_rate=int(fs), scale=scale, num_mel_bins=num_mel_bins, **kaldi_options)
        self.sample_rate = int(fs)

    def output_size(self) -> int:
        return int(self.fbank.dim)

    def forward(self, input: torch.Tensor,
                input_lengths: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(B, T)`` waveforms in [-1, 1], ``(B,)`` samples -> ``(B, T', F)`` fbank (zero-padded), frames or None."""
        if input.dim() != 2:
            raise ValueError(f"{type(self).__name__} takes (B, T) waveforms, got {tuple(input.shape)}")
        T = input.shape[1]
        lens = [T] * input.shape[0] if input_lengths is None else [int(v) for v in input_lengths.tolist()]
        rows = []
        with torch.no_grad():
            for i, L in enumerate(lens):
                if L < self.fbank.min_samples:
                    raise ValueError(f"utterance of {L} samples is shorter than one fbank window "
                                     f"({self.fbank.min_samples} samples)")
                rows.append(self.fbank._compute_one(input[i, :L].float()))
        feats = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        if all(L == T for L in lens):
            return feats, None
        return feats, torch.tensor([r.shape[0] for r in rows], dtype=torch.int64, device=input.device)


class SpkFramePreprocessor(SpkPreprocessor):
    """ESPnet's ``SpkPreprocessor`` cropping on the fbank frame grid (cached features, or audio aligned to them).

    Parameters
    ----------
    train : bool
    target_duration : float
        Crop length, seconds: ``n = round(target_duration * 1000 / frame_shift)`` frames (audio crops:
        ``window + (n - 1) * shift`` samples).
    spk2utt : str, optional
        Training only (ESPnet's speaker label map).
    sample_rate : int, default=16000
    num_eval : int, default=10
        Validation crops per utterance.
    input : {"features", "audio"}, default="features"
        ``features``: ``speech`` is ``(T, F)`` (ESPnet's ``kaldi_ark`` / ``npy`` types); ``audio``: ``(T,)`` samples.
    frame_length, frame_shift : float, default 25.0, 10.0
        ms, the fbank's (must match the cache's extractor options).
    rir_scp, rir_apply_prob, noise_info, noise_apply_prob, short_noise_thres
        ESPnet's augmentation, audio input only (defaults here: off).

    Raises
    ------
    ValueError
        Unknown ``input``, augmentation with ``input="features"``, a crop shorter than one frame.

    Notes
    -----
    Short utterances (fewer frames than a crop) are wrapped as ESPnet does: features along frames, audio along
    samples; the two arms then differ for such utterances (the fbank of wrapped audio is not wrapped fbank).
    """

    def __init__(self, train: bool, target_duration: float, spk2utt: Optional[str] = None, sample_rate: int = 16000,
                 num_eval: int = 10, input: str = "features", frame_length: float = 25.0, frame_shift: float = 10.0,
                 rir_scp: Optional[str] = None, rir_apply_prob: float = 0.0, noise_info=None,
                 noise_apply_prob: float = 0.0, short_noise_thres: float = 0.5):
        if input not in ("features", "audio"):
            raise ValueError(f"input must be 'features' or 'audio', got {input!r}")
        if input == "features" and (rir_apply_prob > 0 or noise_apply_prob > 0):
            raise ValueError("noise / RIR augmentation needs audio input (input: audio); cached features cannot be "
                             "augmented in the waveform domain")
        super().__init__(train, target_duration, spk2utt=spk2utt, sample_rate=sample_rate, num_eval=num_eval,
                         rir_scp=rir_scp, rir_apply_prob=rir_apply_prob, noise_info=noise_info or [],
                         noise_apply_prob=noise_apply_prob, short_noise_thres=short_noise_thres)
        self.input = input
        self.shift = int(sample_rate * float(frame_shift) * 0.001)
        self.window = int(sample_rate * float(frame_length) * 0.001)
        self.crop_frames = int(round(float(target_duration) * 1000.0 / float(frame_shift)))
        if self.crop_frames < 1 or self.shift < 1:
            raise ValueError(f"target_duration={target_duration} s gives {self.crop_frames} frames of "
                             f"{frame_shift} ms")
        self.crop_samples = self.window + (self.crop_frames - 1) * self.shift

    def __repr__(self):
        return (f"{type(self).__module__}.{type(self).__name__}(train={self.train}, input={self.input}, "
                f"crop_frames={self.crop_frames}, crop_samples={self.crop_samples}, num_eval={self.num_eval})")

    def _frames(self, x: np.ndarray) -> int:
        if self.input == "features":
            if x.ndim != 2:
                raise ValueError(f"input: features needs (T, F) arrays, got shape {x.shape}")
            return int(x.shape[0])
        if x.ndim != 1:
            raise ValueError(f"input: audio needs (T,) waveforms, got shape {x.shape}")
        return 0 if len(x) < self.window else 1 + (len(x) - self.window) // self.shift

    def _wrap(self, x: np.ndarray) -> np.ndarray:
        """Wrap a short utterance (ESPnet's ``np.pad(..., "wrap")``, time axis only) to at least one crop."""
        if self._frames(x) >= self.crop_frames:
            return x
        if self.input == "features":
            if x.shape[0] == 0:
                raise ValueError("utterance with 0 frames")
            return np.pad(x, ((0, self.crop_frames - x.shape[0] + 1), (0, 0)), "wrap")
        return np.pad(x, (0, self.crop_samples - len(x) + 1), "wrap")

    def _crop(self, x: np.ndarray, start_frame: int) -> np.ndarray:
        if self.input == "features":
            return x[start_frame : start_frame + self.crop_frames]
        s = start_frame * self.shift
        return x[s : s + self.crop_samples]

    def _speech_process(self, data):
        if self.train:
            x = self._wrap(data["speech"])
            start = int(random.random() * (self._frames(x) - self.crop_frames))  # ESPnet's draw, in frames
            data["speech"] = self._crop(x, start)
            if self.input == "audio" and (self.noise_apply_prob > 0 or self.rir_apply_prob > 0):
                data["speech"] = self._apply_data_augmentation(data["speech"])
            return data
        for key in ("speech", "speech2"):
            x = self._wrap(data[key])
            starts = np.linspace(0, self._frames(x) - self.crop_frames, num=self.num_eval)
            data[key] = np.stack([self._crop(x, int(s)) for s in starts], axis=0)
        return data


def register_espnet_choices() -> None:
    """Add ``frontend: kaldi_fbank`` and ``preprocessor: spk_frames`` to ``espnet2.tasks.spk``'s class choices.

    Idempotent. ESPnet's ``SpeakerTask`` reads its module-level ``ClassChoices`` when it builds its parser, model
    and preprocessor, so after this call ESPnet's task and spk_toolkit's subclass both know the two names.
    """
    import espnet2.tasks.spk as spk

    spk.frontend_choices.classes.setdefault(FRONTEND_NAME, KaldiFbankFrontend)
    spk.preprocessor_choices.classes.setdefault(PREPROCESSOR_NAME, SpkFramePreprocessor)
