"""Packaging (issue 18, criterion 1): the wheel, installed into a fresh venv with the constraints file, runs the
default job on real speech from its console scripts (resemblyzer, scoring, plots) with no traceback and no
deprecation warning on stderr; webrtcvad works without pkg_resources; the short --help of the ESPnet commands.

The fresh venv is built once per test session (``wheel_venv``): build the wheel from a copy of the sources, create
a venv from the base interpreter, ``pip install -c constraints.txt <wheel>`` with pip's own configuration (the
indexes this machine is set up with). It takes a few minutes on a 2-core machine, most of it installing torch and
librosa; the pip cache makes later sessions faster.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["spk-inference", "spk-score", "spk-train", "spk-embed-extract", "extract-spk-embed", "cache-features"]
SOURCES = ["spk_toolkit", "conf", "setup.cfg", "pyproject.toml", "README.md"]


def _clean_env() -> dict:
    """The environment for commands of the fresh venv: nothing of the dev venv or this checkout leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    """``(bin_dir, wheel)``: the built wheel installed into a fresh venv with constraints.txt."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info, which must not land in the checkout
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    dist = base / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout}\n{r.stderr}"
    (wheel,) = dist.glob("spk_toolkit-*.whl")
    venv = base / "venv"
    python = getattr(sys, "_base_executable", sys.executable)
    r = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # --no-compile: byte-compiling every module of torch at install time is most of the install (122 s vs 41 s on
    # this VM); the tests import a small part of it, compiled on import
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-compile", "-c", str(ROOT / "constraints.txt"), str(wheel)], capture_output=True, text=True,
                       timeout=1800, env=_clean_env(), cwd=base)
    assert r.returncode == 0, f"pip install of the wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return venv / "bin", wheel


def _run(cmd, cwd, timeout=900):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=_clean_env())


def _assert_clean(r, what):
    assert r.returncode == 0, f"{what} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    err = r.stderr.lower()
    assert "traceback" not in err, f"{what} printed a traceback:\n{r.stderr[-4000:]}"
    assert "deprecat" not in err, f"{what} printed a deprecation warning:\n{r.stderr[-4000:]}"
    assert "warning" not in err, f"{what} printed a warning:\n{r.stderr[-4000:]}"


@pytest.mark.slow
def test_wheel_has_the_package_data_and_the_console_scripts(wheel_venv):
    import zipfile

    bin_dir, wheel = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert "spk_toolkit/conf/inference.yaml" in names and "spk_toolkit/conf/parallel_local.yaml" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in SCRIPTS:
        module = script.replace("-", "_")
        if (ROOT / "spk_toolkit" / "bin" / f"{module}.py").exists():
            assert f"{script} = spk_toolkit.bin.{module}:main" in entry
            assert (bin_dir / script).exists(), script
    r = _run([bin_dir / "python", "-c", "import spk_toolkit, torch; print(spk_toolkit.__file__, torch.__version__)"],
             cwd=wheel.parent)
    assert r.returncode == 0, r.stderr
    where, torch_version = r.stdout.split()
    assert str(bin_dir.parent) in where  # the installed package, not the checkout
    assert torch_version.startswith("2.13.0")  # the constraints kept the CPU torch


@pytest.mark.slow
def test_every_console_script_has_a_help_with_defaults(wheel_venv, tmp_path):
    bin_dir, _ = wheel_venv
    for script in SCRIPTS:
        if not (bin_dir / script).exists():
            continue
        r = _run([bin_dir / script, "--help"], cwd=tmp_path)
        _assert_clean(r, f"{script} --help")
        assert "(default:" in r.stdout, script
    r = _run([bin_dir / "spk-train", "--output_dir", tmp_path / "x"], cwd=tmp_path)  # no espnet in this venv
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install" in r.stderr, r.stderr


@pytest.mark.slow
def test_installed_wheel_runs_the_default_job_on_real_speech(wheel_venv, fillets_small, tmp_path):
    """spk-inference (resemblyzer, bundled --config, trials, plots), then spk-score with plots, from the venv."""
    from spk_toolkit.io.datadir import load_kaldi_dir
    from spk_toolkit.testing import make_subset

    bin_dir, _ = wheel_venv
    data = make_subset(fillets_small, tmp_path / "data", per_speaker=3)
    utts = load_kaldi_dir(data)
    trials = tmp_path / "trials.txt"
    trials.write_text("".join(f"{int(a.spk_id == b.spk_id)} {a.utt_id} {b.utt_id}\n"
                              for a, b in itertools.combinations(utts, 2)))
    out = tmp_path / "exp"
    r = _run([bin_dir / "spk-inference", "--config", "inference", "--data_dir", data, "--output_dir", out,
              "--trials", trials, "--num_workers", "0"], cwd=tmp_path)
    _assert_clean(r, "spk-inference")
    assert "EER" in r.stdout and (out / "scores" / "trials_det.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedded"] == len(utts) and summary["model"]["toolkit"] == "resemblyzer"
    assert sorted(summary["output_formats"]) == ["kaldi_ark", "npz"]  # from the bundled conf/inference.yaml
    assert (out / "run.log").is_file()

    r = _run([bin_dir / "spk-score", "--embeddings", out / "embeddings.npz", "--trials", trials, "--output_dir",
              tmp_path / "scores"], cwd=tmp_path)
    _assert_clean(r, "spk-score")
    m = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    (entry,) = m["trials"].values()
    assert entry["n_trials"] == len(utts) * (len(utts) - 1) // 2 and 0 <= entry["eer_pct"] < 50
    assert (tmp_path / "scores" / "trials_det.png").stat().st_size > 0
    assert (tmp_path / "scores" / "trials_hist.png").stat().st_size > 0

    # the file / pair API from the installed package
    code = ("import spk_toolkit, sys; r = spk_toolkit.verify(sys.argv[1], sys.argv[2]); "
            "print(spk_toolkit.embed_file(sys.argv[1]).shape, round(r.score, 4))")
    r = _run([bin_dir / "python", "-c", code, utts[0].path, utts[1].path], cwd=tmp_path)
    _assert_clean(r, "embed_file / verify")
    assert r.stdout.startswith("(256,)")


@pytest.mark.slow
def test_webrtcvad_without_pkg_resources_gives_the_same_embeddings(fillets_small, tmp_path):
    """With setuptools >= 81 (no pkg_resources), webrtcvad.py cannot import; the backend then uses the same C
    extension directly. Embeddings equal resemblyzer's own embed_utterance(preprocess_wav(...)) computed with the
    real webrtcvad module."""
    pytest.importorskip("resemblyzer")
    import numpy as np

    from spk_toolkit.io.audio import read_audio
    from spk_toolkit.io.datadir import load_kaldi_dir

    paths = [u.path for u in load_kaldi_dir(fillets_small)[:4]]
    out = tmp_path / "shim.npy"
    code = f"""
