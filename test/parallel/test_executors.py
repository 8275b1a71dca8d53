"""Executors on real speech: torchrun (2 ranks, gloo) and Dask (LocalCluster, 2 workers) give the one-process
result; each rank decodes only its own shards; the model is built once per Dask worker; 3D-Speaker outputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spk_toolkit.bin.cli import EXIT_FAILED
from spk_toolkit.engine import extract, shard_path
from spk_toolkit.io.datadir import load_kaldi_dir
from spk_toolkit.parallel import assign_shards
from spk_toolkit.testing import load_npz, make_subset

ROOT = Path(__file__).resolve().parents[2]
OPTS = dict(shard_duration=4.0, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    return make_subset(fillets_small, tmp_path_factory.mktemp("sub") / "data")


@pytest.fixture(scope="module")
def reference(subset, tmp_path_factory):
    """One in-process run: the result every executor must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    summary = extract(subset, out, **OPTS)
    return load_npz(out / "embeddings.npz"), summary


def test_assign_shards_balanced_and_exact():
    durs = [10.0, 9.0, 9.0, 8.0, 3.0, 3.0, 2.0, 1.0]
    a = assign_shards(durs, range(8), 2)
    assert sorted(k for r in a for k in r) == list(range(8))
    loads = [sum(durs[k] for k in r) for r in a]
    assert abs(loads[0] - loads[1]) <= max(durs)
    assert a == assign_shards(durs, range(8), 2)  # deterministic: every rank computes the same
    # resumed run: only unfinished shards are assigned, still balanced
    b = assign_shards(durs, [1, 2, 3, 5], 2)
    assert sorted(k for r in b for k in r) == [1, 2, 3, 5] and [sum(durs[k] for k in r) for r in b] == [17.0, 12.0]
    assert assign_shards(durs, [], 3) == [[], [], []]
    with pytest.raises(ValueError):
        assign_shards(durs, [0], 0)


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(subset, reference, tmp_path):
    ref, ref_summary = reference
    out = tmp_path / "tr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / ".venv/bin/torchrun") if (ROOT / ".venv/bin/torchrun").exists() else "torchrun",
           "--standalone", "--nproc_per_node=2", "-m", "spk_toolkit.bin.spk_inference",
           "--data_dir", str(subset), "--output_dir", str(out), "--shard_duration", "4", "--num_workers", "0",
           "--progress", "false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("utterances :") == 1  # only rank 0 prints the summary
    got = load_npz(out / "embeddings.npz")
    assert list(got) == list(ref)  # same keys, input order
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)
    s = json.loads((out / "summary.json").read_text())
    assert s["executor"] == "torchrun" and s["world_size"] == 2 and s["backend"] == "gloo"
    assert s["embedded"] == 12 and s["shards_resumed"] == 0 and s["shards"] == ref_summary["shards"]
    plan = json.loads((out / "plan.json").read_text())
    ranks = [s["workers"][w] for w in sorted(s["workers"])]
    assert [w.split()[:2] for w in sorted(s["workers"])] == [["rank", "0"], ["rank", "1"]]
    shards = [set(r["shards"]) for r in ranks]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(len(plan["shards"])))
    for r in ranks:  # each rank decoded exactly the utterances of its own shards, nothing else
        assert r["decoded"] == sum(len(plan["shards"][k]) for k in r["shards"]) == r["utterances"]
    # a rerun resumes everything: no shard is recomputed, same output
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_resumed"] == s["shards"] and s["shards_run"] == 0 and s["workers"] == {}
    again = load_npz(out / "embeddings.npz")
    assert all(np.array_equal(again[k], got[k]) for k in got)


@pytest.mark.slow
def test_dask_local_cluster_two_workers(subset, reference, tmp_path):
    from spk_toolkit import extract_embeddings

    ref, ref_summary = reference
    out = tmp_path / "dask"
    # a previous run (the reference: same plan) left 2 finished shards: the Dask run must resume them
    (out / "shards").mkdir(parents=True)
    shutil.copy(ref_summary["outputs"]["npz"].replace("embeddings.npz", "plan.json"), out / "plan.json")
    for k in (0, 3):
        shutil.copy(shard_path(Path(ref_summary["outputs"]["npz"]).parent, k), shard_path(out, k))
    s = extract_embeddings(subset, out, parallel={"env": "local", "n_workers": 2}, **OPTS)
    got = load_npz(out / "embeddings.npz")
    assert list(got) == list(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)
    assert s["executor"] == "dask" and s["n_workers"] == 2 and s["embedded"] == 12
    workers = list(s["workers"].values())
    assert [w["model_loads"] for w in workers] == [1, 1]  # built once per worker, never per shard
    assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
    ran = sorted(k for w in workers for k in w["shards"])
    assert ran == [k for k in range(s["shards"]) if k not in (0, 3)]  # every unfinished shard exactly once
    assert all(w["shards"] for w in workers)  # both workers took part
    assert s["shards_resumed"] == 2


