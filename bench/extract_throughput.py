"""Extraction throughput on real speech, three ways side by side in one run (issue 2, criterion 6).

(a) per-utterance loop: decode + prepare + embed one utterance at a time with the same model (how ESPnet's
    sequential extractor, WeSpeaker's batch-1 test extraction and 3D-Speaker's extract.py work);
(b) the batched pipeline: ``spk_toolkit.engine.extract`` end to end (decoding in workers, or in the model streams
    with ``--num_workers 0 --model_streams 2``; length buckets, masking, shard files, merge, npz writing);
(c) the model's forward alone on pre-loaded, pre-batched tensors (same buckets as (b)): the ceiling.

Throughput = seconds of audio per wall-clock second. Prints (b)/(a), (b)/(c) and the padding waste, from each
way's best time and paired per repetition (a, b, c run back to back, in alternating order, so the VM's speed
drift cancels in the ratio of one repetition; the median of the paired ratios is the robust figure).

    python bench/extract_throughput.py --toolkit espnet --train_config conf/model_ecapa.yaml \
        --batch_bins 512000 --repeats 6 --model_streams 2 --num_workers 0   # 2-core CPU (docs/benchmarks.md)
    python bench/extract_throughput.py ... --device cuda --num_workers 14 --corpus_repeats 4   # GPU
    python bench/extract_throughput.py --toolkit resemblyzer
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as spk_inference sets it (before torch is imported)

import argparse  # noqa: E402
import concurrent.futures
import dataclasses
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spk_toolkit.backends import load_model
from spk_toolkit.data import bucket_batches, collate, padding_waste
from spk_toolkit.engine import extract, stream_threads
from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import load_corpus


def forward_streams(model, tensors, streams, sync):
    """(c) with ``streams`` concurrent forwards of ``threads // streams`` intra-op threads each; seconds."""
    with stream_threads(0, streams):
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda bt: model.embed(bt.wav, bt.lengths), tensors))
        sync()
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default="data/fillets_demo")
    ap.add_argument("--toolkit", default="espnet")
    ap.add_argument("--train_config", default="conf/model_ecapa.yaml")
    ap.add_argument("--model_file", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max_utts", type=int, default=0, help="use the first N utterances (0 = all)")
    ap.add_argument("--batch_bins", type=int, default=16000 * 240)
    ap.add_argument("--num_workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2,
                    help="(a)/(b)/(c) alternations; prints each one's best time and the paired ratios per repetition")
    ap.add_argument("--model_streams", type=int, default=1,
                    help="concurrent forwards in (b), each with threads/streams intra-op threads; (c) is then timed "
                         "both ways (one stream with all threads, and the same streams) and the faster by median time is (c)")
    ap.add_argument("--compare_num_workers", type=int, default=-1,
                    help="also time the pipeline with this many decoding workers (e.g. 1 against --num_workers 0) in "
                         "every repetition, next to (b), and print the paired ratio (-1 = off)")
    ap.add_argument("--corpus_repeats", type=int, default=1,
                    help="list the corpus N times under new utt ids (every copy is decoded again): a GPU run long "
                         "enough that start-up costs do not dominate")
    a = ap.parse_args()

    kw = {"device": a.device}
    if a.toolkit == "espnet":
        kw.update(train_config=a.train_config, model_file=a.model_file)
    model = load_model(a.toolkit, **kw)
    utts = load_corpus(a.data_dir)
    if a.max_utts:
        utts = utts[: a.max_utts]
    if a.corpus_repeats > 1:
        utts = [dataclasses.replace(u, utt_id=f"{u.utt_id}#{r}") for r in range(a.corpus_repeats) for u in utts]
    sr = model.sample_rate
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {a.device}")
    print(f"model: {model.describe()}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, batch_bins={a.batch_bins}, num_workers={a.num_workers}, "
          f"model_streams={a.model_streams}")

    def sync():  # GPU work is asynchronous: wait for it before reading the clock
        if str(a.device).startswith("cuda"):
            torch.cuda.synchronize()

    if str(a.device).startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}, TF32 convolutions: {torch.backends.cudnn.allow_tf32}")
    # warm-up (first-call allocations, librosa/numba caches)
    w0 = model.prepare(read_audio(utts[0].path, sr)[0])
    model.embed(torch.from_numpy(w0)[None], torch.tensor([len(w0)]))

    wavs = [model.prepare(read_audio(u.path, sr, u.start, u.end)[0]) for u in utts]
    lengths = [len(w) for w in wavs]
    batches = bucket_batches(lengths, a.batch_bins)
    tensors = [collate([(i, wavs[i], None) for i in b]) for b in batches]
    audio = sum(lengths) / sr

    def run_a():  # per-utterance loop: decode + prepare + embed one utterance at a time
        t = time.perf_counter()
        for u in utts:
            x = model.prepare(read_audio(u.path, sr, u.start, u.end)[0])
            model.embed(torch.from_numpy(x)[None], torch.tensor([len(x)]))
        sync()
        ta.append(time.perf_counter() - t)

    def pipeline(num_workers):  # batched pipeline, end to end (decoding, buckets, masking, shards, merge, npz)
        out = Path(tempfile.mkdtemp(prefix="bench_extract_"))
        t = time.perf_counter()
        s = extract(utts, out, model=model, batch_bins=a.batch_bins, num_workers=num_workers, progress=False,
                    model_streams=a.model_streams)
        dt = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        if s["embedded"] != len(utts):
            raise SystemExit(f"pipeline with num_workers={num_workers} embedded {s['embedded']} of {len(utts)}")
        return dt, s

    def run_b():
        dt, s = pipeline(a.num_workers)
        tb.append(dt)
        summaries.append(s)

    def run_b_alt():  # the same pipeline with the other decoding set-up (--compare_num_workers)
        tb_alt.append(pipeline(a.compare_num_workers)[0])

    def run_c1():  # forward alone on pre-loaded, pre-batched tensors (same bucketing), one stream
        t = time.perf_counter()
        for bt in tensors:
            model.embed(bt.wav, bt.lengths)
        sync()
        tc.append(time.perf_counter() - t)

    def run_cs():  # the same forwards as (b) runs them: streams x (threads / streams)
        tc2.append(forward_streams(model, tensors, a.model_streams, sync))

    # Every repetition runs all ways back to back, in alternating order (a, b, c streams, c one stream, then the
    # reverse): this VM's speed drifts by +-5-10 % within minutes, so (b) always runs next to the streamed (c)
    # and a linear drift cancels over two repetitions in the paired ratios.
    ta, tb, tc, tc2, tb_alt, summaries = [], [], [], [], [], []
    order = [run_a, run_b, run_c1] if a.model_streams == 1 else [run_a, run_b, run_cs, run_c1]
    if a.compare_num_workers >= 0:
        order.insert(1, run_b_alt)  # (b) stays next to the forward it is compared with
    for rep in range(a.repeats):
        for step in (order if rep % 2 == 0 else order[::-1]):
            step()
    s = summaries[-1]
    waste_b = s.get("padding_waste", float("nan"))
    for name, runs in (("a", ta), ("b", tb), (f"b, num_workers={a.compare_num_workers}", tb_alt), ("c", tc),
                       ("c, streams", tc2)):
        if runs:
            print(f"runs ({name}): " + ", ".join(f"{x:.1f}" for x in runs) + " s")
    # (c) is the faster way of running the forward alone, chosen by median time: one forward with all intra-op
    # threads (how torch runs a model) or the same streams as (b). Choosing by the median and then comparing
    # best-of-N with best-of-N keeps the counts equal (the best of 2N runs would be biased low on this VM).
    tc1 = list(tc)
    if tc2 and float(np.median(tc2)) < float(np.median(tc)):
        tc, c_way = tc2, f"{a.model_streams} streams x {max(1, torch.get_num_threads() // a.model_streams)} thread(s)"
    else:
        c_way = f"1 stream x {torch.get_num_threads()} threads"
    # paired ratios: (a), (b), (c) of one repetition ran back to back, so the VM's drift between repetitions
    # cancels in their ratio; the median over repetitions is the figure least sensitive to one disturbed run
    pair_ba = [x / y for x, y in zip(ta, tb)]
    pair_bc = [x / y for x, y in zip(tc, tb)]
    ta_best, tb_best, tc_best = min(ta), min(tb), min(tc)
    waste = padding_waste(lengths, batches)

    ra, rb, rc = audio / ta_best, audio / tb_best, audio / tc_best
    print(f"utterances: {len(utts)}, audio (after preparation): {audio / 60:.1f} min, batches: {len(batches)}")
    print(f"(a) per-utterance loop     : {ta_best:8.1f} s  {ra:7.1f}x real time")
    print(f"(b) batched pipeline (e2e) : {tb_best:8.1f} s  {rb:7.1f}x real time  (engine summary: {s['embedded']} embedded)")
    print(f"(c) forward alone          : {tc_best:8.1f} s  {rc:7.1f}x real time  ({c_way})")
    print(f"ratio (b)/(a) = {rb / ra:.2f}   ratio (b)/(c) = {rb / rc:.2f}   "
          f"padding waste = {100 * waste:.1f} % (c), {100 * waste_b:.1f} % (b, per-shard buckets)")
    print("paired per repetition: (b)/(a) = " + ", ".join(f"{x:.2f}" for x in pair_ba)
          + f" (median {np.median(pair_ba):.2f});  (b)/(c) = " + ", ".join(f"{x:.3f}" for x in pair_bc)
          + f" (median {np.median(pair_bc):.3f})")
    if tb_alt:
        pair = [x / y for x, y in zip(tb_alt, tb)]
        print(f"(b) num_workers={a.num_workers} against num_workers={a.compare_num_workers} (speed-up, paired): "
              + ", ".join(f"{x:.3f}" for x in pair) + f" (median {np.median(pair):.3f}); "
              f"best times {min(tb):.1f} vs {min(tb_alt):.1f} s")
    if tc2:
        print(f"ratio (b)/(c, 1 stream x {torch.get_num_threads()} threads) = {min(tc1) / tb_best:.2f}, "
              f"(b)/(c, {a.model_streams} streams) = {min(tc2) / tb_best:.2f}")

if __name__ == "__main__":
    main()
