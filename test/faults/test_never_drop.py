"""Contract 2 of docs/bad_input.md, nothing silently left out, nothing silently wrong.

Every file of an audio tree that libsndfile decodes is embedded, whatever its extension and depth; the files
a tree skips are counted on stderr and named in ``run.log``. A run that stored nothing exits 1 (as Kaldi's tools
do), for every command that extracts and for the API; an output format list naming no format is refused before
any work (exit 2).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from faults_helpers import cli_in_process as _cli

from spk_toolkit.bin.cli import EXIT_FAILED, EXIT_USAGE
from spk_toolkit.testing import load_npz, write_wav

FAST = ["--num_workers", "0", "--progress", "false"]




def _lines(err: str) -> list:
    return [ln for ln in err.strip().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def speech(fillets_small):
    """Four real utterances of two speakers, 16 kHz float32."""
    from spk_toolkit.io.audio import read_audio
    from spk_toolkit.io.datadir import load_kaldi_dir

    utts = [u for u in load_kaldi_dir(fillets_small) if u.spk_id in ("cs_m", "cs_v")]
    return [read_audio(u.path, 16000)[0][: 3 * 16000] for u in utts[:2] + utts[-2:]]


def _tree(root: Path, speech) -> dict:
    """An audio tree whose readable files are of five containers at three depths, plus files that are not audio.

    Returns ``{utt_id: samples}`` of what must be embedded."""
    want = {}
    layout = [("vox/cs_m/a", ".wav", "WAV"), ("vox/cs_m/b", ".aiff", "AIFF"), ("vox/cs_v/c", ".au", "AU"),
              ("vox/cs_v/deeper/d", ".flac", "FLAC"), ("vox/cs_v/e", ".sound", "FLAC"), ("vox/top", ".wav", "WAV")]
    for k, (key, ext, fmt) in enumerate(layout):
        p = root / f"{key}{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        import soundfile as sf

        sf.write(str(p), speech[k % len(speech)], 16000, format=fmt, subtype="PCM_16")
        want[key] = speech[k % len(speech)]
    (root / "vox" / "cs_m" / "a.txt").write_text("a transcript\n")
    (root / "vox" / "cs_m" / ".DS_Store").write_bytes(b"\0\1")
    (root / "vox" / "cs_v" / "f.m4a").write_bytes(b"\0\0\0\x20ftypM4A not decodable by libsndfile")
    return want


def test_an_audio_tree_leaves_nothing_readable_out_and_names_what_it_skips(tmp_path, speech):
    from spk_toolkit.bin import spk_inference

    want = _tree(tmp_path / "tree", speech)
    out = tmp_path / "out"
    rc, err = _cli(spk_inference.main, ["--data_dir", tmp_path / "tree", "--output_dir", out, *FAST])
    assert rc == 0, err
    emb = load_npz(out / "embeddings.npz")
    assert sorted(emb) == sorted(want)  # .wav .aiff .au, a deeper folder, an unknown extension that decodes
    assert all(np.isfinite(v).all() and np.linalg.norm(v) > 0.5 for v in emb.values())
    assert "3 file(s) skipped: 1 hidden, 1 not audio by extension, 1 not decodable by libsndfile" in err, err
    assert "1 audio file(s) above <dataset>/<speaker>/ have no speaker id" in err, err
    log = (out / "run.log").read_text()
    for name in ("a.txt", ".DS_Store", "f.m4a"):
        assert f"{name}" in log and "skipped (" in log, log
    from spk_toolkit.io.datadir import load_audio_tree

    spk = {u.utt_id: u.spk_id for u in load_audio_tree(tmp_path / "tree")}
    assert spk == {"vox/cs_m/a": "vox/cs_m", "vox/cs_m/b": "vox/cs_m", "vox/cs_v/c": "vox/cs_v",
                   "vox/cs_v/deeper/d": "vox/cs_v", "vox/cs_v/e": "vox/cs_v", "vox/top": None}


def test_a_tree_with_no_audio_names_what_it_found(tmp_path):
    from spk_toolkit.io.datadir import CorpusError, load_audio_tree

    (tmp_path / "t" / "d" / "s").mkdir(parents=True)
    (tmp_path / "t" / "d" / "s" / "x.txt").write_text("x\n")
    (tmp_path / "t" / "d" / "s" / "y.m4a").write_bytes(b"not audio")
    with pytest.raises(CorpusError, match=r"no audio files found .*skipped: 1 not audio by extension; "
                                          r"1 not decodable by libsndfile"):
        load_audio_tree(tmp_path / "t")


# ------------------------------------------------------------------------------------- exit 1 when nothing worked
def _missing_corpus(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "wav.scp").write_text("".join(f"u{k} {d / f'gone{k}.wav'}\n" for k in range(3)))
    (d / "utt2spk").write_text("u0 a\nu1 a\nu2 b\n")
    return d


def _tts_dir(d: Path) -> Path:
    _missing_corpus(d)
    (d / "text").write_text("u0 hello\nu1 world\nu2 again\n")
    return d


COMMANDS = {
    "spk_inference": lambda t: ("spk_inference", ["--data_dir", _missing_corpus(t / "d"), "--output_dir", t / "o", *FAST]),
    "cache_features": lambda t: ("cache_features", ["--data_dir", _missing_corpus(t / "d"), "--output_dir", t / "o",
                                                    "--extractor", "fbank", *FAST]),
    "extract_spk_embed": lambda t: ("extract_spk_embed", [_tts_dir(t / "d"), t / "o", "--toolkit", "resemblyzer",
                                                          "--num_workers", "0", "--progress", "false"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_exits_1_when_nothing_was_stored(tmp_path, command):
    import importlib

    prog, argv = COMMANDS[command](tmp_path)
    main = importlib.import_module(f"spk_toolkit.bin.{prog}").main
    rc, err = _cli(main, argv)
    assert rc == EXIT_FAILED, err
    last = _lines(err)[-1]
    assert last.startswith(f"{prog}: error: nothing was stored: all 3 utterance(s) failed") and "errors.tsv" in last, err
    assert "'u0'" in last and "Traceback" not in err, err


def test_the_api_raises_when_nothing_was_stored_and_keeps_the_reasons(tmp_path):
    import spk_toolkit
    from spk_toolkit.errors import ExtractionError
    from spk_toolkit.io.rundir import read_errors_tsv

    d = _missing_corpus(tmp_path / "d")
    with pytest.raises(ExtractionError, match=r"nothing was stored: all 3 utterance\(s\) failed"):
        spk_toolkit.extract_embeddings(d, tmp_path / "o", num_workers=0, progress=False)
    assert [r[0] for r in read_errors_tsv(tmp_path / "o" / "errors.tsv")] == ["u0", "u1", "u2"]
    # one good file: the run succeeds and stores it (the rule is "nothing stored", not "any error")
    write_wav(tmp_path / "d" / "gone1.wav", np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    summary = spk_toolkit.extract_embeddings(d, tmp_path / "o", num_workers=0, progress=False)
    assert (summary["embedded"], summary["errors"]) == (1, 2)


@pytest.mark.parametrize("spec", ["", ",", " , "])
def test_an_output_format_list_naming_nothing_is_refused_before_any_work(tmp_path, spec, fillets_small):
    from spk_toolkit.bin import spk_inference

    shutil.copytree(fillets_small, tmp_path / "d")
    rc, err = _cli(spk_inference.main, ["--data_dir", tmp_path / "d", "--output_dir", tmp_path / "o",
                                        "--output_format", spec, *FAST])
    assert rc == EXIT_USAGE, err
    assert "no output format" in _lines(err)[-1] and "npz" in _lines(err)[-1], err
    assert not (tmp_path / "o").exists()
