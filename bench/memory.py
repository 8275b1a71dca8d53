"""Peak memory (RSS) of an extraction vs the length of one recording, and of spk_score vs the number of trials.

Issue 17, criterion 3 (a benchmark, not a timed test). Each measurement runs in a fresh child process (the CLI,
as a user runs it) while this process samples the resident memory of the child and all its descendants (psutil,
every 20 ms): ``tree RSS peak`` is the largest sum of RSS over the tree (the main process plus its DataLoader
decoding worker; pages the forked worker shares with its parent count twice), ``tree PSS peak`` the same with
proportional set sizes (shared pages counted once: what the run costs the machine), ``largest process`` the
largest single RSS. Bounds: a 60-minute
recording < 1 GB with the default model (resemblyzer); ``spk_score`` on 10 M trials < 2.5 GB.

* extraction: one recording made of real speech (fillets voice packs, ``data/fillets``, concatenated and repeated to
  the length), 16 kHz 16-bit WAV; ``spk_inference`` with default options (``--num_workers 1``), and once more
  with ``--num_workers 0`` (everything in one process);
* scoring: 10,000 random 256-d embeddings (npz) and a VoxCeleb-format trial list of 1 M / 10 M random trials
  (keys like ``id00042/utt000123.wav``, half targets); ``spk_score`` with default options (DET plot and
  histogram included).

Usage: python bench/memory.py [--minutes 1 60] [--trials 1000000 10000000] [--workdir /tmp/spk_memory]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def measure(cmd, env=None) -> dict:
    """Run ``cmd``; sample the RSS of its process tree every 20 ms. Wall time, tree peak, largest process (MiB)."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc = psutil.Process(p.pid)
    peak = largest = pss_peak = 0
    while p.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            sizes = [q.memory_info().rss for q in procs]
            # PSS counts pages shared by the forked decoding worker and its parent once, not twice
            pss = sum(q.memory_full_info().pss for q in procs)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            sizes, pss = [0], 0
        peak, largest, pss_peak = max(peak, sum(sizes)), max(largest, max(sizes)), max(pss_peak, pss)
        time.sleep(0.02)
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "tree_peak_mib": peak / 2**20, "tree_pss_peak_mib": pss_peak / 2**20,
            "largest_process_mib": largest / 2**20}


def make_recording(path: Path, minutes: float) -> Path:
    """``minutes`` of real speech at 16 kHz (fillets utterances of one speaker, concatenated, repeated)."""
    import soundfile as sf

    from spk_toolkit.io.audio import read_audio
    from spk_toolkit.io.datadir import load_corpus

    if path.exists() and abs(sf.info(str(path)).duration - 60 * minutes) < 1:
        return path
    utts = [u for u in load_corpus(ROOT / "data" / "fillets") if u.spk_id == "cs_m"]
    need = int(60 * minutes * 16000)
    with sf.SoundFile(str(path), "w", samplerate=16000, channels=1, subtype="PCM_16") as f:
        done = 0
        while done < need:
            for u in utts:
                x, _ = read_audio(u.path, 16000)
                x = x[: need - done]
                f.write(x)
                done += len(x)
                if done >= need:
                    break
    return path


def bench_extraction(minutes, workdir: Path) -> list:
    rows = []
    for m in minutes:
        rec = make_recording(workdir / f"rec_{m:g}min.wav", m)
        data = workdir / f"data_{m:g}min"
        data.mkdir(exist_ok=True)
        (data / "wav.scp").write_text(f"rec {rec}\n")
        for workers in ("1", "0"):
            out = workdir / f"out_{m:g}min_w{workers}"
            cmd = [sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data), "--output_dir",
                   str(out), "--overwrite", "true", "--progress", "false", "--num_workers", workers]
            r = measure(cmd)
            s = json.loads((out / "summary.json").read_text())
            assert s["embedded"] == 1, s
            r.update(what=f"extract {m:g} min, --num_workers {workers}", audio_s=s["audio_hours"] * 3600)
            rows.append(r)
            _print(r)
    return rows


def make_trials(workdir: Path, n_trials: int, n_keys: int = 10000, dim: int = 256) -> tuple:
    rng = np.random.default_rng(0)
    emb = workdir / f"emb_{n_keys}.npz"
    keys = [f"id{i // 100:05d}/utt{i:06d}" for i in range(n_keys)]
    if not emb.exists():
        x = rng.standard_normal((n_keys, dim)).astype(np.float32)
        np.savez(emb, **dict(zip(keys, x)))
    trials = workdir / f"trials_{n_trials}.txt"
    if not trials.exists():
        with open(trials, "w") as f:
            for s in range(0, n_trials, 1_000_000):
                n = min(1_000_000, n_trials - s)
                e = rng.integers(0, n_keys, n)
                t = np.where(rng.random(n) < 0.5, (e // 100) * 100 + rng.integers(0, 100, n), rng.integers(0, n_keys, n))
                lab = (e // 100 == t // 100).astype(int)
                f.write("".join(f"{l} {keys[a]}.wav {keys[b]}.wav\n" for l, a, b in zip(lab, e, t)))
    return emb, trials


def bench_scoring(n_trials_list, workdir: Path) -> list:
    rows = []
    for n in n_trials_list:
        emb, trials = make_trials(workdir, n)
        out = workdir / f"scores_{n}"
        cmd = [sys.executable, "-m", "spk_toolkit.bin.spk_score", "--embeddings", str(emb), "--trials", str(trials),
               "--output_dir", str(out)]
        r = measure(cmd)
        m = json.loads((out / "metrics.json").read_text())
        (entry,) = m["trials"].values()
        assert entry["n_trials"] == n, entry["n_trials"]
        r.update(what=f"spk_score {n / 1e6:g} M trials", eer_pct=entry.get("eer_pct"))
        rows.append(r)
        _print(r)
    return rows


def _print(r: dict) -> None:
    print(f"{r['what']:<38} wall {r['wall_s']:7.1f} s  tree RSS peak {r['tree_peak_mib']:6.0f} MiB  "
          f"tree PSS peak {r['tree_pss_peak_mib']:6.0f} MiB  largest process {r['largest_process_mib']:6.0f} MiB",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, nargs="*", default=[1, 60])
    ap.add_argument("--trials", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--workdir", default="/tmp/spk_memory")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()} {os.cpu_count()} cores  "
          f"Python {platform.python_version()}", flush=True)
    rows = bench_extraction(a.minutes, work) + bench_scoring(a.trials, work)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
