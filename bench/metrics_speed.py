"""EER + minDCF (two p_target) on 10 M trials: spk_toolkit.metrics vs espnet2.utils.eer, side by side.

Our run (best of 3) happens in a fresh subprocess so that its peak RSS (``resource.getrusage``) covers only the data and the
metric computation. ESPnet's pure-Python ``ComputeErrorRates``/``ComputeMinDcf`` is timed at ``--espnet_trials``
(default 1 M, best of 2 runs) and extrapolated linearly to ``--trials`` (its sort is O(N log N), so linear extrapolation
*under*-estimates ESPnet's time and the ratio is conservative). The printout says which figures are extrapolated.

Usage: python bench/metrics_speed.py [--trials 10000000] [--espnet_trials 1000000] [--target_fraction 0.1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

P_TARGETS = (0.01, 0.05)
REPEATS = 3  # ours: best of 3 (the machine is shared; the minimum is the least disturbed run)
ESPNET_REPEATS = 2  # ESPnet: best of 2


def make_data(n: int, target_fraction: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < target_fraction
    scores = rng.standard_normal(n, dtype=np.float32) * 0.1
    scores[labels] += 0.35  # cosine-like scores, EER ~ 4 %
    return scores, labels.astype(np.int8)


def child(n: int, target_fraction: float) -> None:
    import resource

    from spk_toolkit import metrics as M

    scores, labels = make_data(n, target_fraction)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_eer, t_dcf, t_cm = [], [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        e = M.eer(scores, labels)
        t1 = time.perf_counter()
        d = M.min_dcf(scores, labels, list(P_TARGETS))
        t2 = time.perf_counter()
        m = M.compute_metrics(scores, labels, P_TARGETS)
        t3 = time.perf_counter()
        t_eer.append(t1 - t0)
        t_dcf.append(t2 - t1)
        t_cm.append(t3 - t2)
    assert m["eer"] == e and all(m["min_dcf"][p] == v for p, v in zip(P_TARGETS, d))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"eer": e, "min_dcf": list(map(float, d)), "t_eer": min(t_eer), "t_min_dcf": min(t_dcf),
                      "t_compute_metrics": min(t_cm), "rss_after_data_mb": rss_data, "peak_rss_mb": peak}))


def time_espnet(n: int, target_fraction: float):
    from espnet2.utils.eer import ComputeErrorRates, ComputeMinDcf, tuneThresholdfromScore

    from spk_toolkit import metrics as M

    scores, labels = make_data(n, target_fraction)
    s, l = scores.astype(np.float64), labels.astype(int)
    t_eer, t_dcf = [], []
    for _ in range(ESPNET_REPEATS):
        t0 = time.perf_counter()
        eer_pct = tuneThresholdfromScore(s, l, [1, 0.1])[1]
        t1 = time.perf_counter()
        fnrs, fprs, thr = ComputeErrorRates(s.tolist(), l.tolist())
        dcfs = [ComputeMinDcf(fnrs, fprs, thr, p, 1, 1)[0] for p in P_TARGETS]
        t2 = time.perf_counter()
        t_eer.append(t1 - t0)
        t_dcf.append(t2 - t1)
    # agreement check at this size (ESPnet EER is in %; its minDCF evaluates one point per trial, so with tied
    # float32 scores it can be a hair lower than the tie-grouped definition)
    ours_espnet = 100 * M.eer(s, l, method="espnet")
    ours_dcf = M.min_dcf(s, l, list(P_TARGETS))
    return {"t_eer": min(t_eer), "t_min_dcf": min(t_dcf), "eer_pct": eer_pct, "min_dcf": dcfs,
            "ours_eer_espnet_pct": ours_espnet, "ours_min_dcf": list(map(float, ours_dcf)),
            "ours_eer_interp_pct": 100 * M.eer(s, l)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10_000_000)
    ap.add_argument("--espnet_trials", type=int, default=1_000_000)
    ap.add_argument("--target_fraction", type=float, default=0.1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.trials, a.target_fraction)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; timings are the best of {REPEATS} (ours) and "
          f"{ESPNET_REPEATS} (ESPnet) runs")
    print(f"data: {a.trials:,} trials, {a.target_fraction:.0%} targets, float32 cosine-like scores")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, __file__, "--child", "--trials", str(a.trials),
                        "--target_fraction", str(a.target_fraction)], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    esp = time_espnet(a.espnet_trials, a.target_fraction)
    k = a.trials / a.espnet_trials
    esp_total = esp["t_eer"] + esp["t_min_dcf"]
    esp_10m = esp_total * k
    ours_total = ours["t_eer"] + ours["t_min_dcf"]
    print()
    print(f"{'':38s}{'spk_toolkit':>14s}{'espnet2.utils.eer':>20s}")
    print(f"{'EER at ' + format(a.espnet_trials, ',') + ' trials (s)':38s}{'':>14s}{esp['t_eer']:20.2f}")
    print(f"{'minDCF x2 at ' + format(a.espnet_trials, ',') + ' trials (s)':38s}{'':>14s}{esp['t_min_dcf']:20.2f}")
    print(f"{'EER at ' + format(a.trials, ',') + ' (s)':38s}{ours['t_eer']:14.2f}"
          f"{esp['t_eer'] * k:19.2f}{'*' if k != 1 else ' '}")
    print(f"{'minDCF x2 at ' + format(a.trials, ',') + ' (s)':38s}{ours['t_min_dcf']:14.2f}"
          f"{esp['t_min_dcf'] * k:19.2f}{'*' if k != 1 else ' '}")
    print(f"{'EER + minDCF x2 at ' + format(a.trials, ',') + ' (s)':38s}{ours_total:14.2f}{esp_10m:19.2f}"
          f"{'*' if k != 1 else ' '}")
    print(f"{'  same, one sort (compute_metrics) (s)':38s}{ours['t_compute_metrics']:14.2f}")
    print(f"{'peak RSS, fresh process (MB)':38s}{ours['peak_rss_mb']:14.0f}")
    print(f"{'  of which data (10M float32+int8) (MB)':38s}{ours['rss_after_data_mb']:14.0f}")
    if k != 1:
        print(f"* ESPnet timed at {a.espnet_trials:,} trials and extrapolated linearly x{k:g} "
              "(conservative: its sort is O(N log N))")
    print(f"speed-up (EER + 2 minDCF, separate calls): {esp_10m / ours_total:.1f}x; "
          f"with compute_metrics: {esp_10m / ours['t_compute_metrics']:.1f}x")
    print(f"results at {a.trials:,}: EER {100 * ours['eer']:.4f} %, minDCF(0.01) {ours['min_dcf'][0]:.4f}, "
          f"minDCF(0.05) {ours['min_dcf'][1]:.4f}")
    print(f"agreement at {a.espnet_trials:,}: ESPnet EER {esp['eer_pct']:.6f} % vs ours method='espnet' "
          f"{esp['ours_eer_espnet_pct']:.6f} % (default interp {esp['ours_eer_interp_pct']:.6f} %); "
          f"ESPnet minDCF {[round(x, 6) for x in esp['min_dcf']]} vs ours {[round(x, 6) for x in esp['ours_min_dcf']]}")


if __name__ == "__main__":
    main()
