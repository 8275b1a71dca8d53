"""Plug-ins (issue 22, criterion 3): a backend, an executor, a storage format and a feature extractor defined in a
package outside spk_toolkit and declared as entry points are listed by available_models() and the CLIs' --help
and run end to end; changing the extractor's module marks its cache stale.

The plug-in is a distribution on ``sys.path`` (a package plus its ``.dist-info`` with ``entry_points.txt``, which
is what ``pip install`` leaves), written to a temporary directory; every check runs in a fresh interpreter with
that directory on ``PYTHONPATH``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

BACKEND = '''
"""A 2-d 'speaker embedding': mean and standard deviation of 25 ms frame log-energies."""
import torch

from spk_toolkit.backends.base import EmbeddingModel, register_backend


@register_backend
class EnergyStats(EmbeddingModel):
    name = "demo_energy_stats"
    sample_rate = 16000
    embed_dim = 2
    description = "frame log-energy mean and std (a plug-in test backend)"

    def embed(self, wav, lengths):
        out = torch.zeros(len(wav), 2)
        for i in range(len(wav)):
            x = wav[i, : int(lengths[i])].double()
            n = max(1, len(x) // 400)
            frames = torch.nn.functional.pad(x, (0, max(0, n * 400 - len(x))))[: n * 400].reshape(n, 400)
            e = torch.log(frames.pow(2).mean(1) + 1e-10)
            out[i] = torch.stack([e.mean(), e.std(unbiased=False)]).float()
        return out
'''

EXECUTOR = '''
"""Runs the shards in this process, last shard first (a plug-in test executor)."""
from spk_toolkit.engine.executor import InProcessExecutor, register_executor


@register_executor
class LastFirst(InProcessExecutor):
    name = "demo_last_first"

    def run(self, plan, shard_ids, output_dir, opts, on_progress=None):
        yield from super().run(plan, list(shard_ids)[::-1], output_dir, opts, on_progress)
'''

STORAGE = '''
"""``<stem>.json``: ``{key: {"dtype", "shape", "data"}}`` (a plug-in test storage format)."""
import json

import numpy as np

from spk_toolkit.io.atomic import AtomicPath
from spk_toolkit.io.storage import Reader, Writer, register_storage


class JsonWriter(Writer):
    name = "demo_json"

    def __init__(self, output_dir, stem="embeddings", *, fsync=True):
        super().__init__(output_dir, stem, fsync=fsync)
        self._rows = {}

    @classmethod
    def output_path(cls, output_dir, stem="embeddings"):
        from pathlib import Path

        return Path(output_dir) / f"{stem}.json"

    def _write(self, key, arr):
        self._rows[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.ravel().tolist()}

    def _commit(self):
        atomic = AtomicPath(self.path, fsync=self.fsync)
        with open(atomic.tmp, "x", encoding="utf-8") as f:
            json.dump(self._rows, f)
        atomic.commit()

    def _abort(self):
        self._rows = {}


class JsonReader(Reader):
    name = "demo_json"
    suffixes = (".json",)

    def _open(self):
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def __getitem__(self, key):
        v = self._handle()[key]
        return np.asarray(v["data"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])

    def __iter__(self):
        return iter(self._handle())

    def __len__(self):
        return len(self._handle())

    def __contains__(self, key):
        return key in self._handle()


register_storage("demo_json", JsonWriter, JsonReader)
'''

FEATURES = '''
"""Frame log-energies ``(T', 1)`` of 25 ms frames with a 10 ms shift (a plug-in test feature extractor)."""
import torch

from spk_toolkit.backends.base import register_backend
from spk_toolkit.features.base import FeatureExtractor, pad_frames

SCALE = 1.0


@register_backend
class FrameEnergy(FeatureExtractor):
    name = "demo_frame_energy"
    sample_rate = 16000

    def output_kinds(self):
        from spk_toolkit.backends.base import OutputKind

        return {"feats": OutputKind("sequence", "float32", (1,))}

    def config(self):
        return {"frame": 400, "shift": 160}

    def compute(self, wav, lengths):
        rows = []
        for i in range(len(wav)):
            x = wav[i, : int(lengths[i])].double()
            n = max(1, 1 + (len(x) - 400) // 160) if len(x) >= 400 else 1
            x = torch.nn.functional.pad(x, (0, max(0, 400 - len(x))))
            frames = x.unfold(0, 400, 160)[:n]
            rows.append((SCALE * torch.log(frames.pow(2).mean(1) + 1e-10)).float()[:, None])
        return {"feats": pad_frames(rows, (1,))}
'''

ENTRY_POINTS = '''
[spk_toolkit.backends]
demo_energy_stats = spk_demo_plugin.backend

[spk_toolkit.executors]
demo_last_first = spk_demo_plugin.executor

[spk_toolkit.storage]
demo_json = spk_demo_plugin.storage

[spk_toolkit.features]
demo_frame_energy = spk_demo_plugin.features
'''


@pytest.fixture
def plugin(tmp_path):
    """A plug-in distribution ``spk-demo-plugin`` on a directory for PYTHONPATH; returns that directory."""
    site = tmp_path / "site"
    pkg = site / "spk_demo_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""spk_toolkit plug-in used by the tests."""\n')
    for name, text in (("backend", BACKEND), ("executor", EXECUTOR), ("storage", STORAGE), ("features", FEATURES)):
        (pkg / f"{name}.py").write_text(textwrap.dedent(text).lstrip())
    info = site / "spk_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spk-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS.lstrip())
    (info / "top_level.txt").write_text("spk_demo_plugin\n")
    return site


def _env(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _py(site, code: str, timeout: float = 600) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(site), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cli(site, module: str, *args, cwd=ROOT, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", f"spk_toolkit.bin.{module}", *map(str, args)], cwd=cwd,
                          env=_env(site), capture_output=True, text=True, timeout=timeout)


_LISTING = """
    import contextlib, io, json
    import spk_toolkit
    from spk_toolkit.bin import cache_features, spk_inference
    from spk_toolkit.bin.cli import parse_args
    from spk_toolkit.engine.executor import executor_names
    from spk_toolkit.features import available_extractors
    from spk_toolkit.io.storage import storage_names
    def help_of(cli):  # what `<cli> --help` prints
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parse_args(cli.get_parser(), ["--help"])
        return " ".join(out.getvalue().split())

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        models = {m["name"]: m for m in spk_toolkit.available_models()}
        helps = {m.__name__: help_of(m) for m in (spk_inference, cache_features)}
    print(json.dumps({"models": sorted(models), "desc": {n: m["description"] for n, m in models.items()},
                      "dim": {n: m["embed_dim"] for n, m in models.items()}, "executors": executor_names(),
                      "storage": storage_names(), "extractors": available_extractors(), "help": helps,
                      "stderr": err.getvalue()}))
"""


def test_plugins_are_listed_by_the_registries_and_the_help(plugin):
    got = _py(plugin, _LISTING)
    assert {"demo_energy_stats", "demo_frame_energy", "resemblyzer", "fbank"} <= set(got["models"])
    assert got["dim"]["demo_energy_stats"] == 2 and "plug-in" in got["desc"]["demo_energy_stats"]
    assert {"demo_last_first", "inprocess", "dask", "torchrun"} <= set(got["executors"])
    assert {"demo_json", "npz", "hdf5"} <= set(got["storage"])
    assert "demo_frame_energy" in got["extractors"] and "demo_energy_stats" not in got["extractors"]
    inference, cache = got["help"]["spk_toolkit.bin.spk_inference"], got["help"]["spk_toolkit.bin.cache_features"]
    for name in ("demo_energy_stats", "demo_last_first", "demo_json"):
        assert name in inference, name
    assert "demo_frame_energy" in cache and "demo_json" in cache
    assert got["stderr"] == ""


def test_a_broken_plugin_warns_and_the_toolkit_still_works(plugin):
    """A plug-in module that fails to import is one warning naming its entry point; the others still work."""
    (plugin / "spk_demo_plugin" / "storage.py").write_text("raise ImportError('no such thing')\n")
    got = _py(plugin, _LISTING)
    assert "demo_json" not in got["storage"] and "npz" in got["storage"]
    assert "plug-in spk_toolkit.storage:demo_json (spk_demo_plugin.storage) failed to load: ImportError: " \
           "no such thing" in got["stderr"]
    assert got["stderr"].count("failed to load") == 1  # loaded (and warned) once per process
    inference = got["help"]["spk_toolkit.bin.spk_inference"]
    assert "demo_energy_stats" in inference and "demo_last_first" in inference


@pytest.mark.slow
def test_plugin_backend_executor_and_format_run_end_to_end(plugin, fillets_small, tmp_path):
    """spk_inference --toolkit demo_energy_stats --executor demo_last_first --output_format demo_json on real
    speech: every utterance, values equal to the backend's own forward, readable through open_reader; a rerun
    resumes; --overwrite removes the plug-in's output through its writer."""
    from spk_toolkit.io.datadir import load_kaldi_dir
    from spk_toolkit.testing import make_subset

    data = make_subset(fillets_small, tmp_path / "data", per_speaker=2)
    utts = load_kaldi_dir(data)
    out = tmp_path / "run"
    args = ("--data_dir", data, "--output_dir", out, "--toolkit", "demo_energy_stats", "--executor",
            "demo_last_first", "--output_format", "demo_json,npz", "--shard_duration", "5", "--progress", "false")
    r = _cli(plugin, "spk_inference", *args)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "demo_last_first" and summary["embedded"] == len(utts)
    assert Path(summary["outputs"]["demo_json"]).name == "embeddings.json"
    stored = json.loads((out / "embeddings.json").read_text())
    npz = np.load(out / "embeddings.npz")
    assert sorted(stored) == sorted(u.utt_id for u in utts)
    for k in stored:
        np.testing.assert_array_equal(np.asarray(stored[k]["data"], np.float32), npz[k])
    got = _py(plugin, f"""
        import json
        import numpy as np
        import spk_toolkit
        from spk_toolkit.io.storage import open_reader
        from spk_toolkit.io.datadir import load_kaldi_dir
        r = open_reader({str(out / "embeddings.json")!r})
        utts = load_kaldi_dir({str(data)!r})
        ref = spk_toolkit.load_model("demo_energy_stats").embed_utterances(utts, min_duration=0.1)
        print(json.dumps({{"n": len(r), "max_diff": max(float(np.abs(r[u.utt_id] - ref[i]).max())
                                                        for i, u in enumerate(utts))}}))
    """)
    assert got["n"] == len(utts) and got["max_diff"] < 1e-6
    r = _cli(plugin, "spk_inference", *args)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == summary["shards"]
    r = _cli(plugin, "spk_inference", *args[:-2], "--overwrite", "true", "--output_format", "npz", "--progress",
             "false")
    assert r.returncode == 0, r.stderr
    assert not (out / "embeddings.json").exists() and (out / "embeddings.npz").exists()


@pytest.mark.slow
def test_plugin_extractor_caches_and_a_code_change_marks_the_cache_stale(plugin, fillets_small, tmp_path):
    from spk_toolkit.io.datadir import load_kaldi_dir
    from spk_toolkit.testing import make_subset

    data = make_subset(fillets_small, tmp_path / "data", per_speaker=1)
    cache = tmp_path / "cache"
    code = f"""
        import json
        import numpy as np
        import spk_toolkit
        from spk_toolkit.features.cache import StaleCacheError
        ex = spk_toolkit.load_extractor("demo_frame_energy")
        try:
            c = spk_toolkit.open_cache({str(cache)!r}, extractor=ex)
            print(json.dumps({{"stale": False, "n": len(c), "frames": int(c["{{}}".format(next(iter(c)))].shape[0])}}))
        except StaleCacheError as e:
            print(json.dumps({{"stale": True, "why": str(e)}}))
    """
    r = _cli(plugin, "cache_features", "--data_dir", data, "--output_dir", cache, "--extractor", "demo_frame_energy",
             "--progress", "false")
    assert r.returncode == 0, r.stderr
    got = _py(plugin, code)
    assert got["stale"] is False and got["n"] == len(load_kaldi_dir(data)) and got["frames"] > 10
    src = plugin / "spk_demo_plugin" / "features.py"
    src.write_text(src.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))
    got = _py(plugin, code)
    assert got["stale"] is True and "code_sha256" in got["why"]
