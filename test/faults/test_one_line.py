"""Contracts 3 and 4 of docs/bad_input.md: one line, never a traceback; every input checked before work starts.

The property test draws bad (and good) values for every option of each of the six commands from its own parser
(hypothesis) and runs the command in this process on an input that is checked last (a corpus, trial list or scp
that is malformed): whatever the options, the exit code is one of the documented table, the last stderr line is the
command's ``error:`` line, no traceback and no ``unexpected`` error (a bug) appears. Then the named members of the
families: device strings, a YAML error in ``--parallel``, corrupt model packages, a bad ``--trials`` list refused
before the corpus is extracted, and an unexpected error turned into one line with its traceback in ``run.log``.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import pytest
from faults_helpers import cli_in_process as _cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spk_toolkit.bin.cli import EXIT_CODES, EXIT_FAILED, EXIT_USAGE

COMMANDS = ("spk_inference", "spk_score", "cache_features", "extract_spk_embed", "check_spk_embed_scp",
            "convert_to_avg_spk_embed")
#: options whose job is to print and exit 0, or to change what the run is (never fuzzed)
NOT_FUZZED = {"--help", "-h", "--help_espnet"}




@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Per command, the arguments that make it stop at its last input check (a malformed corpus / trial list / scp),
    plus files the fuzzer may name (a garbage file, a directory, a missing path)."""
    import kaldiio

    t = tmp_path_factory.mktemp("fuzz")
    bad = t / "bad_corpus"
    bad.mkdir()
    (bad / "wav.scp").write_text("u1 /x.wav\nu1 /y.wav\n")  # a duplicate id: refused when the corpus is read
    (bad / "text").write_text("u1 hello\n")
    with kaldiio.WriteHelper(f"ark,scp:{t / 'e.ark'},{t / 'e.scp'}") as w:
        for u in ("u1", "u2"):
            w(u, np.ones(4, np.float32))
    (t / "bad_trials").write_text("1 u1\n")  # a short row
    (t / "text").write_text("u1 a\nu1 b\n")  # a duplicate key: check_spk_embed_scp refuses it
    (t / "utt2spk").write_text("u1 s\nu2 s\n")
    (t / "garbage").write_bytes(b"\x00\xffnot: [yaml\n")
    out = t / "out"
    base = {
        "spk_inference": ["--data_dir", bad, "--output_dir", out],
        "cache_features": ["--data_dir", bad, "--output_dir", out],
        "extract_spk_embed": [bad, out],
        "spk_score": ["--embeddings", t / "e.scp", "--trials", t / "bad_trials", "--output_dir", out],
        "check_spk_embed_scp": [t / "e.scp", "xvector", "--text", t / "text"],
        "convert_to_avg_spk_embed": ["--utt-embed-path", t / "e.scp", "--spk-embed-path", t / "e.scp",
                                     "--utt2spk", t / "utt2spk"],
    }
    files = [str(t / "garbage"), str(t), str(t / "missing"), str(t / "e.scp"), str(t / "bad_trials")]
    return base, files


def _options(prog: str) -> list:
    parser = importlib.import_module(f"spk_toolkit.bin.{prog}").get_parser()
    opts = []
    for a in parser._actions:
        longs = [o for o in a.option_strings if o.startswith("--")]
        if not longs or set(a.option_strings) & NOT_FUZZED or isinstance(a, argparse._HelpAction):
            continue
        opts.append((longs[0], a))
    return opts


VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "1e309", "", ",", " , ", "true", "false", "maybe",
                     "cuda", "cuda:99", "gpu", "auto", "npz,bogus", "10000000000000000000000", "0x10", "-0"]),
    st.integers(min_value=-10**6, max_value=10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)


def _assert_one_line(prog: str, rc, err: str, verbose: bool = False) -> None:
    assert rc in EXIT_CODES, (rc, err)
    assert verbose or "Traceback" not in err, err  # -v asks for the traceback
    assert "unexpected" not in err, err  # an unexpected error is a bug the fuzzer found
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if prog == "check_spk_embed_scp" and rc == 1 and not lines:
        return  # its report (stdout): the scp does not match the text, the documented exit 1
    if rc != 0:
        assert lines and ": error: " in lines[-1] and lines[-1].split(":")[0].startswith(prog), err


@pytest.mark.slow
@pytest.mark.parametrize("prog", COMMANDS)
def test_every_option_of_every_command_any_value_one_line_and_a_documented_exit_code(prog, inputs, tmp_path,
                                                                                      monkeypatch):
    base, files = inputs
    monkeypatch.chdir(tmp_path)  # a drawn relative --output_dir ("nan", "0.0") lands here, not in the checkout
    options = _options(prog)
    assert len(options) >= 3, options
    main = importlib.import_module(f"spk_toolkit.bin.{prog}").main

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(options), st.one_of(VALUES, st.sampled_from(files))),
                    min_size=1, max_size=3))
    def run(picked):
        argv = list(base[prog])
        for (flag, action), value in picked:
            if action.nargs == 0:
                argv.append(flag)
            else:
                argv += [flag, value]
        rc, err = _cli(main, argv)
        _assert_one_line(prog, rc, err, verbose=any(a.dest == "verbose" for (_, a), _ in picked))

    run()


# ------------------------------------------------------------------------------------ named members, each family
@pytest.mark.parametrize("device,expect", [("gpu", "is not one of cpu, cuda"), ("cpu:1", "is not one of"),
                                           ("cuda", "no CUDA"), ("cuda:99", "CUDA"), ("CUDA:0", "CUDA")])
