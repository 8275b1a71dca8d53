"""Bad input and a hostile environment (issue 17; the table is docs/bad_input.md).

One parametrised test per class, each case on a real or generated file, through the command line (in this process,
so a full disk or a read-only file system can be simulated where root cannot make one): the exit code, the one-line
message (utterance / file / option named), no NaN / zero / stale output, every good utterance intact, and a rerun
after the fix resumes to the result of a clean run. The FIFO and Ctrl-C cases run the CLI as a subprocess.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from faults_helpers import cli_in_process as cli
from faults_helpers import start_until

from spk_toolkit.bin import spk_inference, spk_score
from spk_toolkit.engine.merge import read_errors_tsv
from spk_toolkit.io.atomic import is_temporary
from spk_toolkit.io.audio import read_audio
from spk_toolkit.testing import load_npz, write_wav

PICK = {"r1": "cs_m/barrel/bar-m-no", "r2": "cs_v/chest/tru-v-zrak", "r3": "nl_v/start/1st-v-ven"}
SPK = {"r1": "cs_m", "r2": "cs_v", "r3": "nl_v"}
FAST = ["--num_workers", "0", "--progress", "false", "--shard_duration", "1"]
ROOT = os.geteuid() == 0


# ------------------------------------------------------------------------------------------------------ helpers


def last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def leftovers(out: Path) -> list:
    """Temporary files (of the atomic writers, the merge spill, the write probe) anywhere under ``out``."""
    return [p for p in out.rglob("*") if is_temporary(p.name) or p.name.startswith(".merge-")]


def nothing_written(out: Path) -> bool:
    """Nothing at all under ``out``: the run was refused before it wrote a file (its ``run.log`` included)."""
    return not out.exists() or not os.listdir(out)


def assert_intact(out: Path, ref: dict, keys=None) -> dict:
    """Every embedding finite, non-zero, and equal to the clean run's for the keys both have."""
    emb = load_npz(out / "embeddings.npz")
    for k, v in emb.items():
        assert np.isfinite(v).all() and np.linalg.norm(v) > 0.5, k
    for k in (keys if keys is not None else ref):
        assert k in emb, k
        np.testing.assert_allclose(emb[k], ref[k], atol=2e-6, err_msg=k)
    return emb


def extract_argv(data, out, *extra):
    return ["--data_dir", data, "--output_dir", out, *FAST, *extra]


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def audio(fillets_small, tmp_path_factory):
    """Three real utterances of three speakers as 16 kHz float WAV files, and one 2 s longer than r1."""
    from spk_toolkit.io.datadir import load_kaldi_dir

    d = tmp_path_factory.mktemp("hostile_audio")
    src = {u.utt_id: u.path for u in load_kaldi_dir(fillets_small)}
    files, durs = {}, {}
    for r, utt in PICK.items():
        x, _ = read_audio(src[utt], 16000)
        files[r] = write_wav(d / f"{r}.wav", x, subtype="FLOAT")
        durs[r] = len(x) / 16000
    x1, _ = read_audio(str(files["r1"]), 16000)
    x2, _ = read_audio(str(files["r2"]), 16000)
    files["long"] = write_wav(d / "long.wav", np.concatenate([x1, x2[: 2 * 16000]]), subtype="FLOAT")
    return files, durs


def seg_corpus(d: Path, audio, segments: str = None, utt2spk: str = None, extra: dict = None) -> Path:
    """A Kaldi dir of 4 segments over the 3 recordings (the class-1 base), files overridable."""
    files, durs = audio
    d.mkdir(parents=True, exist_ok=True)
    (d / "wav.scp").write_text("".join(f"{r} {files[r]}\n" for r in ("r1", "r2", "r3")))
    h = round(durs["r1"] / 2, 3)
    (d / "segments").write_text(segments if segments is not None else
                                f"s1 r1 0.0 {h}\ns2 r1 {h} {durs['r1']:.3f}\ns3 r2 0.0 -1\ns4 r3 0.2 {durs['r3']:.3f}\n")
    (d / "utt2spk").write_text(utt2spk if utt2spk is not None else "s1 cs_m\ns2 cs_m\ns3 cs_v\ns4 nl_v\n")
    for name, text in (extra or {}).items():
        p = d / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return d


def whole_corpus(d: Path, entries: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "wav.scp").write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
    return d


@pytest.fixture(scope="module")
def clean_seg(audio, tmp_path_factory):
    """The clean run of the class-1 base corpus: embeddings and speaker means."""
    t = tmp_path_factory.mktemp("clean_seg")
    data = seg_corpus(t / "data", audio)
    rc, err = cli(spk_inference.main, extract_argv(data, t / "out"))
    assert rc == 0, err
    return load_npz(t / "out" / "embeddings.npz"), load_npz(t / "out" / "spk_embeddings.npz")


@pytest.fixture(scope="module")
def clean_whole(audio, tmp_path_factory):
    """The clean run of the three whole recordings (plus ``long``): the reference of classes 2, 4, 5, 7."""
    files, _ = audio
    t = tmp_path_factory.mktemp("clean_whole")
    data = whole_corpus(t / "data", {r: files[r] for r in ("r1", "r2", "r3", "long")})
    rc, err = cli(spk_inference.main, extract_argv(data, t / "out"))
    assert rc == 0, err
    return load_npz(t / "out" / "embeddings.npz"), t / "out"


