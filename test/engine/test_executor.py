"""Unit tests of spk_toolkit.engine.executor: choosing an executor (make_executor / get_executor), the registry, and
the in-process executor running a real plan end to end with a tiny deterministic model (no model download)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from spk_toolkit.backends.base import EmbeddingModel
from spk_toolkit.engine import extract
from spk_toolkit.engine.executor import (EXECUTORS, Executor, InProcessExecutor, executor_names, get_executor,
                                         make_executor, register_executor)
from spk_toolkit.engine.options import ExtractOptions
from spk_toolkit.engine.plan import prepare_run
from spk_toolkit.engine.shards import read_shard, shard_path
from spk_toolkit.io.datadir import Utterance
from spk_toolkit.io.storage import open_reader
from spk_toolkit.testing import speechlike, write_wav

LOCAL = {"env": "local", "n_workers": 1}


class TinyModel(EmbeddingModel):
    """``[mean, std, abs max, seconds]`` of each row's true samples (float64 inside): batch-invariant by design."""

    name = "test-executor-tiny"
    sample_rate = 16000
    embed_dim = 4

    def embed(self, wav, lengths):
        out = torch.zeros(len(wav), 4, dtype=torch.float64)
        for i in range(len(wav)):
            x = wav[i, : int(lengths[i])].double()
            out[i] = torch.stack([x.mean(), x.std(), x.abs().max(), torch.tensor(len(x) / 16000.0,
                                                                                 dtype=torch.float64)])
        return out.float()


def alone(model: EmbeddingModel, x: np.ndarray) -> np.ndarray:
    """The model's embedding of one waveform, computed directly (a batch of one, no engine)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    return model.embed(t, torch.tensor([len(x)])).numpy()[0]


@pytest.fixture
def wav_corpus(tmp_path):
    """Four short float wav files (exact samples on disk) as Utterance records, with their waveforms."""
    d = tmp_path / "audio"
    d.mkdir()
    utts, wavs = [], {}
    for k, sec in enumerate([0.35, 1.2, 0.6, 0.9]):
        x = speechlike(sec, f0=100.0 + 40 * k, seed=k)
        p = write_wav(d / f"s{k}.wav", x, subtype="FLOAT")
        utts.append(Utterance(f"spk{k % 2}-utt{k}", str(p), spk_id=f"spk{k % 2}"))
        wavs[f"spk{k % 2}-utt{k}"] = x
    return utts, wavs


# ------------------------------------------------------------------------------------------------ make_executor
def test_default_is_in_process_and_loads_nothing():
    """No executor and no parallel config: an InProcessExecutor; the model is only built at start()."""
    ex = make_executor()
    assert type(ex) is InProcessExecutor and ex.name == "inprocess"
    assert ex.model is None and ex.toolkit == "resemblyzer" and ex.is_driver
    assert ex.info() == {"executor": "in-process", "world_size": 1}
    m = TinyModel()
    ex2 = make_executor("inprocess", model=m)
    ex2.start()  # a built model is kept, nothing is loaded
    assert ex2.model is m and ex2.model_info() == m.describe()


def test_parallel_config_alone_means_dask():
    """A parallel config without an executor name selects the registered dask executor (no cluster started)."""
    ex = make_executor(parallel=dict(LOCAL, n_workers=2))
    assert type(ex) is get_executor("dask") and ex.name == "dask"
    assert ex.config == {"env": "local", "n_workers": 2, "options": {}}
    assert ex.client is None  # start() was not called


@pytest.mark.parametrize("name", ["torchrun", "inprocess"])
def test_parallel_with_non_dask_executor_is_refused(name):
    """--parallel with --executor torchrun / inprocess is a ValueError naming --parallel and the executor."""
    with pytest.raises(ValueError, match=f"--parallel.*--executor {name}"):
        make_executor(name, parallel=LOCAL)


def test_unknown_executor_lists_registered_names():
    """An unknown name raises ValueError listing the known ones (inprocess, torchrun, dask)."""
    with pytest.raises(ValueError, match="unknown executor 'nope'") as e:
        make_executor("nope")
    listed = str(e.value).split("registered: ", 1)[1].split(", ")
    assert {"dask", "inprocess", "torchrun"} <= set(listed)
    assert listed == sorted(listed) == executor_names()


def test_built_model_to_dask_is_refused():
    """The Dask executor builds its models on the workers: a built model is a ValueError."""
    with pytest.raises(ValueError, match="builds the model on each worker"):
        make_executor("dask", parallel=LOCAL, model=TinyModel())
    with pytest.raises(ValueError, match="builds the model on each worker"):
        make_executor(parallel=LOCAL, model=TinyModel())


def test_create_refuses_parallel_for_in_process():
    """Executor.create with a parallel config on an executor that takes none raises ValueError."""
    with pytest.raises(ValueError, match="--parallel configures the Dask executor"):
        InProcessExecutor.create(parallel={"env": "local"})
    assert type(InProcessExecutor.create(model=TinyModel())) is InProcessExecutor


def test_lazy_executors_resolve_in_a_fresh_interpreter():
    """get_executor("torchrun") / ("dask") work before spk_toolkit.parallel was ever imported (entry points)."""
    code = (
        "import sys\n"
        "from spk_toolkit.engine.executor import get_executor\n"
        "assert 'spk_toolkit.parallel' not in sys.modules, 'imported too early'\n"
        "t = get_executor('torchrun'); d = get_executor('dask')\n"
        "print(t.__module__, t.name, d.__module__, d.name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["spk_toolkit.parallel.dist", "torchrun", "spk_toolkit.parallel.dask", "dask"]


# ---------------------------------------------------------------------------------------------------- registry
def test_register_executor_refuses_empty_and_duplicate_names():
    """register_executor: an empty name or a name held by another class is refused; the same class again is not."""
    class Nameless(InProcessExecutor):
        name = ""

    with pytest.raises(ValueError, match="empty or registered twice"):
        register_executor(Nameless)

    class Impostor(InProcessExecutor):
        name = "inprocess"

    with pytest.raises(ValueError, match="'inprocess' is empty or registered twice"):
        register_executor(Impostor)
    assert EXECUTORS["inprocess"] is InProcessExecutor

    class First(InProcessExecutor):
        name = "test-executor-unit"

    class Second(InProcessExecutor):
        name = "test-executor-unit"

    assert "test-executor-unit" not in EXECUTORS
    try:
        assert register_executor(First) is First
        assert register_executor(First) is First  # idempotent for the same class
        assert get_executor("test-executor-unit") is First
        assert "test-executor-unit" in executor_names()
        with pytest.raises(ValueError, match="registered twice"):
            register_executor(Second)
        assert EXECUTORS["test-executor-unit"] is First
    finally:
        EXECUTORS.pop("test-executor-unit", None)
    assert "test-executor-unit" not in executor_names()


def test_executor_is_abstract():
    """The protocol's model_info and run must be defined by every executor."""
    with pytest.raises(TypeError):
        Executor()


