#!/usr/bin/env python3
"""Wall time of ``--help`` for every command (issue 18, criterion 3: under 3 s), and how many lines it prints.

Each command runs ``--repeats`` times in a fresh interpreter (``python -m spk_toolkit.bin.<module> --help``, or a
console script of a given environment with ``--bin_dir``); the median and the worst run are printed.

Example::

    .venv/bin/python bench/cli_help.py --repeats 5
    .venv/bin/python bench/cli_help.py --bin_dir /tmp/venv/bin      # the console scripts of an installed wheel
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["spk_inference", "spk_score", "spk_train", "spk_embed_extract", "extract_spk_embed", "cache_features"]


def main(argv=None) -> int:
    """Print one row per command: median and max seconds of ``--help``, lines printed, exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    p.add_argument("--bin_dir", default=None, help="run the console scripts (spk-inference, ...) found here")
    p.add_argument("--limit", type=float, default=3.0, help="seconds a --help may take (default: 3.0)")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    rows, slow = [], []
    for mod in MODULES:
        if args.bin_dir:
            exe = Path(args.bin_dir) / mod.replace("_", "-")
            if not exe.exists():
                continue
            cmd = [str(exe), "--help"]
        else:
            if not (root / "spk_toolkit" / "bin" / f"{mod}.py").exists():
                continue
            cmd = [sys.executable, "-m", f"spk_toolkit.bin.{mod}", "--help"]
        times, lines, rc = [], 0, 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**os.environ})
            times.append(time.perf_counter() - t0)
            lines, rc = len(r.stdout.splitlines()), r.returncode
        med, worst = statistics.median(times), max(times)
        rows.append((mod, med, worst, lines, rc))
        if worst > args.limit or rc != 0:
            slow.append(mod)
    print(f"{'command':<20} {'median s':>9} {'max s':>7} {'lines':>6} {'rc':>3}")
    for mod, med, worst, lines, rc in rows:
        print(f"{mod:<20} {med:9.2f} {worst:7.2f} {lines:6d} {rc:3d}")
    if slow:
        print(f"over {args.limit:g} s or failed: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
