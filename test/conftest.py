"""Shared fixtures: the real-speech fillets data (prepared by `make test` via bin/prepare_fillets.sh)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPK_TOOLKIT_DATA", ROOT / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} missing: run `make data` (bin/prepare_fillets.sh) first", pytrace=False)
    return path


@pytest.fixture(scope="session")
def fillets_small() -> Path:
    """Kaldi data dir: 12 real utterances (0.5-20 s) from each of 4 fillets speakers."""
    return _need(DATA / "fillets_small")


@pytest.fixture(scope="session")
def fillets_demo() -> Path:
    return _need(DATA / "fillets_demo")


@pytest.fixture(scope="session")
def fillets_trials() -> Path:
    return _need(DATA / "fillets_demo_trials.txt")


@pytest.fixture(scope="session")
def small_run(fillets_small, tmp_path_factory):
    """One resemblyzer extraction of fillets_small (npz + ark), shared by the tests that read its outputs."""
    from spk_toolkit.engine import extract

    out = tmp_path_factory.mktemp("small_run")
    summary = extract(fillets_small, out, output_format="npz,kaldi_ark", progress=False, shard_duration=60)
    return out, summary