# ================================================================================================ 1. input files
def _bom(d, name):
    p = d / name
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())


def _crlf(d, name):
    p = d / name
    p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))


def _blank(d, name):
    p = d / name
    p.write_text("\n   \n" + p.read_text().replace("\n", "\n\n") + "\t\n")


def _seg(line_no, new):
    def f(d, audio):
        p = d / "segments"
        lines = p.read_text().splitlines()
        lines[line_no - 1] = new
        p.write_text("\n".join(lines) + "\n")
    return f


def _append(name, text):
    def f(d, audio):
        p = d / name
        p.write_bytes(p.read_bytes() + (text if isinstance(text, bytes) else text.encode()))
    return f


def _write(name, text):
    def f(d, audio):
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


INPUT_CASES = {
    # good input that used to go wrong: read correctly, the clean result
    "bom_wav_scp": (lambda d, a: _bom(d, "wav.scp"), 0, None),
    "bom_utt2spk": (lambda d, a: _bom(d, "utt2spk"), 0, None),
    "bom_segments": (lambda d, a: _bom(d, "segments"), 0, None),
    "crlf_everywhere": (lambda d, a: [_crlf(d, n) for n in ("wav.scp", "segments", "utt2spk")], 0, None),
    "blank_lines": (lambda d, a: [_blank(d, n) for n in ("wav.scp", "segments", "utt2spk")], 0, None),
    # malformed: refused before anything is loaded or written, naming file:line
    "segments_nan_start": (_seg(2, "s2 r1 nan 2.0"), 2, r"segments:2: start 'nan' is not a finite number"),
    "segments_inf_end": (_seg(3, "s3 r2 0.0 inf"), 2, r"segments:3: end 'inf' is not a finite number"),
    "segments_start_after_end": (_seg(1, "s1 r1 2.0 1.0"), 2, r"segments:1: segment 's1' has start 2.0 >= end 1.0"),
    "segments_start_equals_end": (_seg(1, "s1 r1 1.0 1.0"), 2, r"segments:1: segment 's1' has start 1.0 >= end"),
    "segments_negative_start": (_seg(4, "s4 r3 -0.5 1.0"), 2, r"segments:4: start '-0.5' is negative"),
    "segments_not_a_number": (_seg(4, "s4 r3 0,2 1.0"), 2, r"segments:4: start '0,2' is not a number"),
    "segments_unknown_recording": (_seg(3, "s3 r9 0.0 1.0"), 2, r"segments:3: utterance 's3' names unknown recording 'r9'"),
    "segments_duplicate_id": (_append("segments", "s2 r2 0.0 1.0\n"), 2, r"segments:5: duplicate segment id 's2' \(first on line 2\)"),
    "segments_five_fields": (_seg(2, "s2 r1 0.0 1.0 extra"), 2, r"segments:2: expected 4 fields, got 5"),
    "wav_scp_duplicate": (_append("wav.scp", "r2 /somewhere/else.wav\n"), 2, r"wav.scp:4: duplicate utterance id 'r2'"),
    "wav_scp_no_path": (_append("wav.scp", "r4\n"), 2, r"wav.scp:4: expected at least 2 fields"),
    "utt2spk_duplicate": (_append("utt2spk", "s1 nl_v\n"), 2, r"utt2spk:5: duplicate utterance id 's1'"),
    "utt2spk_not_utf8": (_write("utt2spk", b"s1 cs_m\ns2 cs_\xe9m\ns3 cs_v\ns4 nl_v\n"), 2, r"utt2spk:2: not valid UTF-8"),
    "utt2dur_nan": (_write("utt2dur", "s1 nan\n"), 2, r"utt2dur:1: duration 'nan' is not a finite number"),
    "utt2dur_negative": (_write("utt2dur", "s1 1.0\ns2 -3\n"), 2, r"utt2dur:2: duration '-3' is negative"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_input_files(case, audio, clean_seg, tmp_path, caplog):
    mutate, code, pattern = INPUT_CASES[case]
    ref, ref_spk = clean_seg
    data = seg_corpus(tmp_path / "data", audio)
    mutate(data, audio)
    out = tmp_path / "out"
    rc, err = cli(spk_inference.main, extract_argv(data, out))
    assert rc == code, err
    if code == 0:
        assert_intact(out, ref)
        np.testing.assert_allclose(load_npz(out / "spk_embeddings.npz")["cs_m"], ref_spk["cs_m"], atol=2e-6)
        assert set(load_npz(out / "spk_embeddings.npz")) == set(ref_spk)  # a BOM no longer loses a speaker
        return
    line = last_line(err)
    assert line.startswith("spk_inference: error: ") and re.search(pattern, line), line
    assert str(data) in line and "Traceback" not in err
    assert nothing_written(out), sorted(os.listdir(out))
    # the fix: the clean files; a rerun in the same directory gives the clean result
    seg_corpus(data, audio)
    for f in ("utt2dur",):
        (data / f).unlink(missing_ok=True)
    rc, err = cli(spk_inference.main, extract_argv(data, out))
    assert rc == 0, err
    assert_intact(out, ref)


def test_bom_is_said_once(audio, tmp_path, caplog):
    data = seg_corpus(tmp_path / "data", audio)
    _bom(data, "utt2spk")
    from spk_toolkit.io.datadir import load_kaldi_dir

    with caplog.at_level("INFO", logger="spk_toolkit"):
        for _ in range(3):
            utts = load_kaldi_dir(data)
    assert [u.spk_id for u in utts] == ["cs_m", "cs_m", "cs_v", "nl_v"]
    said = [r for r in caplog.records if "byte-order mark" in r.getMessage()]
    assert len(said) == 1 and "utt2spk" in said[0].getMessage()


# ============================================================================================== 2. audio sources
def _fifo(p: Path):
    os.mkfifo(p)


def _loop(p: Path):
    os.symlink(p.with_name(p.name + ".b"), p)
    os.symlink(p, p.with_name(p.name + ".b"))


def _clear(p: Path):
    for q in (p, p.with_name(p.name + ".b")):
        if q.is_symlink() or q.is_file() or q.is_fifo():
            q.unlink()
        elif q.is_dir():
            shutil.rmtree(q)


AUDIO_CASES = {
    "fifo": (_fifo, r"not a regular file \(a FIFO \(named pipe\)\)", ()),
    "directory": (lambda p: p.mkdir(), r"not a regular file \(a directory\)", ()),
    "character_device": (lambda p: os.symlink("/dev/zero", p), r"not a regular file \(a character device\)", ()),
    "symlink_loop": (_loop, r"^symlink loop$", ()),
    "dangling_symlink": (lambda p: os.symlink(p.with_name("nowhere.wav"), p), r"file not found \(dangling symlink", ()),
    "permission_denied": (None, r"^permission denied$", ()),
    "header_read_hangs": (None, r"header read timed out after 0.5 s", ("--header_timeout", "0.5")),
    "pipe_hangs": (None, r"pipe command timed out after 1 s \(killed\)", ("--allow_pipes", "true", "--pipe_timeout", "1")),
}


@pytest.mark.parametrize("case", sorted(AUDIO_CASES))
def test_audio_sources(case, audio, clean_whole, tmp_path, monkeypatch):
    make, pattern, extra = AUDIO_CASES[case]
    files, _ = audio
    ref, _ = clean_whole
    bad = tmp_path / "bad.wav"
    entry = str(bad)
    if case == "permission_denied":
        shutil.copy(files["r1"], bad)
        if ROOT:  # root reads any file: the kernel's answer is simulated at the one place the engine asks
            real_open = os.open

            def deny(path, flags, *a, **k):
                if os.fspath(path) == str(bad):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(bad))
                return real_open(path, flags, *a, **k)

            monkeypatch.setattr(os, "open", deny)
        else:
            bad.chmod(0)
    elif case == "header_read_hangs":
        shutil.copy(files["r1"], bad)
        import soundfile

        real_info = soundfile.info
        release, returned = threading.Event(), []

        def hang(path, *a, **k):  # blocks until the test releases it, long after the run has ended
            if os.fspath(path) == str(bad):
                release.wait(600)
                returned.append(path)
            return real_info(path, *a, **k)

        monkeypatch.setattr(soundfile, "info", hang)
    elif case == "pipe_hangs":
        script = tmp_path / "decode.sh"
        script.write_text(f"sleep 600\ncat {files['r1']}\n")  # only a kill ends it in time for the hang guard
        entry = f"sh {script} |"
    else:
        make(bad)
    data = whole_corpus(tmp_path / "data", {"r2": files["r2"], "bad": entry, "r3": files["r3"]})
    out = tmp_path / "out"
    rc, err = cli(spk_inference.main, extract_argv(data, out, *extra))
    assert rc == 0, err
    rows = read_errors_tsv(out / "errors.tsv")
    assert [r[0] for r in rows] == ["bad"] and re.search(pattern, rows[0][2]), rows
    assert rows[0][1] == entry
    assert "bad" in err  # the warning names the utterance
    emb = assert_intact(out, ref, keys=["r2", "r3"])
    assert "bad" not in emb
    # a special file is refused by its type, never opened (the reason above says so; opened, a FIFO would block
    # until the header timeout); a hung header read is given up: the run ended while the read still blocks
    if case == "header_read_hangs":
        assert not returned
        release.set()
    # the fix: the source becomes the recording r1 (same path or the same command); the rerun resumes
    monkeypatch.undo()
    if case == "permission_denied":
        bad.chmod(0o644)
    elif case == "pipe_hangs":
        script.write_text(f"cat {files['r1']}\n")
    elif case != "header_read_hangs":
        _clear(bad)
        shutil.copy(files["r1"], bad)
    rc, err = cli(spk_inference.main, extract_argv(data, out, *extra))
    assert rc == 0, err
    assert read_errors_tsv(out / "errors.tsv") == []
    emb = assert_intact(out, {**ref, "bad": ref["r1"]}, keys=["r2", "r3", "bad"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_resumed"] >= 2 and summary["errors"] == 0  # r2 and r3 were not recomputed


SEGMENT_CASES = {  # segments on a recording of its own (the fix replaces it with a longer one)
    "overrun_is_an_error": ("s0 rx 0.5 {over}", (), r"runs past the end of the file \(\d+\.\d+ s\); pass --segment_overrun clip"),
    "starts_after_the_end": ("s0 rx {over} {over2}", (), r"starts at or after the end of the file"),
    "overrun_clipped": ("s0 rx 0.0 {over}", ("--segment_overrun", "clip"), None),
}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_segments_past_the_end(case, audio, clean_whole, tmp_path):
    line, extra, pattern = SEGMENT_CASES[case]
    files, durs = audio
    ref, _ = clean_whole
    rx = tmp_path / "rx.wav"
    shutil.copy(files["r1"], rx)
    d = tmp_path / "data"
    d.mkdir()
    (d / "wav.scp").write_text(f"r2 {files['r2']}\nrx {rx}\n")
    over = round(durs["r1"] + 1.5, 3)
    (d / "segments").write_text(f"s2 r2 0.0 -1\n" + line.format(over=over, over2=over + 1) + "\n")
    out = tmp_path / "out"
    rc, err = cli(spk_inference.main, extract_argv(d, out, *extra))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    if pattern is None:  # clipped: embedded from what exists, counted, and the audio is what was embedded
        emb = assert_intact(out, {"s2": ref["r2"], "s0": ref["r1"]})
        assert summary["segments_clipped"] == 1 and summary["errors"] == 0
        assert summary["audio_hours"] * 3600 == pytest.approx(durs["r1"] + durs["r2"], abs=2e-3)
        assert "runs past the end" in err and "s0" in err
        return
    rows = read_errors_tsv(out / "errors.tsv")
    assert [r[0] for r in rows] == ["s0"] and re.search(pattern, rows[0][2]), rows
    assert_intact(out, {"s2": ref["r2"]})
    assert "s0" not in load_npz(out / "embeddings.npz") and summary["segments_clipped"] == 0
    x, _ = read_audio(str(files["long"]), 16000)  # the fix: the full recording, longer than the segment
    write_wav(rx, np.concatenate([x, x]), subtype="FLOAT")
    rc, err = cli(spk_inference.main, extract_argv(d, out, *extra))
    assert rc == 0, err
    assert read_errors_tsv(out / "errors.tsv") == []
    emb = assert_intact(out, {"s2": ref["r2"]})
    assert "s0" in emb and json.loads((out / "summary.json").read_text())["shards_resumed"] >= 1


# ===================================================================================================== 3. options
OPTION_CASES = {
    "shard_duration_nan": (["--shard_duration", "nan"], "--shard_duration", "finite"),
    "shard_duration_inf": (["--shard_duration", "inf"], "--shard_duration", "finite"),
    "shard_duration_zero": (["--shard_duration", "0"], "--shard_duration", "> 0"),
    "shard_duration_text": (["--shard_duration", "ten"], "--shard_duration", "expected a number"),
    "batch_bins_zero": (["--batch_bins", "0"], "--batch_bins", ">= 1"),
    "batch_bins_float": (["--batch_bins", "1.5"], "--batch_bins", "expected an integer"),
    "min_duration_negative": (["--min_duration", "-0.1"], "--min_duration", ">= 0"),
    "min_duration_nan": (["--min_duration", "nan"], "--min_duration", "finite"),
    "crop_duration_nan": (["--crop_duration", "nan"], "--crop_duration", "finite"),
    "lock_timeout_negative": (["--lock_timeout", "-5"], "--lock_timeout", "-1"),
    "lock_timeout_nan": (["--lock_timeout", "nan"], "--lock_timeout", "finite"),
    "max_errors_below_minus_one": (["--max_errors", "-2"], "--max_errors", ">= -1"),
    "num_workers_negative": (["--num_workers", "-1"], "--num_workers", ">= 0"),
    "model_streams_zero": (["--model_streams", "0"], "--model_streams", ">= 1"),
    "header_timeout_zero": (["--header_timeout", "0"], "--header_timeout", "> 0"),
    "pipe_timeout_inf": (["--pipe_timeout", "inf"], "--pipe_timeout", "finite"),
    "max_chunk_duration_negative": (["--max_chunk_duration", "-1"], "--max_chunk_duration", ">= 0"),
    "segment_overrun_unknown": (["--segment_overrun", "wrap"], "--segment_overrun", "invalid choice"),
    "output_format_unknown": (["--output_format", "npz,parquet"], "--output_format", "parquet"),
    "config_nan": ("config:shard_duration: .nan\n", "--shard_duration", "finite"),
    "config_bad_choice": ("config:on_error: ignore\n", "on_error", "invalid choice"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_refused_at_parse_time(case, audio, clean_whole, tmp_path):
    args, option, words = OPTION_CASES[case]
    files, _ = audio
    data = whole_corpus(tmp_path / "data", {r: files[r] for r in ("r1", "r2", "r3")})
    out = tmp_path / "out"
    if isinstance(args, str):
        (tmp_path / "c.yaml").write_text(args[len("config:"):])
        args = ["--config", tmp_path / "c.yaml"]
    rc, err = cli(spk_inference.main, ["--data_dir", data, "--output_dir", out, "--num_workers", "0",
                                       "--progress", "false", *args])
    assert rc == 2, err
    line = last_line(err)
    assert option in line and words in line and "Traceback" not in err, line
    assert not out.exists()  # parse time: nothing created, no model loaded
    if case in ("shard_duration_nan", "config_nan"):  # the fix: a valid value; the run gives the clean result
        rc, err = cli(spk_inference.main, extract_argv(data, out))
        assert rc == 0, err
        assert_intact(out, clean_whole[0], keys=["r1", "r2", "r3"])


SCORE_OPTION_CASES = {
    "asnorm_top_n_negative": (["--asnorm_top_n", "-1"], "--asnorm_top_n"),
    "asnorm_top_n_fraction": (["--asnorm_top_n", "2.5"], "--asnorm_top_n"),
    "p_targets_out_of_range": (["--p_targets", "0.01,1.5"], "--p_targets"),
    "p_targets_nan": (["--p_targets", "nan"], "--p_targets"),
    "p_targets_empty": (["--p_targets", ","], "--p_targets"),
    "duplicates_unknown": (["--duplicates", "merge"], "--duplicates"),
}


@pytest.mark.parametrize("case", sorted(SCORE_OPTION_CASES))
def test_score_options_refused_at_parse_time(case, clean_whole, tmp_path):
    args, option = SCORE_OPTION_CASES[case]
    trials = tmp_path / "t.txt"
    trials.write_text("1 r1 r1\n0 r1 r2\n")
    rc, err = cli(spk_score.main, ["--embeddings", clean_whole[1], "--trials", trials,
                                   "--output_dir", tmp_path / "s", *args])
    assert rc == 2 and option in last_line(err), err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("top_n", [0, -1, 2.5, True, "3"])
def test_api_top_n_refused(top_n, clean_whole):
    from spk_toolkit.scoring import as_norm

    emb = clean_whole[0]
    with pytest.raises(ValueError, match="top_n must be None"):
        as_norm(emb, (["r1"], ["r2"]), cohort=emb, top_n=top_n)


# ================================================================================================= 4. output side
def _no_model(monkeypatch):
    """Loading a model fails the test: the output side is checked before."""
    import spk_toolkit.backends.base as base

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(base, "load_model", refuse)


OUTPUT_CASES = ("output_dir_is_a_file", "parent_is_a_file", "read_only_file_system", "permission_denied",
                "too_little_free_space", "disk_full_writing_a_shard", "disk_full_writing_embeddings")


@pytest.mark.slow
@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_output_side(case, audio, clean_whole, tmp_path, monkeypatch):
    files, _ = audio
    ref, _ = clean_whole
    data = whole_corpus(tmp_path / "data", {r: files[r] for r in ("r1", "r2", "r3")})
    out = tmp_path / "out"
    target = out
    if case == "output_dir_is_a_file":
        out.write_text("not a directory")
        pattern = rf"{re.escape(str(out))}: exists and is not a directory"
    elif case == "parent_is_a_file":
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "out"
        pattern = rf"{re.escape(str(tmp_path / 'f'))}: cannot create the output directory .* is not a directory"
    elif case in ("read_only_file_system", "permission_denied"):
        code = errno.EROFS if case == "read_only_file_system" else errno.EACCES
        real_open = os.open

        def refuse(path, flags, *a, **k):
            if os.fspath(path).startswith(str(out) + os.sep) and flags & os.O_CREAT:
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", refuse)
        pattern = rf"{re.escape(str(out))}: output directory is not writable \({os.strerror(code)}\)"
    elif case == "too_little_free_space":
        import spk_toolkit.io.preflight as pf

        monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
        pattern = rf"{re.escape(str(out))}: only 4 KiB free, the outputs need about .*: No space left on device"
    if case in OUTPUT_CASES[:5]:
        _no_model(monkeypatch)
        rc, err = cli(spk_inference.main, extract_argv(data, target))
        assert rc == 3, err
        assert re.search(pattern, last_line(err)), last_line(err)
        assert "Traceback" not in err
        if target.is_dir():
            assert set(os.listdir(target)) <= {"run.log"} and not leftovers(target)
        monkeypatch.undo()
        if case == "output_dir_is_a_file":
            assert out.read_text() == "not a directory"  # untouched
            out.unlink()
        if case == "parent_is_a_file":
            (tmp_path / "f").unlink()
        rc, err = cli(spk_inference.main, extract_argv(data, target))
        assert rc == 0, err
        assert_intact(target, ref, keys=["r1", "r2", "r3"])
        return
    # a full disk later on: the message names the file and the reason, nothing temporary stays, a rerun resumes
    if case == "disk_full_writing_a_shard":
        import spk_toolkit.engine.shards as shards

        real, calls = shards.np.savez, []

        def full(f, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(f, *a, **k)

        monkeypatch.setattr(shards.np, "savez", full)
        pattern = rf"{re.escape(str(out / 'shards'))}/shard-\d+\.npz: No space left on device"
    else:
        from spk_toolkit.io.storage import NpzWriter

        def full(self, key, arr):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(NpzWriter, "_write", full)
        pattern = rf"{re.escape(str(out / 'embeddings.npz'))}: No space left on device"
    rc, err = cli(spk_inference.main, extract_argv(data, out))
    assert rc == 3, err
    assert re.search(pattern, last_line(err)), last_line(err)
    assert not leftovers(out), leftovers(out)
    assert not (out / "embeddings.npz").exists() and not (out / "summary.json").exists()
    n_done = len(list((out / "shards").glob("shard-*.npz")))
    assert n_done >= 1
    monkeypatch.undo()
    rc, err = cli(spk_inference.main, extract_argv(data, out))
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == n_done
    assert_intact(out, ref, keys=["r1", "r2", "r3"])


def test_oserror_later_names_path(tmp_path):
    """An OSError without a file name (a write() on a full disk) gets the path of the file being written."""
    from spk_toolkit.bin.cli import describe_exception, exit_code
    from spk_toolkit.io.preflight import naming

    with pytest.raises(OSError) as e:
        with naming(tmp_path / "x.npz"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert exit_code(e.value) == 3 and describe_exception(e.value) == f"{tmp_path / 'x.npz'}: No space left on device"


# ========================================================================================= 5. readers of files
def _truncated_npz(p, good):
    b = (good / "embeddings.npz").read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _pickled_npz(p, good):
    with open(p, "wb") as f:
        np.savez(f, r1=np.array([{"x": 1}], dtype=object))


def _pickle_file(p, good):
    import pickle

    p.write_bytes(pickle.dumps({"r1": np.ones(256, np.float32)}))


def _npy_as_npz(p, good):
    with open(p, "wb") as f:
        np.save(f, np.ones(256, np.float32))


def _truncated_ark(p, good):
    import kaldiio

    ark = p.with_suffix(".ark")
    kaldiio.save_ark(str(ark), {k: v for k, v in load_npz(good / "embeddings.npz").items()}, scp=str(p))
    b = ark.read_bytes()
    ark.write_bytes(b[: len(b) - 300])


def _bad_summary(p, good):
    p.mkdir()
    shutil.copy(good / "embeddings.npz", p / "embeddings.npz")
    (p / "summary.json").write_text('{"outputs": {"npz": ')


READER_CASES = {
    "truncated_npz": ("e.npz", _truncated_npz, r"e\.npz: truncated or corrupt npz archive"),
    "random_bytes_npz": ("e.npz", lambda p, g: p.write_bytes(np.random.default_rng(0).bytes(999)), r"e\.npz: not an npz archive \(not a zip archive\)"),
    "empty_npz": ("e.npz", lambda p, g: p.write_bytes(b""), r"e\.npz: not an npz archive \(an empty file\)"),
    "npy_named_npz": ("e.npz", _npy_as_npz, r"e\.npz: not an npz archive \(a single \.npy array\)"),
    "pickled_member": ("e.npz", _pickled_npz, r"e\.npz: member 'r1.npy' holds pickled Python objects"),
    "pickle_file": ("e.npz", _pickle_file, r"e\.npz: not an npz archive"),
    "truncated_ark": ("e.scp", _truncated_ark, r"e\.scp: key '\w+' has shape \(\d+,\), key 'r1' \(256,\) \(a truncated"),
    "random_bytes_h5": ("e.h5", lambda p, g: p.write_bytes(b"\x00" * 512), r"e\.h5: cannot read it \(OSError"),
    "corrupt_summary": ("run", _bad_summary, r"summary\.json: not valid JSON"),
    "missing_file": ("nothing.npz", lambda p, g: None, r"nothing\.npz"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_readers_of_files(case, clean_whole, tmp_path):
    name, make, pattern = READER_CASES[case]
    ref, good = clean_whole
    p = tmp_path / name
    make(p, good)
    trials = tmp_path / "t.txt"
    trials.write_text("1 r1 long\n0 r1 r2\n0 r2 r3\n1 r3 r3\n")
    out = tmp_path / "scores"
    rc, err = cli(spk_score.main, ["--embeddings", p, "--trials", trials, "--output_dir", out, "--no_plots"])
    assert rc == 2, err
    line = last_line(err)
    assert re.search(pattern, line), line
    assert "unsafe" not in err.lower() and "allow_pickle" not in err and "Traceback" not in err
    assert nothing_written(out)
    # the fix: the good file; the scores are those of the clean embeddings
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
    fixed = tmp_path / "good.npz"
    shutil.copy(good / "embeddings.npz", fixed)
    rc, err = cli(spk_score.main, ["--embeddings", fixed, "--trials", trials, "--output_dir", out, "--no_plots"])
    assert rc == 0, err
    got = [float(l.split()[2]) for l in (out / "t.score").read_text().splitlines()]
    want = [float(ref[a] @ ref[b] / np.linalg.norm(ref[a]) / np.linalg.norm(ref[b]))
            for a, b in (("r1", "long"), ("r1", "r2"), ("r2", "r3"), ("r3", "r3"))]
    np.testing.assert_allclose(got, want, atol=2e-6)


CHECKPOINT_CASES = {
    "truncated": (lambda p: p.write_bytes(_pth()[:200]), "truncated or not a PyTorch checkpoint"),
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(500)), "not a PyTorch checkpoint"),
    "pickled_objects": (lambda p: _pth(p, pickled=True), "holds pickled Python objects besides tensors; refused"),
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "directory": (lambda p: p.mkdir(), "a directory, not a checkpoint"),
}


class _NotWeights:
    pass


def _pth(p=None, pickled=False):
    import torch

    obj = {"w": torch.ones(3)}
    if pickled:
        obj["extra"] = _NotWeights()
    buf = io.BytesIO()
    torch.save(obj, buf)
    if p is not None:
        p.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_readers(case, tmp_path):
    from spk_toolkit.backends.espnet.checkpoint import read_state_dict

    make, words = CHECKPOINT_CASES[case]
    p = tmp_path / "valid.eer.best.pth"
    make(p)
    with pytest.raises(ValueError) as e:
        read_state_dict(p)
    assert str(e.value).startswith(f"{p}: ") and words in str(e.value), str(e.value)
    assert "weights_only=False" not in str(e.value) and "unsafe" not in str(e.value).lower()
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    _pth(p)  # the fix: a state dict
    assert list(read_state_dict(p)) == ["w"]


# ================================================================================================= 6. trial lists
CLEAN_TRIALS = "1 r1 long\n0 r1 r2\n0 r2 r3\n1 r3 r3\n0 long r3\n1 r2 r2\n0 r3 r1\n"

TRIAL_CASES = {
    "bom": (b"\xef\xbb\xbf" + CLEAN_TRIALS.encode(), (), 0, None),
    "crlf": (CLEAN_TRIALS.replace("\n", "\r\n").encode(), (), 0, None),
    "blank_lines": (("\n" + CLEAN_TRIALS.replace("\n", "\n \n")).encode(), (), 0, None),
    "bad_label_row_6": (CLEAN_TRIALS.replace("1 r2 r2", "yes r2 r2").encode(), (), 2,
                        r"row 6 \(.*t\.txt:6\) fits no trial format .*label 'yes' is not one of.*rows 1-5 fit 'voxceleb'"),
    "short_row_4": (CLEAN_TRIALS.replace("1 r3 r3", "1 r3").encode(), (), 2, r"row 4 \(.*t\.txt:4\) fits no trial format"),
    "wrong_format_given": (CLEAN_TRIALS.encode(), ("--trials_format", "kaldi"), 2, r"t\.txt:1: row 1: label 'long' is not one of"),
    "not_utf8": (CLEAN_TRIALS.replace("r3 r1", "r3 r\xe9").encode("latin-1"), (), 2, r"t\.txt:7: not valid UTF-8"),
    "empty": (b"\n\n", (), 2, r"t\.txt' is empty"),
    "unknown_keys": (CLEAN_TRIALS.replace("r3 r1", "r3 r9").encode(), (), 2, r"1 of \d+ utterances .* have no embedding .*'r9'"),
    "conflicting_duplicate": ((CLEAN_TRIALS + "1 r1 r2\n").encode(), (), 2, r"repeat an earlier pair with the other label.*t\.txt:8 vs .*t\.txt:2"),
    "duplicates_kept": ((CLEAN_TRIALS + "0 r1 r2\n1 r3 r3\n").encode(), (), 0, "kept"),
    "duplicates_dropped": ((CLEAN_TRIALS + "0 r1 r2\n1 r3 r3\n").encode(), ("--duplicates", "drop"), 0, "dropped"),
}


@pytest.mark.parametrize("case", sorted(TRIAL_CASES))
def test_trial_lists(case, clean_whole, tmp_path):
    text, extra, code, pattern = TRIAL_CASES[case]
    ref, good = clean_whole
    trials = tmp_path / "t.txt"
    trials.write_bytes(text)
    out = tmp_path / "scores"
    argv = ["--embeddings", good, "--trials", trials, "--output_dir", out, "--no_plots", *extra]
    rc, err = cli(spk_score.main, argv)
    assert rc == code, err
    (tmp_path / "clean.txt").write_text(CLEAN_TRIALS)
    rc0, err0 = cli(spk_score.main, ["--embeddings", good, "--trials", tmp_path / "clean.txt", "--output_dir",
                                     tmp_path / "clean_scores", "--no_plots"])
    clean = json.loads((tmp_path / "clean_scores" / "metrics.json").read_text())["trials"]["clean"]
    if code == 2:
        assert re.search(pattern, last_line(err)), last_line(err)
        # no score file; unknown keys are found after the embeddings were read, which run.log records
        assert "Traceback" not in err and (nothing_written(out) or set(os.listdir(out)) == {"run.log"})
        trials.write_text(CLEAN_TRIALS)  # the fix
        rc, err = cli(spk_score.main, argv[: argv.index("--no_plots") + 1])
        assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())["trials"]["t"]
    if case.startswith("duplicates"):
        notes = " ".join(m["trial_notes"])
        assert "2 duplicate trial(s)" in notes and "t.txt:8 repeats line 2" in notes and pattern in notes, notes
        assert m["n_trials"] == 9 if case == "duplicates_kept" else m["n_trials"] == 7
        assert "duplicate" in err
        if case == "duplicates_kept":
            return
    assert m["eer"] == clean["eer"] and m["n_trials"] == clean["n_trials"] and m["min_dcf"] == clean["min_dcf"]
    assert (out / "t.score").read_text() == (tmp_path / "clean_scores" / "clean.score").read_text()


# =================================================================================================== 7. errors.tsv
ERROR_PATH_CASES = {"tab": "with\ttab.wav", "double_quote": 'say "hi".wav', "quote_and_tab": '"\tboth".wav',
                    "leading_quote": '"start.wav'}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ERROR_PATH_CASES))
def test_errors_tsv_reads_back_with_csv(case, audio, clean_whole, tmp_path):
    import csv

    files, _ = audio
    ref, _ = clean_whole
    bad = tmp_path / ERROR_PATH_CASES[case]
    data = whole_corpus(tmp_path / "data", {"r2": files["r2"], "odd": bad})
    out = tmp_path / "out"
    rc, err = cli(spk_inference.main, extract_argv(data, out))
    assert rc == 0, err
    with open(out / "errors.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["utt_id", "path", "reason"] and all(len(r) == 3 for r in rows)
    assert rows[1:] == [["odd", str(bad), "file not found"]]
    assert_intact(out, ref, keys=["r2"])
    shutil.copy(files["r1"], bad)  # the fix: the file exists now
    rc, err = cli(spk_inference.main, extract_argv(data, out))
    assert rc == 0, err
    assert read_errors_tsv(out / "errors.tsv") == []
    assert_intact(out, {"r2": ref["r2"], "odd": ref["r1"]})


# ===================================================================== 8. bounded memory: exactness of the chunking
def test_resemblyzer_bounded_preparation_is_exact(audio):
    """The bounded-memory prepare and chunked partials give resemblyzer's own numbers, bit for bit."""
    from resemblyzer import audio as ra

    from spk_toolkit.backends import load_model

    files, _ = audio
    m = load_model("resemblyzer")
    x = np.concatenate([read_audio(str(files[r]), 16000)[0] for r in ("r1", "r2", "r3", "long")] * 6)
    prepared = m.prepare(x)
    assert np.array_equal(prepared, ra.preprocess_wav(x).astype(np.float32))
    wav_slices, mel_slices = m.encoder.compute_partial_slices(len(prepared), m.rate, m.min_coverage)
    need = wav_slices[-1].stop
    padded = np.pad(prepared, (0, max(need - len(prepared), 0)))
    mel = ra.wav_to_mel_spectrogram(padded)
    ref = np.stack([mel[s] for s in mel_slices])
    assert len(ref) > 2 * m.max_partials  # several blocks
    np.testing.assert_allclose(m._partials(prepared), ref, rtol=1e-6, atol=1e-6)


def test_max_chunk_duration_is_a_length_weighted_mean(tmp_path):
    import torch

    from spk_toolkit.backends.base import EmbeddingModel
    from spk_toolkit.engine import extract

    class Mean(EmbeddingModel):
        name = "mean_test"
        embed_dim = 2

        def embed(self, wav, lengths):
            mask = torch.arange(wav.shape[1])[None] < lengths[:, None]
            s = (wav * mask).sum(1, dtype=torch.float64) / lengths
            return torch.stack([s, lengths.double() / 16000], 1).float()

    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(16000 * 25)).astype(np.float32)
    write_wav(tmp_path / "long.wav", x, subtype="FLOAT")
    write_wav(tmp_path / "short.wav", x[:16000 * 3], subtype="FLOAT")
    d = whole_corpus(tmp_path / "d", {"long": tmp_path / "long.wav", "short": tmp_path / "short.wav"})
    extract(d, tmp_path / "o", model=Mean(), num_workers=0, progress=False, max_chunk_duration=10.0)
    emb = load_npz(tmp_path / "o" / "embeddings.npz")
    b = [0, 133333, 266666, 400000]  # 25 s in ceil(25 / 10) = 3 equal chunks
    chunks = [x[b[i]: b[i + 1]] for i in range(3)]
    want = sum(len(c) * np.array([c.astype(np.float64).mean(), len(c) / 16000]) for c in chunks) / len(x)
    np.testing.assert_allclose(emb["long"], want, rtol=1e-5)
    assert emb["long"][1] < 10.0  # every chunk at most 10 s
    np.testing.assert_allclose(emb["short"], [x[:48000].astype(np.float64).mean(), 3.0], rtol=1e-5)  # whole


# ============================================================================ criterion 2: a FIFO, and Ctrl-C
def _subprocess(argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "spk_toolkit.bin.spk_inference", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_fifo_costs_at_most_the_header_timeout(audio, tmp_path):
    files, _ = audio
    os.mkfifo(tmp_path / "fifo.wav")
    data = whole_corpus(tmp_path / "data", {"r1": files["r1"], "fifo": tmp_path / "fifo.wav"})
    # the FIFO is refused by its file type, never opened: with an hour of header timeout the run still ends (were
    # it opened, the read would block for the hour and the hang guard below would fail the test)
    p = _subprocess(extract_argv(data, tmp_path / "out", "--header_timeout", "3600"))
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    rows = read_errors_tsv(tmp_path / "out" / "errors.tsv")
    assert rows == [("fifo", str(tmp_path / "fifo.wav"), "not a regular file (a FIFO (named pipe))")]


@pytest.mark.slow
def test_sigint_stops_at_once_and_a_rerun_resumes(fillets_small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fillets_small, data)  # 48 real utterances, 0.5-20 s: dozens of shards
    clean = tmp_path / "clean"
    argv = ["--data_dir", data, "--num_workers", "1", "--progress", "false", "--shard_duration", "10"]
    p = _subprocess([*argv, "--output_dir", clean])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    out = tmp_path / "out"
    # stopped right after the first shard commit (a fault point of the engine), then Ctrl-C
    p = start_until([sys.executable, "-m", "spk_toolkit.bin.spk_inference", *map(str, argv), "--output_dir",
                     str(out)], "shard_committed:1", tmp_path)
    try:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=300)  # a hang guard: the batch in flight at most
    finally:  # a child left blocked at its fault point would sleep forever
        if p.poll() is None:
            p.kill()
    err = p.stderr_path.read_text()
    assert p.returncode == 130, err
    assert last_line(err) == ("spk_inference: error: interrupted (SIGINT); finished shards are kept: rerun the same "
                              "command to resume") and "Traceback" not in err
    assert not leftovers(out) and not (out / "embeddings.npz").exists()
    n_done = len(list((out / "shards").glob("shard-*.npz")))
    plan = json.loads((out / "plan.json").read_text())
    assert n_done == 1 < len(plan["shards"])
    p = _subprocess([*argv, "--output_dir", out])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == n_done
    a, b = load_npz(out / "embeddings.npz"), load_npz(clean / "embeddings.npz")
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6)
