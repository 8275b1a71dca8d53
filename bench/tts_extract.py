"""TTS speaker-embedding extraction, three ways side by side in one run with the same model (issue 15, criterion 7).

(a) ESPnet's ``pyscripts/utils/extract_spk_embed.py``: a sequential loop over ``spk2utt``, one utterance per
    forward (ESPnet's own forward), ``SoundScpReader`` decoding + ``librosa.resample``, kaldiio ``WriteHelper``;
(b) PR #6227's ``extract_spk_embed_parallel.py``: a thread pool decodes (``--num_workers`` threads, 128 items
    prefetched, ``torchaudio.transforms.Resample``), batches of 8 in *completion* order zero-padded to the longest
    and passed to the model **without lengths**, written in completion order, then ``sort_spk_embed_scp.sh``'s
    sort of the scp by key;
(c) ours: ``python -m spk_toolkit.bin.extract_spk_embed`` (``spk_toolkit.tts.extract_tts_embeddings``): the
    engine (length buckets, masked batches, shards, merge), ``<tag>.scp`` in ``text`` order.

Printed: wall time and real-time factor of each, the ratios (c)/(a) and (c)/(b), and the batch dependence of (b)
and (c): the cosine of each utterance's embedding to its batch-size-1 embedding from (a) (min and median). The
order of the three ways alternates between repetitions (the VM's speed drifts).

    python bench/tts_extract.py                                       # data/fillets_demo, ESPnet ECAPA (C=512)
    python bench/tts_extract.py --device cuda --num_workers 8        # GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLIs set it (before torch is imported)

import argparse  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))


def make_data(src: Path, dst: Path, max_utts: int) -> Path:
    """An ESPnet TTS data dir from a Kaldi dir: wav.scp, utt2spk, spk2utt and a ``text`` in sorted key order (as
    ESPnet's data prep leaves it)."""
    from spk_toolkit.io.datadir import load_kaldi_dir

    utts = load_kaldi_dir(src)
    if max_utts:
        utts = utts[:max_utts]
    utts.sort(key=lambda u: u.utt_id.encode())
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "wav.scp").write_text("".join(f"{u.utt_id} {u.path}\n" for u in utts))
    (dst / "text").write_text("".join(f"{u.utt_id} x\n" for u in utts))
    (dst / "utt2spk").write_text("".join(f"{u.utt_id} {u.spk_id}\n" for u in utts))
    spk = {}
    for u in utts:
        spk.setdefault(u.spk_id, []).append(u.utt_id)
    (dst / "spk2utt").write_text("".join(f"{s} {' '.join(v)}\n" for s, v in sorted(spk.items())))
    return dst


def read_spk2utt(d: Path) -> dict:
    return {ln.split()[0]: ln.split()[1:] for ln in (d / "spk2utt").read_text().splitlines()}


def espnet_sequential(model, data: Path, out: Path, tag: str) -> dict:
    """(a) ESPnet's extract_spk_embed.py loop (--toolkit espnet): per speaker, per utterance, one forward."""
    import kaldiio
    import librosa
    from espnet2.fileio.sound_scp import SoundScpReader

    spk2utt = read_spk2utt(data)
    wav_scp = SoundScpReader(str(data / "wav.scp"), np.float32)
    out.mkdir(parents=True, exist_ok=True)
    embs = {}
    with kaldiio.WriteHelper(f"ark,scp:{out}/{tag}.ark,{out}/{tag}.scp") as wu, \
            kaldiio.WriteHelper(f"ark,scp:{out}/spk_{tag}.ark,{out}/spk_{tag}.scp") as ws:
        for spk, utts in spk2utt.items():
            acc = []
            for utt in utts:
                sr, wav = wav_scp[utt]
                if wav.ndim == 2:
                    wav = wav.mean(axis=1)
                if sr != model.sample_rate:
                    wav = librosa.resample(wav, orig_sr=sr, target_sr=model.sample_rate)
                x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None].to(model.device)
                with torch.no_grad():
                    e = model.model(x, torch.tensor([x.shape[1]], device=model.device),
                                    extract_embd=True).float().cpu().numpy()[0]
                wu[utt] = e
                embs[utt] = e
                acc.append(e)
            ws[spk] = np.mean(np.stack(acc), 0)
    return embs


