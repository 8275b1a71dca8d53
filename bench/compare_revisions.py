"""Extraction throughput of two revisions of spk_toolkit, paired and alternating in one run (issue 14, criterion 7).

Question: is the engine of ``--head`` (default: this checkout's working tree, uncommitted changes included) at
least as fast as that of ``--base`` (default fe75245, the last commit before the engine rewrite) on the
``make bench`` set-up (ESPnet ECAPA-TDNN, ``--batch_bins 512000 --model_streams 2 --num_workers 0``)? Target:
median of the paired ratios throughput_new / throughput_old >= 0.97.

Method
------
* ``--base`` is checked out into a temporary ``git worktree`` (removed at the end; ``--head REV`` likewise, else
  the head arm is the repository root itself).
* Every measurement is ONE fresh child process per arm: ``PYTHONPATH=<tree>``, ``cwd=<tree>``; the child prints
  ``spk_toolkit.__file__`` and the parent checks that it lies under that tree (the venv's editable install of
  this checkout must not leak into the base arm: the child drops its meta-path finder, and the parent checks
  every ``spk_toolkit.*`` module the child loaded). Separate processes, so neither arm inherits the other's
  imports, caches, allocator state or thread pools, and each gets a clean ``OMP_WAIT_POLICY=PASSIVE`` (set
  before torch is imported, as ``spk_inference`` does).
* In the child: read the corpus (first ``--max_utts``), ``torch.manual_seed(0)`` then build the model from the
  same config file, so both arms embed with identical weights (model building is NOT timed). Then exactly ONE
  timed call, without warm-up, of ``spk_toolkit.engine.extract(utts, <fresh empty dir>, model=model,
  batch_bins=, num_workers=, model_streams=, shard_duration=, progress=False)`` -- way (b) of
  bench/extract_throughput.py: header pass, shard plan, decoding, buckets, masked batched forward, shard
  files, merge, npz writing -- as a user's first extraction in a fresh process. Only options that exist in
  both revisions' ``ExtractOptions`` are passed (the child checks this against its own ``ExtractOptions``).
* Order alternates per repetition: old, new, then new, old, ... so a linear drift of the machine's speed
  (this VM drifts by 5-20 % within minutes, docs/benchmarks.md) cancels over two repetitions, and the two runs
  of a pair are adjacent in time. The paired ratio of repetition i is t_old[i] / t_new[i] (the same audio, so
  = throughput_new / throughput_old); their median is the robust figure; the ratio of the best times is
  printed too. Use an even ``--repeats`` so each arm runs first equally often.
* Correctness guard: the parent compares the two arms' ``embeddings.npz`` of every repetition (same keys, max
  abs difference; expected ~1e-6 or 0 -- float32 rounding at most) and prints each arm's sha256 of the
  float32 embeddings in key order, so a "faster" arm that computes something else is caught.

Usage::

    .venv/bin/python bench/compare_revisions.py                      # = make bench-compare (600 utts, 6 reps)
    .venv/bin/python bench/compare_revisions.py --max_utts 60 --repeats 2        # quick check
    .venv/bin/python bench/compare_revisions.py --base fe75245 --head 7004250    # two commits
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "COMPARE_REVISIONS_RESULT "
# ExtractOptions fields passed to extract(); every one exists in fe75245's engine.py and in spk_toolkit/engine/
COMMON_OPTIONS = ("batch_bins", "num_workers", "model_streams", "shard_duration", "progress")


# ----------------------------------------------------------------------------------------------------- child
def child(spec: dict) -> None:
    """One arm, one measurement: build the model (untimed), time one extract() call, print a JSON record."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, as spk_inference does
    tree = Path(spec["tree"]).resolve()
    # The venv's editable install of this checkout is a meta-path finder that resolves spk_toolkit.<name> to
    # /work/main/spk_toolkit/<name> whenever <name> is missing from the tree on PYTHONPATH (an old tree without
    # the engine/ package would silently run the new engine). Drop it: this tree or nothing.
    sys.meta_path[:] = [f for f in sys.meta_path if not (getattr(f, "__module__", None) or "").startswith("__editable__")]
    import dataclasses

    import numpy as np
    import torch

    import spk_toolkit
    from spk_toolkit.backends import load_model
    from spk_toolkit.engine import ExtractOptions, extract
    from spk_toolkit.io.datadir import load_corpus

    fields = {f.name for f in dataclasses.fields(ExtractOptions)}
    missing = sorted(set(spec["options"]) - fields)
    if missing:
        raise SystemExit(f"ExtractOptions of {spk_toolkit.__file__} lacks {missing}")
    utts = load_corpus(spec["data_dir"])
    if spec["max_utts"]:
        utts = utts[: spec["max_utts"]]
    kw = {"device": spec["device"]}
    if spec["toolkit"] == "espnet":
        kw.update(train_config=spec["train_config"], model_file=spec["model_file"])
    t0 = time.perf_counter()
    torch.manual_seed(0)  # identical random-init weights in both arms
    model = load_model(spec["toolkit"], **kw)
    load_s = time.perf_counter() - t0

    t = time.perf_counter()
    s = extract(utts, spec["output_dir"], model=model, **spec["options"])
    wall = time.perf_counter() - t

    mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
            if n == "spk_toolkit" or n.startswith("spk_toolkit.")}
    foreign = sorted(f"{n} ({f})" for n, f in mods.items() if f and not Path(f).resolve().is_relative_to(tree))
    emb = np.load(Path(spec["output_dir"]) / "embeddings.npz")
    h = hashlib.sha256()
    for k in emb.files:  # file order = input order in both revisions
        h.update(k.encode() + b"\0")
        h.update(np.ascontiguousarray(emb[k], dtype=np.float32).tobytes())
    rec = {"spk_toolkit": spk_toolkit.__file__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "model": model.describe(), "load_s": load_s,
           "wall_s": wall, "audio_s": s["audio_hours"] * 3600.0, "utterances": len(utts),
           "embedded": s["embedded"], "errors": s["errors"], "sha256": h.hexdigest(),
           "modules": len(mods), "foreign_modules": foreign}
    print(RESULT + json.dumps(rec), flush=True)