# ------------------------------------------------------------------------------------------- in-process runs
def test_in_process_runs_a_real_plan(wav_corpus, tmp_path):
    """InProcessExecutor.run on a plan from prepare_run: one report per shard, each shard's rows = the model alone."""
    utts, wavs = wav_corpus
    model = TinyModel()
    opts = ExtractOptions(num_workers=0, shard_duration=1.6, batch_bins=16000 * 2, progress=False)
    out = tmp_path / "run"
    with make_executor(model=model) as ex:
        plan = prepare_run(utts, out, ex.model_info(), opts)
        # 3.05 s in ceil(3.05 / 1.6) = 2 shards of ~1.525 s, longest first: 1.2 + 0.9 s | 0.6 + 0.35 s
        assert plan.shards == [[1, 3], [2, 0]]
        progress = []
        reports = list(ex.run(plan, range(len(plan.shards)), out, opts, on_progress=progress.append))
    assert [r.shard for r in reports] == [0, 1]
    assert sum(r.embedded for r in reports) == 4 and all(r.errors == [] for r in reports)
    assert sum(progress) == pytest.approx(sum(len(x) for x in wavs.values()) / 16000)
    for k in range(len(plan.shards)):
        sd = read_shard(shard_path(out, k), k, plan.shard_keys(k), plan.shard_fingerprint(k))
        assert sd.keys == plan.shard_keys(k)  # batches longest first: the plan's order here
        for key, got in zip(sd.keys, sd.outputs["embedding"]):
            assert np.array_equal(got, alone(model, wavs[key])), key


def test_extract_with_built_model_end_to_end(wav_corpus, tmp_path):
    """extract(records, model=tiny): stored embeddings in input order equal the model on each file alone."""
    utts, wavs = wav_corpus
    model = TinyModel()
    out = tmp_path / "out"
    s = extract(utts, out, model=model, progress=False, num_workers=0, shard_duration=1.6, batch_bins=16000 * 2)
    assert s["embedded"] == 4 and s["errors"] == 0 and s["executor"] == "in-process"
    assert s["shards_run"] == 2 and s["shards_resumed"] == 0
    with open_reader(out) as r:
        assert list(r) == [u.utt_id for u in utts]
        for uid, x in wavs.items():
            want = alone(model, x)
            assert want[3] == np.float32(len(x) / 16000)  # the model really saw the whole file
            assert np.array_equal(r[uid], want), uid
    again = extract(utts, out, model=model, progress=False, num_workers=0, shard_duration=1.6)
    assert again["shards_resumed"] == 2 and again["shards_run"] == 0  # resumed, nothing recomputed
