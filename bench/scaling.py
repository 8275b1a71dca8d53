"""Scaling benchmark: extraction throughput with 1 and 2 processes, and the per-shard cost breakdown.

Runs on the fillets data (real speech) and prints a table plus a JSON record:

* ``in-process``  : ``spk_inference`` (1 process, DataLoader with ``--num_workers``)
* ``torchrun x2`` : ``torchrun --standalone --nproc_per_node=2 -m spk_toolkit.bin.spk_inference`` (gloo)
* ``dask x2``     : ``spk_inference --parallel`` with a LocalCluster of 2 workers

and, in this process, where a shard's time goes: header reads (planning), decode + resample, backend preparation
(resemblyzer VAD), model forward, shard write, merge. Wall times include process start and model load (what a
user waits for); ``x real time`` is audio seconds / wall seconds.

Usage::

    .venv/bin/python bench/scaling.py [--data data/fillets_small] [--shard_duration 30] [--out exp/bench_scaling]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env=None) -> tuple:
    """Run ``cmd``; return (wall seconds, CPU seconds of it and its descendants: user + system)."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def breakdown(data: str, shard_duration: float) -> dict:
    """Per-stage costs measured in this process on the whole corpus (seconds, and seconds per audio second)."""
    import torch

    from spk_toolkit.backends.base import load_model
    from spk_toolkit.data import bucket_batches, collate
    from spk_toolkit.engine import ExtractOptions, make_shards, write_shard
    from spk_toolkit.engine.shards import ShardData
    from spk_toolkit.io.audio import read_audio
    from spk_toolkit.io.datadir import load_corpus, measure_durations

    torch.set_num_threads(1)
    t = time.perf_counter()
    model = load_model("resemblyzer")
    t_load = time.perf_counter() - t
    utts = load_corpus(data)
    for u in utts:
        u.duration = None
    t = time.perf_counter()
    measure_durations(utts)
    t_hdr = time.perf_counter() - t
    audio = sum(u.duration for u in utts)
    t = time.perf_counter()
    wavs = [read_audio(u.path, 16000)[0] for u in utts]
    t_dec = time.perf_counter() - t
    t = time.perf_counter()
    prepared = [model.prepare(w) for w in wavs]
    t_prep = time.perf_counter() - t
    opts = ExtractOptions()
    t = time.perf_counter()
    embs = np.zeros((len(utts), model.embed_dim), np.float32)
    for b in bucket_batches([len(x) for x in prepared], opts.batch_bins):
        batch = collate([(i, prepared[i], None) for i in b])
        embs[batch.indices] = model.embed(batch.wav, batch.lengths).numpy()
    t_model = time.perf_counter() - t
    shards = make_shards([u.duration for u in utts], shard_duration)
    tmp = ROOT / "exp" / "bench_scaling_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    for k, s in enumerate(shards):
        kinds = {n: kd.as_dict() for n, kd in model.output_kinds().items()}
        write_shard(tmp, ShardData(k, [utts[i].utt_id for i in s], {"embedding": [embs[i] for i in s]}, kinds, []),
                    "bench", "bench")
    t_write = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)
    per = lambda x: x / audio  # noqa: E731
    return {
        "utterances": len(utts), "audio_seconds": audio, "shards": len(shards), "model_load_s": t_load,
        "header_read_s": t_hdr, "decode_resample_s": t_dec, "prepare_vad_s": t_prep, "model_forward_s": t_model,
        "shard_write_s": t_write,
        "per_audio_second": {"header_read": per(t_hdr), "decode_resample": per(t_dec), "prepare_vad": per(t_prep),
                             "model_forward": per(t_model), "shard_write": per(t_write)},
        "per_shard_s": {"decode_resample": t_dec / len(shards), "prepare_vad": t_prep / len(shards),
                        "model_forward": t_model / len(shards), "shard_write": t_write / len(shards)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data/fillets_small"))
    p.add_argument("--shard_duration", type=float, default=30.0)
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--out", default=str(ROOT / "exp/bench_scaling"))
    p.add_argument("--skip", default="", help="comma list of runs to skip: inproc,torchrun,dask,breakdown")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    out = Path(a.out)
    py = sys.executable
    torchrun = str(Path(py).with_name("torchrun"))
    common = ["--data_dir", a.data, "--shard_duration", str(a.shard_duration), "--num_workers",
              str(a.num_workers), "--progress", "false", "--overwrite", "true"]
    par = out / "parallel_local2.yaml"
    out.mkdir(parents=True, exist_ok=True)
    par.write_text("env: local\nn_workers: 2\noptions: {}\n")
    runs = {
        "in-process x1": [py, "-m", "spk_toolkit.bin.spk_inference", "--output_dir", str(out / "inproc")] + common,
        "torchrun x2 (gloo)": [torchrun, "--standalone", "--nproc_per_node=2", "-m", "spk_toolkit.bin.spk_inference",
                               "--output_dir", str(out / "torchrun")] + common,
        "dask LocalCluster x2": [py, "-m", "spk_toolkit.bin.spk_inference", "--output_dir", str(out / "dask"),
                                 "--parallel", str(par)] + common,
    }
    keys = {"in-process x1": "inproc", "torchrun x2 (gloo)": "torchrun", "dask LocalCluster x2": "dask"}
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
           "load_average_before": os.getloadavg(), "data": a.data, "shard_duration": a.shard_duration, "runs": {}}
    for name, cmd in runs.items():
        if keys[name] in skip:
            continue
        wall, cpu = run(cmd, env={"OMP_NUM_THREADS": "1"})  # one thread per process everywhere: fair on 2 cores
        s = json.loads((out / keys[name] / "summary.json").read_text())
        res["runs"][name] = {"wall_s_incl_startup": wall, "cpu_s": cpu, "engine_wall_s": s["wall_seconds"],
                             "audio_s_after_vad": s["audio_hours"] * 3600,
                             "shards": s["shards"], "shard_wall_mean_s": s["shard_wall_seconds_mean"]}
    if "breakdown" not in skip:
        res["breakdown"] = breakdown(a.data, a.shard_duration)
    res["load_average_after"] = os.getloadavg()
    audio = res.get("breakdown", {}).get("audio_seconds")
    print(f"{'run':<24}{'wall incl. start (s)':>22}{'engine wall (s)':>17}{'x real time':>13}{'CPU s':>8}")
    for name, r in res["runs"].items():
        xrt = (audio / r["wall_s_incl_startup"]) if audio else float("nan")
        print(f"{name:<24}{r['wall_s_incl_startup']:>22.1f}{r['engine_wall_s']:>17.1f}{xrt:>13.2f}"
              f"{r['cpu_s']:>8.1f}")
    print(f"load average before/after: {res['load_average_before']} / {res['load_average_after']}")
    if "breakdown" in res:
        b = res["breakdown"]
        print(f"\nbreakdown over {b['utterances']} utterances, {b['audio_seconds']:.1f} s audio, {b['shards']} shards "
              f"(1 thread):")
        for k, v in b["per_audio_second"].items():
            print(f"  {k:<16} {1000 * v:8.2f} ms per audio second")
        print(f"  model load       {b['model_load_s']:8.2f} s per process")
    (out / "scaling.json").write_text(json.dumps(res, indent=2))
    print(f"\nwritten {out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
