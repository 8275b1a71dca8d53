#!/usr/bin/env python3
"""Validation speed and memory: spk_toolkit's SpkTrainer.validate_one_epoch vs ESPnet's, same model and crops.

Both run in fresh child processes (peak RSS = ``ru_maxrss`` of the child) on the CPU, one process, on the same
ESPnet validation iterator (SpkPreprocessor crops: ``--num_eval`` crops of ``--target_duration`` s per utterance,
``num_workers=0``) and the same random-init model (``--config``, seed 0). Forward calls and crop rows are counted
with a hook on the model's projector.

    .venv/bin/python bench/validate_speed.py                       # fillets_demo, 160 utterances, 3000 trials

Prints a side-by-side table and one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return float("nan")


def child(a) -> None:
    import torch
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter

    from spk_toolkit.backends.espnet import build_random_model
    from spk_toolkit.tasks.spk import SpeakerTask
    from spk_toolkit.train.spk_trainer import build_valid_iterator

    torch.set_num_threads(a.threads)
    backend = build_random_model(a.config, seed=0)
    model = backend.model
    args = argparse.Namespace(**vars(backend.train_args))
    d = Path(a.dump) / "valid"
    args.valid_data_path_and_name_and_type = [(str(d / "trial.scp"), "speech", "sound"),
                                              (str(d / "trial2.scp"), "speech2", "sound"),
                                              (str(d / "trial_label"), "spk_labels", "text")]
    args.valid_shape_file = [str(d / "speech_shape")]
    args.valid_batch_size = a.batch
    args.num_workers = 0
    args.preprocessor_conf = {"target_duration": a.target_duration, "sample_rate": 16000, "num_eval": a.num_eval,
                              "noise_apply_prob": 0.0, "rir_apply_prob": 0.0}
    args.ngpu = 0
    options = SpeakerTask.trainer.build_options(args)
    iterator = build_valid_iterator(args)
    calls, rows = [0], [0]

    def hook(m, i, o):
        calls[0] += 1
        rows[0] += o.shape[0]

    model.projector.register_forward_hook(hook)
    if a.child == "ours":
        from spk_toolkit.train.spk_trainer import SpkTrainer
    else:
        from espnet2.train.spk_trainer import SpkTrainer
    rep = Reporter()
    rep.set_epoch(1)
    before = rss_mib()
    t0 = time.perf_counter()
    with rep.observe("valid") as sub:
        SpkTrainer.validate_one_epoch(model, iterator, sub, options, DistributedOption(distributed=False))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": a.child, "wall_s": wall, "peak_rss_mib": peak, "rss_before_mib": before,
                      "forward_calls": calls[0], "crop_rows": rows[0], "eer_pct": rep.get_value("valid", "eer"),
                      "n_trials": int(rep.get_value("valid", "n_trials"))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "fillets_demo"))
    p.add_argument("--work", default=str(ROOT / "exp" / "bench_validate"))
    p.add_argument("--config", default=str(ROOT / "conf" / "train_xvector.yaml"))
    p.add_argument("--valid_per_spk", type=int, default=40)
    p.add_argument("--max_trials", type=int, default=3000)
    p.add_argument("--num_eval", type=int, default=5)
    p.add_argument("--target_duration", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=16, help="trials per validation batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", choices=["ours", "espnet"])
    p.add_argument("--dump")
    a = p.parse_args()
    if a.child:
        return child(a)

    from spk_toolkit.recipes.espnet_spk import prepare

    dump = Path(a.work) / "dump"
    s = prepare(a.data, dump, valid_per_spk=a.valid_per_spk, max_train_per_spk=1, max_trials=a.max_trials)
    print(f"{s['n_valid']} validation utterances, {s['n_trials']} trials, {a.num_eval} crops x "
          f"{a.target_duration} s, batch {a.batch} trials, model {Path(a.config).name}, {a.threads} threads")
    res = {"ours": [], "espnet": []}
    for r in range(a.repeats):
        for impl in (("espnet", "ours") if r % 2 == 0 else ("ours", "espnet")):
            cmd = [sys.executable, __file__, "--child", impl, "--dump", str(dump), "--config", a.config,
                   "--num_eval", str(a.num_eval), "--target_duration", str(a.target_duration),
                   "--batch", str(a.batch), "--threads", str(a.threads)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            line = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(line))
            res[impl].append(line)
    best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in res.items()}
    e, o = best["espnet"], best["ours"]
    print()
    print(f"{'':22s}{'ESPnet':>12s}{'spk_toolkit':>14s}")
    print(f"{'wall (s, best)':22s}{e['wall_s']:12.2f}{o['wall_s']:14.2f}   ratio {e['wall_s'] / o['wall_s']:.2f}x")
    print(f"{'peak RSS (MiB)':22s}{e['peak_rss_mib']:12.0f}{o['peak_rss_mib']:14.0f}")
    print(f"{'RSS before (MiB)':22s}{e['rss_before_mib']:12.0f}{o['rss_before_mib']:14.0f}")
    print(f"{'forward calls':22s}{e['forward_calls']:12d}{o['forward_calls']:14d}")
    print(f"{'crop rows embedded':22s}{e['crop_rows']:12d}{o['crop_rows']:14d}")
    print(f"{'EER (%)':22s}{e['eer_pct']:12.2f}{o['eer_pct']:14.2f}   (ESPnet: -mean cdist, no interpolation)")


if __name__ == "__main__":
    main()
