"""Audio decoding (spk_toolkit.io.audio): downmix, resampling, errors naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from spk_toolkit.io.audio import AudioLoadingError, read_audio
from spk_toolkit.testing import speechlike


def test_read_audio_downmix_resample_and_errors(tmp_path):
    x = speechlike(1.0, sr=44100)
    st = np.stack([x, 0.5 * x], axis=1)
    sf.write(tmp_path / "st.ogg", st, 44100)
    y, sr = read_audio(str(tmp_path / "st.ogg"), 16000)
    assert sr == 16000 and abs(len(y) - 16000) <= 1
    ref = 0.75 * x[::1]
    # energy of the mono downmix matches the mean of the channels (ogg is lossy: loose tolerance)
    assert np.sqrt(np.mean(y ** 2)) == pytest.approx(np.sqrt(np.mean(ref ** 2)), rel=0.05)
    with pytest.raises(AudioLoadingError, match="file not found"):
        read_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "junk.wav").write_bytes(b"this is not audio" * 10)
    with pytest.raises(AudioLoadingError, match="unreadable audio"):
        read_audio(str(tmp_path / "junk.wav"))
    with pytest.raises(AudioLoadingError, match="pipe entry refused"):
        read_audio("cat x.wav |")