def pr6227_parallel(model, data: Path, out: Path, tag: str, num_workers: int, batch_size: int = 8,
                    prefetch: int = 128) -> dict:
    """(b) PR #6227's way (--toolkit espnet): thread-pool decoding, completion-order batches of 8 zero-padded
    without lengths, completion-order writes, then the sort of sort_spk_embed_scp.sh."""
    import kaldiio
    import torchaudio
    from espnet2.fileio.sound_scp import SoundScpReader

    spk2utt = read_spk2utt(data)
    wav_scp = SoundScpReader(str(data / "wav.scp"), np.float32)
    out.mkdir(parents=True, exist_ok=True)
    work = ((s, u) for s, us in spk2utt.items() for u in us)
    resamplers, embs, spk_sum, spk_cnt = {}, {}, {}, {}

    def load(item):
        spk, utt = item
        sr, wav = wav_scp[utt]
        if wav.ndim == 2:
            wav = wav.mean(axis=1)
        if sr != model.sample_rate:
            key = (sr, model.sample_rate)
            if key not in resamplers:
                resamplers[key] = torchaudio.transforms.Resample(sr, model.sample_rate)
            wav = resamplers[key](torch.from_numpy(np.ascontiguousarray(wav, np.float32))[None])[0].numpy()
        return spk, utt, wav

    def flush(batch, wu):
        T = max(len(w) for _, _, w in batch)
        x = np.zeros((len(batch), T), np.float32)
        for i, (_, _, w) in enumerate(batch):
            x[i, : len(w)] = w
        with torch.inference_mode():
            e = model.model(speech=torch.from_numpy(x).to(model.device), spk_labels=None, task_tokens=None,
                            extract_embd=True).float().cpu().numpy()
        for (spk, utt, _), v in zip(batch, e):
            wu[utt] = v
            embs[utt] = v
            spk_sum[spk] = spk_sum.get(spk, 0) + v
            spk_cnt[spk] = spk_cnt.get(spk, 0) + 1

    with kaldiio.WriteHelper(f"ark,scp:{out}/{tag}.ark,{out}/{tag}.scp") as wu:
        batch = []
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as ex:
            pending = {ex.submit(load, it) for it in itertools.islice(work, prefetch)}
            while pending:
                fut = next(as_completed(pending))
                pending.remove(fut)
                batch.append(fut.result())
                nxt = next(work, None)
                if nxt is not None:
                    pending.add(ex.submit(load, nxt))
                if len(batch) >= batch_size or (not pending and batch):
                    flush(batch, wu)
                    batch = []
    with kaldiio.WriteHelper(f"ark,scp:{out}/spk_{tag}.ark,{out}/spk_{tag}.scp") as ws:
        for spk in spk_cnt:
            ws[spk] = spk_sum[spk] / spk_cnt[spk]
    scp = out / f"{tag}.scp"  # sort_spk_embed_scp.sh: LC_ALL=C sort -k1,1 (text is sorted)
    lines = scp.read_text().splitlines()
    scp.write_text("".join(ln + "\n" for ln in sorted(lines, key=lambda ln: ln.split()[0].encode())))
    return embs


def ours(args, model_file: Path, data: Path, out: Path, tag: str) -> dict:
    """(c) the CLI, in this process (the model load is inside the timing, as for (a) and (b)'s callers)."""
    from spk_toolkit.io.storage import open_reader
    from spk_toolkit.tts import extract_tts_embeddings

    s = extract_tts_embeddings(data, out, tag, toolkit="espnet",
                               model_kwargs={"model_file": str(model_file), "device": args.device},
                               num_workers=args.num_workers, model_streams=args.model_streams,
                               batch_bins=args.batch_bins, progress=False, shard_duration=args.shard_duration)
    r = open_reader(out / f"{tag}.scp")
    return {"embs": {k: r[k] for k in r}, "summary": s}


