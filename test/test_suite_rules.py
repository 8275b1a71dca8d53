"""The suite's own rules (test/conftest.py, docs/testing.md): with ``CI=true`` a skip is a failure unless its reason
is tagged as a part the machine cannot have; no test may leave a torch.distributed process group behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PROBES = '''
import pytest
from suite import ENVIRONMENT_SKIP

def test_passes():
    assert 1 + 1 == 2

def test_missing_part():
    pytest.importorskip("no_such_module_spk_toolkit")

def test_machine_cannot_have_it():
    pytest.skip(f"{ENVIRONMENT_SKIP} no root to install SLURM")

@pytest.mark.skipif(True, reason="a decorator skip")
def test_marked():
    pass

def test_leaks_a_process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
'''


def _outcomes(tmp_path: Path, ci: str) -> dict:
    d = tmp_path / f"suite_{ci or 'local'}"
    d.mkdir()
    shutil.copy(HERE / "conftest.py", d / "conftest.py")
    shutil.copy(HERE / "suite.py", d / "suite.py")
    (d / "test_probes.py").write_text(PROBES)
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, "COLUMNS": "1000"}  # summary lines untruncated
    if ci:
        env["CI"] = ci
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:randomly", "-p", "no:cacheprovider",
                        "-o", "pythonpath=.", str(d)], cwd=d, env=env, capture_output=True, text=True, timeout=300)
    got = {}
    for line in r.stdout.splitlines():  # the -rA summary: "PASSED f::name", "SKIPPED [1] f:line: reason"
        outcome, _, rest = line.partition(" ")
        if outcome in ("PASSED", "FAILED", "ERROR"):
            got.setdefault(rest.split("::")[-1].split(" ")[0], []).append(outcome)
        elif outcome == "SKIPPED":
            got.setdefault("skip reasons", []).append(rest.split(": ", 1)[-1])
    return got, r.stdout


@pytest.mark.parametrize("ci", ["", "true"])
def test_skips_fail_in_ci_unless_the_machine_cannot_have_the_part(tmp_path, ci):
    got, out = _outcomes(tmp_path, ci)
    assert got["test_passes"] == ["PASSED"], out
    skipped = got.get("skip reasons", [])
    assert "[environment] no root to install SLURM" in skipped, out
    if ci:  # a decorator's skip comes in setup (an error), importorskip in the call (a failure)
        assert len(skipped) == 1 and got["test_missing_part"] == ["FAILED"] and got["test_marked"] == ["ERROR"], out
        assert "skipped in CI, where a missing part is a failure (CI=true)" in out
    else:
        assert len(skipped) == 3 and "test_missing_part" not in got and "test_marked" not in got, out
    # the test passes in its call, and its teardown fails it for the process group it left behind
    assert got["test_leaks_a_process_group"] == ["PASSED", "ERROR"], out
    assert "left a torch.distributed process group initialised" in out


ROOT = HERE.parent
#: folders of test/ that are not a package of spk_toolkit: end-to-end runs, fault injection, test data
OWN_FOLDERS = {"e2e", "faults", "espnet_configs"}


def test_test_tree_mirrors_the_package():
    """Every sub-package of spk_toolkit has its test folder, and every other test folder is a sub-package (or one
    of :data:`OWN_FOLDERS`); every top-level module with tests has them in ``test/test_<module>.py``."""
    pkgs = {p.name for p in (ROOT / "spk_toolkit").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders - OWN_FOLDERS <= pkgs, folders - OWN_FOLDERS - pkgs
    assert pkgs - {"recipes"} <= folders, pkgs - folders  # recipes: exercised by `make data` and the e2e tests
    modules = {p.stem for p in (ROOT / "spk_toolkit").glob("*.py") if p.stem != "__init__"}
    top_tests = {p.stem[len("test_"):] for p in HERE.glob("test_*.py")}
    assert top_tests - modules <= {"layers", "packaging", "suite_rules"}, top_tests - modules


ENGINE_UNITS = ("plan_batches", "compute_batch", "eval_crops", "ShardAccumulator", "ErrorPolicy", "make_executor",
                "embed_utterances", "make_shards", "prepare_run", "fault_point")


@pytest.mark.parametrize("unit", ENGINE_UNITS)
def test_every_engine_unit_has_a_direct_test(unit):
    """Each unit of the engine is called by name in a test of test/engine/ or test/backends/ (not only through the
    CLI)."""
    texts = [p.read_text(encoding="utf-8") for d in ("engine", "backends") for p in (HERE / d).glob("test_*.py")]
    assert any(f"{unit}(" in t for t in texts), unit


def test_no_test_module_imports_another():
    """Shared helpers live in ``test/*_helpers.py`` (on sys.path from test/conftest.py), never in a ``test_*.py``:
    pytest puts a test file's folder on sys.path only once it collected a file there, so ``from test_x import``
    works in the whole suite and fails when the importing file runs alone (an order-dependent test)."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+test_\w+", re.M)
    offenders = [str(p.relative_to(HERE)) for p in HERE.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders
