"""Shared fixtures (the real-speech fillets data, prepared by `make test` via bin/prepare_fillets.sh) and the suite's
rules that hold for every test (docs/testing.md): in CI (``CI=true``) a skip is a failure unless its reason is tagged
:data:`ENVIRONMENT_SKIP` (a part the CI machine cannot have); no test leaves a process group behind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from suite import ENVIRONMENT_SKIP, in_ci

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPK_TOOLKIT_DATA", ROOT / "data"))


def _skip_reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip_in_ci(rep) -> None:
    if rep.skipped and in_ci() and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep.longrepr)
        if ENVIRONMENT_SKIP not in reason:
            rep.outcome = "failed"
            rep.longrepr = f"skipped in CI, where a missing part is a failure (CI=true): {reason}"


#: the files that take longest, started first so two xdist workers (make test) finish together (docs/testing.md)
HEAVY_FIRST = ("test_packaging.py", "faults/test_recovery.py", "engine/test_output_dir.py", "train/test_spk_trainer.py",
               "e2e/test_tts_recipe.py", "features/test_cache.py", "faults/test_worker_death.py",
               "bin/test_cli_conventions.py", "faults/test_one_line.py")


def pytest_collection_modifyitems(session, config, items):
    """Heaviest files first (a stable partition: each file's tests stay together and in their order)."""
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return next((k for k, f in enumerate(HEAVY_FIRST) if path.endswith(f)), len(HEAVY_FIRST))

    items[:] = sorted(items, key=rank)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())  # a module-level importorskip


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


@pytest.fixture(scope="session")
def bad_dir(tmp_path_factory, fillets_small):
    """3 good real utterances + the five bad kinds of issue 2."""
    import numpy as np

    from spk_toolkit.io.datadir import load_kaldi_dir
    from spk_toolkit.testing import speechlike, write_wav

    d = tmp_path_factory.mktemp("bad")
    good = load_kaldi_dir(fillets_small)[:3]
    (d / "empty.wav").write_bytes(b"")
    (d / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 7)
    write_wav(d / "nan.wav", np.full(16000, np.nan, np.float32), subtype="FLOAT")
    write_wav(d / "short.wav", speechlike(0.05))
    lines = [f"{u.utt_id} {u.path}" for u in good] + [
        f"bad_missing {d / 'missing.wav'}", f"bad_empty {d / 'empty.wav'}", f"bad_corrupt {d / 'corrupt.wav'}",
        f"bad_nan {d / 'nan.wav'}", f"bad_short {d / 'short.wav'}"]
    data = d / "data"
    data.mkdir()
    (data / "wav.scp").write_text("\n".join(sorted(lines)) + "\n")
    return data, [u.utt_id for u in good]


@pytest.fixture(autouse=True)
def _no_speechbrain_lazy_placeholders():
    """After each test, drop SpeechBrain's unloaded ``LazyModule`` placeholders from ``sys.modules``.

    A test that imports speechbrain directly (the docs examples, the test model builders) leaves them there, and
    hypothesis walks ``sys.modules`` reading ``__file__``, which makes a placeholder import an absent optional
    dependency (``k2``) and fail unrelated property tests. The speechbrain backend does the same after its import.
    """
    yield
    import sys

    if "speechbrain" in sys.modules:
        from spk_toolkit.backends.speechbrain import drop_unloaded_lazy_modules

        drop_unloaded_lazy_modules()


@pytest.fixture(autouse=True)
def _no_process_group_left_behind(request):
    """A test that initialises a torch.distributed process group in this process destroys it again: a group left
    behind would change what later tests see (their order must not matter). Fails the test that leaked it."""
    yield
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} left a torch.distributed process group initialised", pytrace=False)
