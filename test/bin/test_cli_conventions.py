"""CLI manners (issue 18, criterion 3): --help with defaults and choices on every command (short for the ESPnet
ones), -v / --quiet, no third-party line at default verbosity (Dask included), run.log, a resumed run that says it
embedded nothing, --overwrite clearing scores/, unlabelled lists and single pairs printing their scores, plots
without matplotlib in one line. The "--help under 3 s" figure is a benchmark: bench/cli_help.py."""
from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "spk_toolkit" / "bin"
COMMANDS = sorted(p.stem for p in BIN.glob("*.py") if p.stem not in ("__init__", "cli", "espnet_help"))


def _cli(module, *args, cwd=ROOT, timeout=900, pre=""):
    if pre:  # run inside a prepared interpreter (e.g. with an import blocked)
        code = f"{pre}\nimport sys\nfrom spk_toolkit.bin.{module} import main\nsys.exit(main({[str(a) for a in args]!r}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", f"spk_toolkit.bin.{module}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _third_party_lines(stderr: str) -> list:
    """stderr lines that are neither a tqdm progress bar nor one of our log lines / error messages."""
    out = []
    for line in re.split(r"[\r\n]+", stderr):
        s = line.strip()
        if not s or re.match(r"^[\w /.-]*:\s+\d+%\|", s) or "it/s]" in s or "s/s]" in s:
            continue  # a progress bar
        m = re.match(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ ([\w.]+): ", s)
        if m and m.group(1).split(".")[0] in ("spk_toolkit", "spk_inference", "spk_score", "cache_features",
                                               "extract_spk_embed"):
            continue
        out.append(s)
    return out


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    """12 real utterances (3 per speaker), every pair as a labelled list, 5 pairs unlabelled, one single pair."""
    from spk_toolkit.io.datadir import load_kaldi_dir
    from spk_toolkit.testing import make_subset

    d = tmp_path_factory.mktemp("manners")
    data = make_subset(fillets_small, d / "data", per_speaker=3)
    utts = load_kaldi_dir(data)
    pairs = list(itertools.combinations(utts, 2))
    (d / "trials.txt").write_text("".join(f"{int(a.spk_id == b.spk_id)} {a.utt_id} {b.utt_id}\n" for a, b in pairs))
    (d / "unlabelled.txt").write_text("".join(f"{a.utt_id} {b.utt_id}\n" for a, b in pairs[:5]))
    (d / "pair.txt").write_text(f"{utts[0].utt_id} {utts[5].utt_id}\n")
    return data, d


def _help_parser(module: str) -> argparse.ArgumentParser:
    """The parser whose help ``--help`` prints: the short list for the ESPnet commands, else ``get_parser()``."""
    import importlib

    from spk_toolkit.bin import espnet_help

    mod = importlib.import_module(f"spk_toolkit.bin.{module}")
    if module in ("spk_train", "spk_embed_extract"):
        return espnet_help.short_parser(module, "", getattr(espnet_help, module.upper()))
    return mod.get_parser()


@pytest.mark.parametrize("module", COMMANDS)
def test_help_lists_every_default_and_choice(module):
    """The printed ``--help`` of every command shows each option's default and its choices (each one checked,
    not just one ``(default:`` somewhere)."""
    r = _cli(module, "--help", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    text = " ".join(r.stdout.split())
    parser = _help_parser(module)
    checked = 0
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        assert a.option_strings[0] in text, a.option_strings
        if a.default not in (None, argparse.SUPPRESS) and not a.required:
            assert f"(default: {a.default})" in text, (module, a.option_strings, a.default)
            checked += 1
        if a.choices:
            assert "{" + ",".join(map(str, a.choices)) + "}" in text, (module, a.option_strings)
    assert checked >= 1, module
    if module in ("spk_train", "spk_embed_extract"):
        # ours: the options most runs need, ESPnet's hundreds behind --help_espnet (checked in test_packaging)
        assert len(r.stdout.splitlines()) < 120 and "--help_espnet" in r.stdout


@pytest.mark.slow
def test_help_espnet_prints_espnets_options():
    pytest.importorskip("espnet2")
    r = _cli("spk_train", "--help_espnet", timeout=300)
    assert r.returncode == 0 and len(r.stdout.splitlines()) > 300 and "--optim_conf" in r.stdout


@pytest.mark.slow
def test_default_run_quiet_stderr_run_log_resume_overwrite(subset, tmp_path):
    data, d = subset
    out = tmp_path / "exp"
    base = ["--data_dir", data, "--output_dir", out, "--num_workers", "0"]
    r = _cli("spk_inference", *base, "--trials", d / "trials.txt", d / "unlabelled.txt", d / "pair.txt")
    assert r.returncode == 0, r.stderr
    assert _third_party_lines(r.stderr) == [], r.stderr  # no pkg_resources, librosa, ... line
    assert f"log        : {out / 'run.log'}" in r.stdout
    log = (out / "run.log").read_text()
    assert log.count("==== ") == 1 and "spk_inference --data_dir" in log and "summary:" in log and "EER %" in log
    # an unlabelled list and a single pair print their scores (not their count under n_target)
    for name, n in (("unlabelled", 5), ("pair", 1)):
        m = re.search(rf"^{name}: {n} trial\(s\), unlabelled; scores.*:$", r.stdout, re.M)
        assert m, r.stdout
        rows = r.stdout[m.end():].lstrip("\n").splitlines()[:n]
        assert all(re.match(r"^\s+\S+\s+\S+\s+-?\d\.\d{4}$", row) for row in rows), rows
    first = json.loads((out / "summary.json").read_text())
    assert first["computed_utterances"] == 12 and first["shards_resumed"] == 0

    # fully resumed: the summary says 0 embedded in this run, and no throughput is claimed
    r = _cli("spk_inference", *base, "--trials", d / "trials.txt")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["computed_utterances"] == 0 and s["computed_audio_seconds"] == 0
    assert s["shards_run"] == 0 and s["shards_resumed"] == s["shards"] and s["embedded"] == 12
    assert "this run   : 0 embedded" in r.stdout and "nothing left to embed" in r.stdout
    assert "x real time" not in r.stdout
    assert (out / "run.log").read_text().count("==== ") == 2  # appended

    # --overwrite clears scores/ with the rest; run.log starts again with this run
    (out / "scores" / "stale.txt").write_text("from an old run")
    r = _cli("spk_inference", *base, "--overwrite", "true", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not (out / "scores").exists()
    log = (out / "run.log").read_text()
    assert log.count("==== ") == 1 and "--overwrite true" in log
    assert json.loads((out / "summary.json").read_text())["computed_utterances"] == 12
    # --quiet: no progress bar, no summary table; where the outputs went is still printed
    assert r.stderr.strip() == "" and "utterances :" not in r.stdout and str(out) in r.stdout


@pytest.mark.slow
def test_verbose_shows_info_lines(subset, tmp_path):
    data, _ = subset
    r = _cli("spk_inference", "--data_dir", data, "--output_dir", tmp_path / "v", "--num_workers", "0", "-v",
             "--progress", "false")
    assert r.returncode == 0, r.stderr
    assert re.search(r" INFO spk_toolkit\.", r.stderr), r.stderr


@pytest.mark.slow
def test_dask_run_prints_no_dask_line_at_default_verbosity(subset, tmp_path):
    pytest.importorskip("distributed")
    data, _ = subset
    cfg = tmp_path / "parallel.yaml"
    cfg.write_text("env: local\nn_workers: 2\n")
    r = _cli("spk_inference", "--data_dir", data, "--output_dir", tmp_path / "dask", "--parallel", cfg,
             "--shard_duration", "10")
    assert r.returncode == 0, r.stderr
    assert _third_party_lines(r.stderr) == [], r.stderr
    log = (tmp_path / "dask" / "run.log").read_text()
    assert "summary:" in log


@pytest.mark.slow
def test_spk_score_plots_without_matplotlib_in_one_line(subset, tmp_path):
    data, d = subset
    import spk_toolkit

    spk_toolkit.extract_embeddings(data, tmp_path / "emb", progress=False, num_workers=0)
    r = _cli("spk_score", "--embeddings", tmp_path / "emb", "--trials", d / "trials.txt", "--output_dir",
             tmp_path / "scores", pre="import sys\nsys.modules['matplotlib'] = None")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("plots skipped: matplotlib is not installed (pip install matplotlib)") == 1, r.stdout
    assert "EER %" in r.stdout and "Traceback" not in r.stderr
    m = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert "plots_skipped" in m and not list((tmp_path / "scores").glob("*.png"))
    assert (tmp_path / "scores" / "run.log").is_file()