@pytest.mark.parametrize("prog", ["spk_inference", "cache_features"])
def test_a_device_that_is_not_here_is_refused_before_the_corpus_is_read(tmp_path, fillets_small, prog, device, expect):
    import torch

    if torch.cuda.is_available() and device in ("cuda", "CUDA:0"):
        pytest.skip("[environment] this machine has a GPU: cuda is a valid device here")
    main = importlib.import_module(f"spk_toolkit.bin.{prog}").main
    rc, err = _cli(main, ["--data_dir", fillets_small, "--output_dir", tmp_path / "o", "--device", device])
    assert rc == EXIT_USAGE, err
    _assert_one_line(prog, rc, err)
    assert expect in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o").exists()


def test_the_api_refuses_a_missing_device_in_one_line():
    from spk_toolkit.backends import load_model
    from spk_toolkit.backends.device import check_device

    assert check_device("cpu") == "cpu" and check_device(" CPU ") == "cpu"
    assert check_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="'gpu' is not one of"):
        load_model("resemblyzer", device="gpu")


@pytest.mark.parametrize("text,where", [("env: local\nn_workers: [2\n", ":3:1: the parallel config is not valid YAML"),
                                        ("- a\n- b\n", "a parallel config is a mapping"),
                                        ("env: local\nn_workers: two\n", "n_workers must be an integer >= 1"),
                                        ("env: lsff\n", "env must be one of"),
                                        ("env: local\noptions: 3\n", "options must be a mapping")])
def test_a_bad_parallel_config_is_refused_before_any_work(tmp_path, fillets_small, text, where):
    from spk_toolkit.bin import spk_inference

    (tmp_path / "p.yaml").write_text(text)
    rc, err = _cli(spk_inference.main, ["--data_dir", fillets_small, "--output_dir", tmp_path / "o",
                                        "--parallel", tmp_path / "p.yaml"])
    assert rc == EXIT_USAGE, err
    _assert_one_line("spk_inference", rc, err)
    assert where in err.strip().splitlines()[-1] and "p.yaml" in err, err
    assert not (tmp_path / "o").exists()


def _corrupt_packages(d: Path) -> dict:
    import zipfile

    (d / "truncated.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    (d / "noise.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))
    (d / "text.tar").write_bytes(b"this is not a tar file at all\n" * 40)
    with zipfile.ZipFile(d / "badmeta.zip", "w") as z:
        z.writestr("m/meta.yaml", "files: [model_file\n")
    with zipfile.ZipFile(d / "badconfig.zip", "w") as z:
        z.writestr("m/config.yaml", "frontend: {n_mels: [80\n")
        z.writestr("m/valid.eer.best.pth", b"not a checkpoint")
    return {"truncated_zip": d / "truncated.zip", "noise_tar_gz": d / "noise.tar.gz", "text_tar": d / "text.tar",
            "meta_yaml_syntax": d / "badmeta.zip", "config_yaml_syntax": d / "badconfig.zip"}


@pytest.mark.parametrize("case", ["truncated_zip", "noise_tar_gz", "text_tar", "meta_yaml_syntax",
                                  "config_yaml_syntax"])
def test_a_corrupt_model_package_is_one_line_naming_the_file(tmp_path, monkeypatch, fillets_small, case):
    from spk_toolkit.bin import spk_inference

    monkeypatch.setenv("SPK_TOOLKIT_CACHE", str(tmp_path / "cache"))
    pkg = _corrupt_packages(tmp_path)[case]
    rc, err = _cli(spk_inference.main, ["--data_dir", fillets_small, "--output_dir", tmp_path / "o", "--model", pkg,
                                        "--num_workers", "0", "--progress", "false"])
    assert rc == EXIT_USAGE, err
    _assert_one_line("spk_inference", rc, err)
    last = err.strip().splitlines()[-1]
    assert pkg.name in last or "meta.yaml" in last or "config.yaml" in last, last


def test_a_bad_trial_list_is_refused_before_the_corpus_is_extracted(tmp_path, fillets_small):
    from spk_toolkit.bin import spk_inference

    (tmp_path / "t.txt").write_text("1 a b\n1 a\n")
    rc, err = _cli(spk_inference.main, ["--data_dir", fillets_small, "--output_dir", tmp_path / "o",
                                        "--trials", tmp_path / "t.txt"])
    assert rc == EXIT_USAGE, err
    assert "t.txt:2" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o" / "embeddings.npz").exists() and not (tmp_path / "o" / "shards").exists()


def test_an_unexpected_error_is_one_line_exit_1_with_its_traceback_in_run_log(tmp_path, fillets_small, monkeypatch):
    """A bug (here a ZeroDivisionError planted in the planner) is not a traceback on stderr: one line, exit 1, the
    traceback in run.log; ``-v`` prints it on stderr too."""
    import spk_toolkit.engine.driver as driver
    from spk_toolkit.bin import spk_inference

    def boom(*a, **k):
        return 1 / 0

    monkeypatch.setattr(driver, "prepare_run", boom)
    argv = ["--data_dir", fillets_small, "--output_dir", tmp_path / "o", "--num_workers", "0", "--progress", "false"]
    rc, err = _cli(spk_inference.main, argv)
    assert rc == EXIT_FAILED, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("spk_inference: error: unexpected ZeroDivisionError: division by zero (a bug"), last
    log = (tmp_path / "o" / "run.log").read_text()
    assert "Traceback" in log and "ZeroDivisionError" in log and "def boom" not in err
    rc, err = _cli(spk_inference.main, argv + ["-v"])
    assert rc == EXIT_FAILED and "Traceback" in err