import sys, warnings
sys.modules["pkg_resources"] = None   # as with setuptools >= 81
warnings.simplefilter("error")        # any warning raised while importing and embedding fails the run
import numpy as np
import spk_toolkit
emb = spk_toolkit.embed_files({paths!r})
import webrtcvad
assert "spk_toolkit" in (webrtcvad.__doc__ or ""), webrtcvad
np.save({str(out)!r}, emb)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    shim = np.load(out)

    from spk_toolkit.backends.resemblyzer import import_resemblyzer

    VoiceEncoder, audio, _ = import_resemblyzer()
    import webrtcvad

    assert "spk_toolkit" not in (webrtcvad.__doc__ or "")  # this process has the real module
    enc = VoiceEncoder(device="cpu", verbose=False)
    ref = np.stack([enc.embed_utterance(audio.preprocess_wav(read_audio(p, 16000)[0])) for p in paths])
    assert np.abs(shim - ref).max() < 1e-5


@pytest.mark.slow
def test_short_help_defaults_match_espnet():
    """The short --help of spk_train / spk_embed_extract shows ESPnet's own defaults and choices."""
    pytest.importorskip("espnet2")
    code = """
import json, warnings
warnings.simplefilter("ignore")
from spk_toolkit.bin.spk_train import get_parser as train
from spk_toolkit.bin.spk_embed_extract import get_parser as extract
out = {}
for name, get in (("train", train), ("extract", extract)):
    out[name] = {a.dest: [repr(a.default), list(a.choices) if a.choices else None] for a in get()._actions}
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    espnet = json.loads(r.stdout.strip().splitlines()[-1])
    from spk_toolkit.bin.espnet_help import SPK_EMBED_EXTRACT, SPK_TRAIN

    for name, ours in (("train", SPK_TRAIN), ("extract", SPK_EMBED_EXTRACT)):
        for flag, default, _, choices in ours:
            dest = flag.lstrip("-")
            assert dest in espnet[name], (name, flag)
            assert espnet[name][dest][0] == repr(default), (name, flag, espnet[name][dest][0], default)
            if choices:
                assert espnet[name][dest][1] == list(choices), (name, flag)