def test_parallel_config_validation(tmp_path):
    from spk_toolkit.parallel.dask import load_parallel_config

    assert load_parallel_config(ROOT / "conf/parallel_local.yaml") == {"env": "local", "n_workers": 2, "options": {}}
    for name in ("local_gpu", "slurm", "pbs", "sge"):
        assert load_parallel_config(ROOT / f"conf/parallel_{name}.yaml")["env"] == name
    assert load_parallel_config({"parallel": {"env": "slurm", "n_workers": 3}})["n_workers"] == 3
    with pytest.raises(ValueError, match="env must be one of"):
        load_parallel_config({"env": "kubernetes"})
    with pytest.raises(ValueError, match="unknown parallel key"):
        load_parallel_config({"env": "local", "workers": 2})


@pytest.mark.slow
def test_run_sh_3dspeaker_pipeline(fillets_small, tmp_path):
    """bin/run.sh stages 1-3 over data_root/<dataset>/<speaker>/<utt>: 3D-Speaker outputs without pickle."""
    utts = sorted(load_kaldi_dir(fillets_small), key=lambda u: (u.duration, u.utt_id))
    root = tmp_path / "data_root"
    layout = {}
    for ds, spks in (("setA", ("cs_m", "nl_v")), ("setB", ("cs_v",))):
        for spk in spks:
            picks = [u for u in utts if u.spk_id == spk][:2]
            for j, u in enumerate(picks):
                d = root / ds / spk
                d.mkdir(parents=True, exist_ok=True)
                (d / f"utt_{j}{Path(u.path).suffix}").symlink_to(u.path)
                layout[f"{ds}/{spk}/utt_{j}"] = u.path
    (root / "setB" / "cs_v" / "broken.wav").write_bytes(b"")  # one bad file: counted in the breakdown
    run, final = tmp_path / "run", tmp_path / "final"
    p = subprocess.run(["bash", str(ROOT / "bin/run.sh"), "--data_root", str(root), "--output_dir", str(run),
                        "--final_output_dir", str(final), "--", "--num_workers", "0", "--progress", "false",
                        "--output_format", "npz"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "stage 3" in p.stdout and not (run / "shards").exists() and (run / "plan.json").is_file()
    s = json.loads((final / "summary.json").read_text())
    assert s["total_utterances"] == 6 and s["total_speakers"] == 3 and s["embedding_dimension"] == 256
    assert s["total_errors"] == 1
    assert s["datasets"] == {"setA": {"utterances": 4, "speakers": 2, "errors": 0},
                             "setB": {"utterances": 2, "speakers": 1, "errors": 1}}
    ul = json.loads((final / "utterance_list.json").read_text())
    assert [u["key"] for u in ul] == sorted(layout)
    assert all(u["path"].endswith(f"{u['utterance_id']}{Path(layout[u['key']]).suffix}") for u in ul)
    assert {(u["dataset"], u["speaker_id"]) for u in ul} == {("setA", "cs_m"), ("setA", "nl_v"), ("setB", "cs_v")}
    sl = {s["key"]: s for s in json.loads((final / "speaker_list.json").read_text())}
    assert {k: v["num_utterances"] for k, v in sl.items()} == {"setA/cs_m": 2, "setA/nl_v": 2, "setB/cs_v": 2}
    ue, se = load_npz(final / "utterance_embeddings.npz"), load_npz(final / "speaker_embeddings.npz")
    assert list(ue) == sorted(layout) and all(v.dtype == np.float32 for v in ue.values())
    for spk, v in se.items():
        np.testing.assert_allclose(v, np.mean([ue[k] for k in ue if k.startswith(spk + "/")], axis=0), atol=1e-6)
    assert not list(final.glob("*.pkl"))


@pytest.mark.slow
def test_torchrun_rank_failure_reaches_every_rank(tmp_path):
    """--on_error raise on one rank: every rank stops with the failing utterance named (no hang at the barrier)."""
    from spk_toolkit.testing import speechlike, write_wav

    data = tmp_path / "data"
    data.mkdir()
    bad = speechlike(1.0)
    bad[10] = np.nan
    write_wav(tmp_path / "nan.wav", bad, subtype="FLOAT")
    write_wav(tmp_path / "a.wav", speechlike(1.2))
    write_wav(tmp_path / "b.wav", speechlike(1.1, seed=2))
    (data / "wav.scp").write_text(f"u_a {tmp_path / 'a.wav'}\nu_b {tmp_path / 'b.wav'}\nu_nan {tmp_path / 'nan.wav'}\n")
    torchrun = ROOT / ".venv/bin/torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node=2", "-m",
           "spk_toolkit.bin.spk_inference", "--data_dir", str(data), "--output_dir", str(tmp_path / "o"),
           "--shard_duration", "1", "--num_workers", "0", "--progress", "false", "--on_error", "raise"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == EXIT_FAILED, p.stderr[-3000:]  # torchrun's status for a failed child: 1 as ours
    assert p.stderr.count("spk_inference: error: rank") == 2, p.stderr[-3000:]  # both ranks report it
    assert "utterance 'u_nan'" in p.stderr and "non-finite" in p.stderr
    assert not (tmp_path / "o" / "embeddings.npz").exists()


def test_rank_device_and_install_hints(tmp_path, monkeypatch):
    """Both branches, whether or not the optional packages are installed: missing -> ImportError naming the pip
    command (always checked, by hiding the module); installed -> make_cluster builds the right class from the
    conf/parallel_*.yaml options (jobqueue: job_script() checked, nothing submitted; dask_cuda: no GPU needed)."""
    import sys

    from spk_toolkit.parallel.dask import load_parallel_config, make_cluster
    from spk_toolkit.parallel.dist import rank_device

    assert [rank_device("cuda", 3), rank_device("cuda:0", 1), rank_device("cpu", 1)] == ["cuda:3", "cuda:1", "cpu"]
    mods = {"slurm": "dask_jobqueue", "pbs": "dask_jobqueue", "sge": "dask_jobqueue", "local_gpu": "dask_cuda"}
    pkgs = {"dask_jobqueue": "dask-jobqueue", "dask_cuda": "dask-cuda"}

    def cfg(env):
        return load_parallel_config(ROOT / f"conf/parallel_{env}.yaml")

    def hint_raised(env):
        mod = mods[env]
        with pytest.raises(ImportError, match=rf"needs {mod}: pip install {pkgs[mod]}(\s|$)"):
            make_cluster(cfg(env))

    for env, mod in mods.items():  # the not-installed message, checked even when the package is installed
        with monkeypatch.context() as m:
            m.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
            hint_raised(env)
    try:
        import dask_jobqueue as jq
    except ImportError:
        jq = None
    if jq is None:
        for env in ("slurm", "pbs", "sge"):
            hint_raised(env)
    else:
        from dask_jobqueue.core import JobQueueCluster

        scaled = []
        # on the base class of every jobqueue cluster: no job is ever submitted, whichever class is built
        monkeypatch.setattr(JobQueueCluster, "scale", lambda self, n=None, **kw: scaled.append((type(self), n)))
        for env, cls_name in (("slurm", "SLURMCluster"), ("pbs", "PBSCluster"), ("sge", "SGECluster")):
            c = cfg(env)
            o = c["options"]
            o.update(log_directory=str(tmp_path / env), scheduler_options={"dashboard_address": ":0"})
            cls = getattr(jq, cls_name)
            scaled.clear()
            cluster = make_cluster(c)
            try:
                assert type(cluster) is cls and scaled == [(cls, c["n_workers"])] and c["n_workers"] == 8
                script = cluster.job_script()
            finally:
                cluster.close()
            want = {
                "slurm": lambda: [f"#SBATCH -p {o['queue']}", f"#SBATCH --cpus-per-task={o['cores']}",
                                  f"#SBATCH -t {o['walltime']}", *(f"#SBATCH {x}" for x in o["job_extra_directives"])],
                "pbs": lambda: [f"#PBS -q {o['queue']}", f"#PBS -l {o['resource_spec']}",
                                f"#PBS -l walltime={o['walltime']}"],
                "sge": lambda: [f"#$ -q {o['queue']}", f"#$ -l {o['resource_spec']}", f"#$ -l h_rt={o['walltime']}"],
            }[env]() + [str(tmp_path / env), f"--nthreads {o['cores']}"]
            lines = script.splitlines()
            missing = [w for w in want if not any(w == l or (w in l and not w.startswith("#")) for l in lines)]
            assert not missing, f"{env}: {missing} not in job script:\n{script}"
    try:
        import dask_cuda
    except ImportError:
        hint_raised("local_gpu")
    else:
        made = []
        monkeypatch.setattr(dask_cuda, "LocalCUDACluster", lambda **kw: made.append(kw) or "cluster")
        c = cfg("local_gpu")
        c["options"] = {"CUDA_VISIBLE_DEVICES": "0,1"}
        assert make_cluster(c) == "cluster"
        assert made == [{"n_workers": 4, "threads_per_worker": 1, "CUDA_VISIBLE_DEVICES": "0,1"}]