def cos_to(ref: dict, got: dict) -> np.ndarray:
    out = []
    for k, v in ref.items():
        a, b = np.asarray(v, np.float64), np.asarray(got[k], np.float64)
        out.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return np.asarray(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default="data/fillets_demo")
    ap.add_argument("--max_utts", type=int, default=0, help="first N utterances (0 = all)")
    ap.add_argument("--arch", default="ecapa512", help="espnet_helpers.CONFIGS key (random init, seeded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num_workers", type=int, default=0, help="ours: decoding workers; PR: decoding threads (>= 1)")
    ap.add_argument("--pr_threads", type=int, default=2, help="PR #6227's decoding threads (its default: cores/4)")
    ap.add_argument("--model_streams", type=int, default=2)
    ap.add_argument("--batch_bins", type=int, default=512000)
    ap.add_argument("--shard_duration", type=float, default=600.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from spk_toolkit.backends.espnet import EspnetSpeakerModel
    from tts_helpers import save_espnet_model

    work = Path(tempfile.mkdtemp(prefix="tts_bench."))
    try:
        data = make_data(ROOT / args.data_dir, work / "data", args.max_utts)
        pth = save_espnet_model(args.arch, work / "model", seed=0)
        audio = 0.0
        from spk_toolkit.io.datadir import load_kaldi_dir, measure_durations

        utts = load_kaldi_dir(data)
        measure_durations(utts)
        audio = sum(u.duration for u in utts)
        times = {"a": [], "b": [], "c": []}
        res = {}
        orders = [("a", "b", "c"), ("c", "b", "a")]
        for rep in range(args.repeats):
            for way in orders[rep % 2]:
                out = work / f"out_{way}_{rep}"
                t0 = time.perf_counter()
                if way == "c":
                    res["c"] = ours(args, pth, data, out, "xvector")
                else:
                    m = EspnetSpeakerModel(model_file=pth, device=args.device)
                    if way == "a":
                        res["a"] = espnet_sequential(m, data, out, "xvector")
                    else:
                        res["b"] = pr6227_parallel(m, data, out, "xvector", args.pr_threads)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                times[way].append(time.perf_counter() - t0)
                print(f"rep {rep} ({way}): {times[way][-1]:.1f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        best = {k: min(v) for k, v in times.items()}
        cb, cc = cos_to(res["a"], res["b"]), cos_to(res["a"], res["c"]["embs"])
        text_keys = [ln.split()[0] for ln in (data / "text").read_text().splitlines()]
        print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}")
        print(f"data: {args.data_dir}, {len(utts)} utterances, {audio / 60:.1f} min; model: ESPnet {args.arch} "
              f"(random init); ours: --num_workers {args.num_workers} --model_streams {args.model_streams} "
              f"--batch_bins {args.batch_bins}")
        for k, name in (("a", "(a) ESPnet sequential (spk2utt loop)"), ("b", "(b) PR #6227 (threads, batches of 8)"),
                        ("c", "(c) ours (engine)")):
            runs = ", ".join(f"{t:.1f}" for t in times[k])
            print(f"{name:<40}: best {best[k]:6.1f} s  {audio / best[k]:6.1f}x real time   (runs: {runs})")
        pa = [a / c for a, c in zip(times["a"], times["c"])]
        pb = [b / c for b, c in zip(times["b"], times["c"])]
        print(f"speed-up (c) vs (a): best {best['a'] / best['c']:.2f}, paired median {statistics.median(pa):.2f}")
        print(f"speed-up (c) vs (b): best {best['b'] / best['c']:.2f}, paired median {statistics.median(pb):.2f}")
        print(f"batch dependence, cosine to batch size 1: (b) min {cb.min():.5f} median {np.median(cb):.5f} "
              f"(< 0.999 for {int((cb < 0.999).sum())} of {len(cb)});  (c) min {cc.min():.7f}")
        print(f"(c) <tag>.scp in text order: {list(res['c']['embs']) == text_keys}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
