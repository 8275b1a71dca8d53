"""The run directory's one owner (issue 22): ``spk_toolkit.io.rundir`` names a run's files; nothing else does."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from spk_toolkit.io.rundir import RUN_DIRS, RUN_FILES, RunDir, errors_tsv, read_errors_tsv
from spk_toolkit.io.storage import WRITERS, get_writer, open_reader

PKG = Path(__file__).resolve().parents[2] / "spk_toolkit"
#: The file names a run directory holds (besides the storage writers' own suffixes).
RUN_NAMES = ("embeddings.npz", "spk_embeddings.npz", "summary.json", "errors.tsv", "plan.json", "run.log")
OWNERS = {"io/rundir.py"}
#: (module, name) pairs that are another layout's own file, not a run directory's.
OTHER_LAYOUTS = {("pipeline3d.py", "summary.json")}  # 3D-Speaker's output directory


def _string_constants(tree: ast.AST):
    """Every string constant of a module that is not a docstring, with its line."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_run_file_name_is_hard_coded_outside_the_run_directory_module():
    """Acceptance 4: a literal ``summary.json``, ``errors.tsv``, ``embeddings.npz``, ... in code (not in a
    docstring or comment) outside ``io/rundir.py`` fails, naming file and line."""
    found = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if rel in OWNERS:
            continue
        for line, value in _string_constants(ast.parse(f.read_text(encoding="utf-8"))):
            # a path (the name alone, or after a '/'), not prose in a message or a help text
            name = value.rsplit("/", 1)[-1]
            if name in RUN_NAMES and (rel, name) not in OTHER_LAYOUTS:
                found.append(f"{rel}:{line}: {value!r}")
    assert not found, "run-directory file names outside spk_toolkit/io/rundir.py:\n" + "\n".join(found)


def test_the_scan_sees_a_hard_coded_name(tmp_path):
    """The scan above can fail: a module that opens ``summary.json`` by name is caught, its docstring is not."""
    src = '"""Reads summary.json."""\ndef f(d):\n    return open(d + "/summary.json")\n'
    hits = [v for _, v in _string_constants(ast.parse(src)) if "summary.json" in v]
    assert hits == ["/summary.json"]


def test_errors_tsv_round_trips_tabs_quotes_and_newlines(tmp_path):
    rd = RunDir(tmp_path)
    rows = [("a", "x\ty.wav", "bad\theader"), ('b"c', "p\nq.wav", "too short (0.05 s < 0.1 s)")]
    rd.write_errors(rows)
    assert rd.read_errors() == [("a", "x\ty.wav", "bad header"), ('b"c', "p\nq.wav", "too short (0.05 s < 0.1 s)")]
    assert rd.error_reasons() == {"a": "bad header", 'b"c': "too short (0.05 s < 0.1 s)"}
    assert read_errors_tsv(rd.errors_path) == rd.read_errors()
    assert errors_tsv([]) == "utt_id\tpath\treason\n"
    assert RunDir(tmp_path / "none").read_errors() == []


def test_summary_names_the_main_output_and_extra_outputs_are_removed_by_remove(tmp_path):
    """A run whose embedding stem is ``valid_embeddings``: readers go by the summary; an output a tool added
    (``add_outputs``) and every format's files of every stem are removed, a user's file is not."""
    rd = RunDir(tmp_path)
    with get_writer("npz")(tmp_path, "valid_embeddings") as w:
        w.write("u1", np.ones(3, np.float32))
    with get_writer("kaldi_ark")(tmp_path, "valid_embeddings") as w:
        w.write("u1", np.ones(3, np.float32))
    rd.write_summary({"output_formats": ["npz", "kaldi_ark"], "output_stem": "valid_embeddings",
                      "kinds": {"embedding": {"kind": "vector"}},
                      "outputs": {"npz": str(tmp_path / "valid_embeddings.npz"),
                                  "kaldi_ark": str(tmp_path / "valid_embeddings.scp")}})
    assert rd.main_output(["npz", "kaldi_ark"]) == ("npz", tmp_path / "valid_embeddings.npz")
    assert rd.main_output(["npz", "kaldi_ark"], only="kaldi_ark") == ("kaldi_ark", tmp_path / "valid_embeddings.scp")
    with open_reader(tmp_path) as r:
        assert list(r) == ["u1"]
    (tmp_path / "spk.scp").write_text("s1 x\n")
    rd.add_outputs(tts_spk_scp=tmp_path / "spk.scp")
    assert json.loads(rd.summary_path.read_text())["outputs"]["tts_spk_scp"] == str(tmp_path / "spk.scp")
    (tmp_path / "mine.txt").write_text("keep")
    for d in RUN_DIRS:
        (tmp_path / d).mkdir()
    (tmp_path / "plan.json").write_text("{}")
    removed = rd.remove(WRITERS.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"], removed
    assert set(RUN_FILES) - {"errors.tsv", "run.log"} <= set(removed)


def test_bad_summary_is_named(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="summary.json: not valid JSON"):
        RunDir(tmp_path).read_summary()
    assert RunDir(tmp_path / "absent").read_summary() is None
    with pytest.raises(FileNotFoundError, match="has not finished"):
        RunDir(tmp_path / "absent").add_outputs(x="y")
