"""Cosine + AS-norm (top 300) on a VoxCeleb1-E-sized problem: spk_toolkit.scoring vs a per-trial loop.

Problem (defaults): 145,000 utterances x 192-d embeddings (float32, as written by the extractors), 580,000
trials, 6,000 cohort embeddings. Two per-trial loops are timed on ``--loop_sample`` trials and
extrapolated linearly to all trials (the printout says so): the loop as SpeechBrain's
``speaker_verification_cosine.py`` runs it (torch; each side repeated over the raw cohort, CosineSimilarity,
topk, per trial), and a kinder numpy loop (cohort normalised once; per trial a matrix-vector product and a sort). Both give the
same scores on the sample (checked, max |diff| printed). spk_toolkit is timed with its default float64
matrices and again with ``dtype=float32`` (half the matrix-product time, scores within ~1e-6).

Usage: python bench/scoring_speed.py [--utts 145000] [--trials 580000] [--cohort 6000] [--dim 192] [--top_n 300]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np


def make_problem(n_utt, n_trials, n_cohort, dim, seed=0):
    rng = np.random.default_rng(seed)
    n_spk = max(1, n_utt // 116)  # VoxCeleb1: ~116 utterances per speaker
    centres = rng.standard_normal((n_spk, dim), dtype=np.float32)
    spk = rng.integers(0, n_spk, n_utt)
    mat = centres[spk] + 1.5 * rng.standard_normal((n_utt, dim), dtype=np.float32)
    keys = [f"id{s:05d}/utt{i:06d}" for i, s in enumerate(spk)]
    emb = dict(zip(keys, mat))
    e = rng.integers(0, n_utt, n_trials)
    # half target trials: pick a test utterance of the same speaker where possible
    t = rng.integers(0, n_utt, n_trials)
    order = np.argsort(spk, kind="stable")
    first = np.searchsorted(spk[order], spk[e])
    count = np.bincount(spk, minlength=n_spk)[spk[e]]
    same = order[first + rng.integers(0, np.maximum(count, 1))]
    tgt = rng.random(n_trials) < 0.5
    t[tgt] = same[tgt]
    k = np.array(keys)
    labels = (spk[e] == spk[t]).astype(np.int8)
    cohort = rng.standard_normal((n_cohort, dim), dtype=np.float32)
    return emb, k[e], k[t], labels, cohort


def loop_asnorm(emb, enroll, test, cohort, top_n):
    """The per-trial loop: nothing cached between trials."""
    out = np.empty(len(enroll))
    c = cohort.astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    for i, (a, b) in enumerate(zip(enroll, test)):
        x = emb[a].astype(np.float64)
        y = emb[b].astype(np.float64)
        x /= np.linalg.norm(x)
        y /= np.linalg.norm(y)
        s = float(x @ y)
        cx = np.sort(c @ x)[::-1][:top_n]
        cy = np.sort(c @ y)[::-1][:top_n]
        out[i] = 0.5 * ((s - cx.mean()) / cx.std() + (s - cy.mean()) / cy.std())
    return out


def loop_asnorm_torch(emb, enroll, test, cohort, top_n):
    """The per-trial loop the way SpeechBrain's ``speaker_verification_cosine.py`` scores AS-norm (our own code):
    per trial, each side is repeated over the raw cohort, ``torch.nn.CosineSimilarity`` against it (cohort norms
    recomputed every time), ``torch.topk``, mean and std. Population std (``correction=0``) so that the scores
    equal ours; the cost is the same as SpeechBrain's unbiased ``torch.std``."""
    import torch

    sim = torch.nn.CosineSimilarity(dim=-1, eps=1e-6)
    c = torch.from_numpy(np.ascontiguousarray(cohort, dtype=np.float32))
    out = np.empty(len(enroll))
    with torch.inference_mode():
        for i, (a, b) in enumerate(zip(enroll, test)):
            e, t = torch.from_numpy(emb[a]), torch.from_numpy(emb[b])
            se = torch.topk(sim(e.repeat(c.shape[0], 1), c), top_n)[0]
            st = torch.topk(sim(t.repeat(c.shape[0], 1), c), top_n)[0]
            sc = sim(e[None], t[None])[0]
            out[i] = float(0.5 * ((sc - se.mean()) / se.std(correction=0) + (sc - st.mean()) / st.std(correction=0)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utts", type=int, default=145_000)
    ap.add_argument("--trials", type=int, default=580_000)
    ap.add_argument("--cohort", type=int, default=6_000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--top_n", type=int, default=300)
    ap.add_argument("--loop_sample", type=int, default=2_000)
    a = ap.parse_args()

    from spk_toolkit.io.trials import Trials
    from spk_toolkit.metrics import compute_metrics
    from spk_toolkit.scoring import EmbeddingTable, score_trials

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    emb, enroll, test, labels, cohort = make_problem(a.utts, a.trials, a.cohort, a.dim)
    trials = Trials(enroll, test, labels)
    n_used = np.unique(np.concatenate([enroll, test])).size
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"problem: {a.utts:,} utterances x {a.dim}-d, {a.trials:,} trials over {n_used:,} unique utterances, "
          f"cohort {a.cohort:,}, AS-norm top {a.top_n}")

    T = time.perf_counter
    t0 = T()
    table = EmbeddingTable(emb)
    t1 = T()
    cos = score_trials(table, trials)
    t2 = T()
    asn = score_trials(table, trials, cohort=cohort, top_n=a.top_n)
    t3 = T()
    t_ours = t3 - t2 + (t1 - t0)  # AS-norm includes the cosine and the cohort statistics
    t6 = T()
    asn32 = score_trials(EmbeddingTable(emb, dtype=np.float32), trials, cohort=cohort, top_n=a.top_n,
                         dtype=np.float32)
    t_ours32 = T() - t6
    diff32 = np.max(np.abs(asn32 - asn))

    sample = np.random.default_rng(1).choice(a.trials, size=min(a.loop_sample, a.trials), replace=False)
    t4 = T()
    ref = loop_asnorm(emb, enroll[sample], test[sample], cohort, a.top_n)
    t5 = T()
    per_trial = (t5 - t4) / sample.size
    t_loop = per_trial * a.trials
    diff = np.max(np.abs(ref - asn[sample]))
    t7 = T()
    ref_sb = loop_asnorm_torch(emb, enroll[sample], test[sample], cohort, a.top_n)
    per_trial_sb = (T() - t7) / sample.size
    t_loop_sb = per_trial_sb * a.trials
    diff_sb = np.max(np.abs(ref_sb - asn[sample]))
    m_cos = compute_metrics(cos, labels)
    m_asn = compute_metrics(asn, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print()
    print(f"{'':44s}{'spk_toolkit':>14s}{'SpeechBrain-style loop':>24s}{'numpy loop':>14s}")
    print(f"{'build embedding matrix (s)':44s}{t1 - t0:14.2f}")
    print(f"{'cosine, ' + format(a.trials, ',') + ' trials (s)':44s}{t2 - t1:14.2f}")
    print(f"{'cosine + AS-norm, ' + format(a.trials, ',') + ' trials (s)':44s}{t_ours:14.2f}{t_loop_sb:23.1f}*"
          f"{t_loop:13.1f}*")
    print(f"{'  same with dtype=float32 matrices (s)':44s}{t_ours32:14.2f}")
    print(f"* loops timed on {sample.size:,} random trials and extrapolated linearly to {a.trials:,}: "
          f"SpeechBrain-style (torch: repeat + CosineSimilarity on the raw cohort + topk per trial, as "
          f"speaker_verification_cosine.py) {1e3 * per_trial_sb:.2f} ms/trial; numpy loop (cohort normalised once, "
          f"gemv + sort per trial) {1e3 * per_trial:.2f} ms/trial")
    print(f"speed-up vs the SpeechBrain-style loop: {t_loop_sb / t_ours:.0f}x (float64), {t_loop_sb / t_ours32:.0f}x "
          f"(float32); vs the numpy loop: {t_loop / t_ours:.0f}x (float64), {t_loop / t_ours32:.0f}x (float32)")
    print(f"max |AS-norm diff| on the sample: numpy loop {diff:.2e}, SpeechBrain-style loop (float32) {diff_sb:.2e}; "
          f"float32 vs float64: {diff32:.2e}")
    print(f"peak RSS (whole benchmark process): {peak:.0f} MB")
    print(f"synthetic-data metrics: cosine EER {100 * m_cos['eer']:.3f} % minDCF(0.01) {m_cos['min_dcf'][0.01]:.4f}; "
          f"AS-norm EER {100 * m_asn['eer']:.3f} % minDCF(0.01) {m_asn['min_dcf'][0.01]:.4f}")


if __name__ == "__main__":
    main()