# ---------------------------------------------------------------------------------------------------- parent
def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def max_abs_diff(a_path: Path, b_path: Path) -> float:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    if set(a.files) != set(b.files):
        only_a, only_b = sorted(set(a.files) - set(b.files)), sorted(set(b.files) - set(a.files))
        raise SystemExit(f"the arms embedded different utterances: only old {only_a[:5]}, only new {only_b[:5]}")
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a.files),
               default=0.0)


def run_arm(name: str, tree: Path, spec: dict, verbose: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"arm {name} ({tree}) failed with exit status {p.returncode}")
    if verbose and p.stderr.strip():
        sys.stderr.write(f"[{name} stderr]\n{p.stderr}")
    rec = json.loads(lines[-1][len(RESULT):])
    if not Path(rec["spk_toolkit"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"arm {name} imported {rec['spk_toolkit']}, not from its tree {tree}")
    if rec["foreign_modules"]:
        raise SystemExit(f"arm {name} imported modules from outside its tree {tree}: {rec['foreign_modules'][:5]}")
    if rec["embedded"] != rec["utterances"]:
        raise SystemExit(f"arm {name} embedded {rec['embedded']} of {rec['utterances']} ({rec['errors']} errors)")
    rec["process_s"] = process_s
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="fe75245", help="old revision (checked out into a temporary git worktree)")
    ap.add_argument("--head", default=None,
                    help="new revision; default: this checkout's working tree (uncommitted changes count)")
    ap.add_argument("--repeats", type=int, default=6, help="pairs (old, new alternate who goes first); use an even number")
    ap.add_argument("--max_utts", type=int, default=0, help="use the first N utterances (0 = all)")
    ap.add_argument("--data_dir", default="data/fillets_demo", help="relative paths are relative to the repository root")
    ap.add_argument("--toolkit", default="espnet")
    ap.add_argument("--train_config", default="conf/model_ecapa.yaml", help="one file for both arms")
    ap.add_argument("--model_file", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_bins", type=int, default=512000)
    ap.add_argument("--model_streams", type=int, default=2)
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--shard_duration", type=float, default=600.0, help="the default of both revisions")
    ap.add_argument("--verbose", action="store_true", help="show the children's stderr (warnings, logs)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child is not None:
        return child(json.loads(a._child))

    def absolute(p):
        return None if p is None else str(p if Path(p).is_absolute() else (ROOT / p).resolve())

    base_sha = git("rev-parse", "--verify", f"{a.base}^{{commit}}")
    head_sha = git("rev-parse", "--verify", f"{a.head}^{{commit}}") if a.head else None
    if a.head:
        head_label = f"{a.head} = {head_sha[:12]}"
    else:
        dirty = [ln for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
        head_label = (f"working tree {ROOT} (HEAD {git('rev-parse', 'HEAD')[:12]}"
                      + (f" + {len(dirty)} modified tracked file(s))" if dirty else ", clean)"))
    if a.repeats % 2:
        print(f"warning: --repeats {a.repeats} is odd; old runs first one time more than new", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="spk_compare_revisions_"))
    worktrees = []
    try:
        def worktree(sha, name):
            path = tmp / name
            git("worktree", "add", "--detach", str(path), sha)
            worktrees.append(path)
            return path

        trees = {"old": worktree(base_sha, "base"), "new": worktree(head_sha, "head") if head_sha else ROOT}
        options = {"batch_bins": a.batch_bins, "num_workers": a.num_workers, "model_streams": a.model_streams,
                   "shard_duration": a.shard_duration, "progress": False}
        assert set(options) == set(COMMON_OPTIONS)
        spec0 = {"data_dir": absolute(a.data_dir), "max_utts": a.max_utts, "toolkit": a.toolkit,
                 "train_config": absolute(a.train_config), "model_file": absolute(a.model_file), "device": a.device,
                 "options": options}

        print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC; host: {platform.node()}; "
              f"CPU: {cpu_model()}, {os.cpu_count()} logical CPU(s); load average: "
              + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(f"old (--base): {a.base} = {base_sha[:12]}  {git('log', '-1', '--format=%s', base_sha)[:80]}")
        print(f"new (--head): {head_label}")
        print(f"data: {spec0['data_dir']} (max_utts={a.max_utts or 'all'}); toolkit {a.toolkit}, config "
              f"{spec0['train_config']}; extract options {options}; repeats {a.repeats} (alternating)")

        t_start = time.perf_counter()
        times = {"old": [], "new": []}
        diffs, sums, first = [], {"old": set(), "new": set()}, None
        for rep in range(a.repeats):
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            recs = {}
            for arm in order:
                out = tmp / f"out_{rep}_{arm}"
                recs[arm] = run_arm(arm, trees[arm], {**spec0, "tree": str(trees[arm]), "output_dir": str(out)},
                                   a.verbose)
                times[arm].append(recs[arm]["wall_s"])
                sums[arm].add(recs[arm]["sha256"])
            if first is None:
                first = recs
                for arm in ("old", "new"):
                    r = recs[arm]
                    print(f"{arm}: spk_toolkit from {r['spk_toolkit']} ({r['modules']} spk_toolkit modules, all "
                          f"from that tree); torch {r['torch']}, {r['torch_threads']} "
                          f"thread(s), OMP_WAIT_POLICY={r['omp_wait_policy']}; model: {r['model']}")
                print(f"utterances: {recs['old']['utterances']}, audio: {recs['old']['audio_s'] / 60:.2f} min "
                      f"(new arm: {recs['new']['audio_s'] / 60:.2f} min)")
            d = max_abs_diff(tmp / f"out_{rep}_old" / "embeddings.npz", tmp / f"out_{rep}_new" / "embeddings.npz")
            diffs.append(d)
            for arm in ("old", "new"):
                shutil.rmtree(tmp / f"out_{rep}_{arm}", ignore_errors=True)
            to, tn = recs["old"]["wall_s"], recs["new"]["wall_s"]
            print(f"rep {rep + 1}/{a.repeats} ({order[0]} first): old {to:7.2f} s, new {tn:7.2f} s, "
                  f"new/old throughput {to / tn:.3f}; max |emb_old - emb_new| {d:.2e}; process wall incl. start-up "
                  f"and model build: old {recs['old']['process_s']:.1f} s, new {recs['new']['process_s']:.1f} s",
                  flush=True)

        audio = first["old"]["audio_s"]
        ratios = [o / n for o, n in zip(times["old"], times["new"])]
        med = statistics.median(ratios)
        best = min(times["old"]) / min(times["new"])
        print("runs (old): " + ", ".join(f"{x:.2f}" for x in times["old"]) + " s")
        print("runs (new): " + ", ".join(f"{x:.2f}" for x in times["new"]) + " s")
        print(f"best: old {min(times['old']):.2f} s ({audio / min(times['old']):.1f}x real time), new "
              f"{min(times['new']):.2f} s ({audio / min(times['new']):.1f}x real time)")
        print("paired new/old throughput per repetition: " + ", ".join(f"{x:.3f}" for x in ratios))
        print(f"median paired ratio new/old = {med:.3f} (target >= 0.97: {'met' if med >= 0.97 else 'NOT met'}); "
              f"best-time ratio = {best:.3f}")
        print(f"max |emb_old - emb_new| over all repetitions: {max(diffs):.2e}; distinct embedding sha256 per arm "
              f"over repetitions: old {len(sums['old'])}, new {len(sums['new'])}"
              + ("; identical across arms" if sums["old"] == sums["new"] and len(sums["old"]) == 1 else ""))
        print(f"total wall time: {time.perf_counter() - t_start:.0f} s")
    finally:
        for path in worktrees:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
