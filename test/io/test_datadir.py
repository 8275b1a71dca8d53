"""Corpus readers (spk_toolkit.io.datadir): Kaldi dirs, manifests, audio trees, utt2dur."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import CorpusError, load_audio_tree, load_corpus, load_kaldi_dir, load_manifest_tsv
from spk_toolkit.testing import speechlike, write_wav


def test_kaldi_dir_with_segments_and_spk2utt_only(tmp_path):
    x = speechlike(3.0)
    write_wav(tmp_path / "rec.wav", x)
    d = tmp_path / "d"
    d.mkdir()
    (d / "wav.scp").write_text(f"rec1 {tmp_path / 'rec.wav'}\n")
    (d / "segments").write_text("u1 rec1 0.5 1.5\nu2 rec1 2.0 3.0\n")
    (d / "spk2utt").write_text("spkA u1 u2\n")
    utts = load_kaldi_dir(d)
    assert [u.utt_id for u in utts] == ["u1", "u2"]
    assert [u.spk_id for u in utts] == ["spkA", "spkA"]
    seg, sr = read_audio(utts[0].path, 16000, utts[0].start, utts[0].end)
    np.testing.assert_allclose(seg, x[8000:24000], atol=1.0 / 32768)  # 16-bit PCM file


def test_kaldi_dir_refuses_duplicates_and_pathless_lines(tmp_path):
    (tmp_path / "wav.scp").write_text("a /x.wav\na /y.wav\n")
    with pytest.raises(CorpusError, match="duplicate utterance id 'a'"):
        load_kaldi_dir(tmp_path)
    (tmp_path / "wav.scp").write_text("a /x.wav\nb\n")
    with pytest.raises(CorpusError, match=r"wav.scp:2: expected at least 2 fields"):
        load_kaldi_dir(tmp_path)


def test_manifest_and_audio_tree(tmp_path):
    for ds, spk, utt in [("vox", "id1", "a"), ("vox", "id2", "a"), ("cn", "id1", "a")]:
        (tmp_path / "tree" / ds / spk).mkdir(parents=True, exist_ok=True)
        write_wav(tmp_path / "tree" / ds / spk / f"{utt}.wav", speechlike(1.0))
    utts = load_audio_tree(tmp_path / "tree")
    assert [u.utt_id for u in utts] == ["cn/id1/a", "vox/id1/a", "vox/id2/a"]  # no collision on equal names
    assert [u.spk_id for u in utts] == ["cn/id1", "vox/id1", "vox/id2"]
    tsv = tmp_path / "m.tsv"
    tsv.write_text(f"u1\t{utts[0].path}\thello\tspk1\nu2\t{utts[1].path}\tworld\tspk2\n")
    m = load_manifest_tsv(tsv)
    assert [(u.utt_id, u.spk_id) for u in m] == [("u1", "spk1"), ("u2", "spk2")]
    assert [u.utt_id for u in load_corpus(tsv)] == ["u1", "u2"]


def test_utt2dur_cache_written(fillets_small, tmp_path):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(fillets_small, d)
    (d / "utt2dur").unlink()
    from spk_toolkit.io.datadir import measure_durations

    utts = load_kaldi_dir(d)
    assert measure_durations(utts, cache_dir=d) == {}
    cached = dict(line.split() for line in (d / "utt2dur").read_text().splitlines())
    ns = dict(line.split() for line in (d / "utt2num_samples").read_text().splitlines())
    for u in utts:
        info = sf.info(u.path)
        assert float(cached[u.utt_id]) == pytest.approx(info.duration, abs=1e-4)
        assert int(ns[u.utt_id]) == info.frames
