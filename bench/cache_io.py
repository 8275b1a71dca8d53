"""Offline fbank cache I/O on real speech, side by side in one run (issue 16, criterion 7).

Writes: ``spk_toolkit.cache_features`` (decode + resample + Kaldi fbank + shards + merge) once per writer
(hdf5 gzip / lzf / none, kaldi_ark, npz, npy_dir), throughput in x real time, size on disk; and SpeechBrain's
merged way (PR #2985, ``speechbrain.utils.data_pipeline.CachedDynamicItem``: each item computed alone in the
data pipeline on its first pass, one ``torch.save`` ``.pt`` per id; and ``CachedHDF5DynamicItem``, one HDF5
file written by one process), when speechbrain is importable.

Reads, one epoch through a ``torch.utils.data.DataLoader`` (same batch size, workers and padded collate for every
way): each cache (:class:`spk_toolkit.features.cache.CacheDataset`), SpeechBrain's caches, and computing fbank on the fly
in the loader (decode + resample + fbank per item: what training without a cache does every epoch). MB/s counts
the float32 feature bytes delivered; best of ``--repeats`` epochs, ways alternating in order per repetition.
lhotse's batch extraction is timed too when lhotse is importable (it is not in this environment).

Target on the 2-core CPU: reading cached fbank >= 10x faster than computing it on the fly in the loader.

    python bench/cache_io.py --data_dir data/fillets_demo --repeats 3
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLIs set it (before torch is imported)

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import spk_toolkit  # noqa: E402
from spk_toolkit.features import KaldiFbank  # noqa: E402
from spk_toolkit.features.cache import CacheDataset, collate_frames  # noqa: E402
from spk_toolkit.io.audio import read_audio  # noqa: E402
from spk_toolkit.io.datadir import load_corpus  # noqa: E402

WRITERS = [("hdf5 (gzip)", "hdf5", {"compression": "gzip"}), ("hdf5 (lzf)", "hdf5", {"compression": "lzf"}),
           ("hdf5 (none)", "hdf5", {"compression": "none"}), ("kaldi_ark", "kaldi_ark", {}), ("npz", "npz", {}),
           ("npy_dir", "npy_dir", {})]


def size_of(path: Path) -> int:
    """Bytes on disk of a file or a directory tree."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class OnTheFly(torch.utils.data.Dataset):
    """Decode + resample + Kaldi fbank per item (training without a cache)."""

    def __init__(self, utts, fbank: KaldiFbank):
        self.utts, self.fbank = utts, fbank

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, i):
        u = self.utts[i]
        x, _ = read_audio(u.path, self.fbank.sample_rate, u.start, u.end)
        f = self.fbank.compute_waveforms([x])[0]["fbank"]
        return {"id": u.utt_id, "feats": torch.from_numpy(f), "frames": len(f)}


class SpeechBrainCache(torch.utils.data.Dataset):
    """SpeechBrain's merged cache (PR #2985): a ``DynamicItemDataset`` whose fbank item is wrapped by
    ``CachedDynamicItem`` (one ``torch.save`` ``.pt`` per id) or ``CachedHDF5DynamicItem`` (one HDF5 file).

    The first pass computes each item alone in the data pipeline and caches it; later passes load it. Ids have
    ``/`` replaced (a ``.pt`` file name is the id, and SpeechBrain does not create sub-directories).
    """

    def __init__(self, utts, fbank: KaldiFbank, root: Path, hdf5: bool = False, file_mode: str = "a"):
        from speechbrain.dataio.dataset import DynamicItemDataset
        from speechbrain.utils.data_pipeline import CachedDynamicItem, provides, takes

        def compute(uid, path, start, end):
            x, _ = read_audio(path, fbank.sample_rate, start, end)
            return torch.from_numpy(fbank.compute_waveforms([x])[0]["fbank"])

        item = provides("feats")(takes("id", "path", "start", "end")(compute))
        if hdf5:
            from speechbrain.integrations.hdf5.cached_item import CachedHDF5DynamicItem

            item = CachedHDF5DynamicItem.cache(root, file_mode=file_mode)(item)
        else:
            item = CachedDynamicItem.cache(root)(item)
        self.item = item
        data = {u.utt_id.replace("/", "__"): {"path": u.path, "start": u.start, "end": u.end} for u in utts}
        self.ds = DynamicItemDataset(data, dynamic_items=[item], output_keys=["id", "feats"])

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        d = self.ds[i]
        f = torch.as_tensor(np.asarray(d["feats"]))
        return {"id": d["id"], "feats": f, "frames": len(f)}


def epoch(ds, batch_size: int, num_workers: int) -> tuple:
    """(seconds, utterances, feature bytes) of one DataLoader pass."""
    kw = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_frames, shuffle=False)
    if num_workers:
        kw.update(persistent_workers=False, prefetch_factor=4)
    t = time.perf_counter()
    n = nbytes = 0
    for b in torch.utils.data.DataLoader(ds, **kw):
        n += len(b["ids"])
        nbytes += int(b["lengths"].sum()) * b["feats"].shape[-1] * 4
    return time.perf_counter() - t, n, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default="data/fillets_demo")
    ap.add_argument("--max_utts", type=int, default=0, help="first N utterances (0 = all)")
    ap.add_argument("--repeats", type=int, default=3, help="read epochs per way (best time kept)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--num_workers", default="0,2",
                    help="comma list: DataLoader workers; every read way is timed with each")
    ap.add_argument("--work_dir", default=None, help="where the caches go (default: a temporary directory)")
    args = ap.parse_args()

    utts = load_corpus(args.data_dir)
    if args.max_utts:
        utts = utts[: args.max_utts]
    sub = None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cache_io_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.max_utts:
        sub = work / "data"
        sub.mkdir(exist_ok=True)
        (sub / "wav.scp").write_text("".join(f"{u.utt_id} {u.path}\n" for u in utts))
    data = sub or args.data_dir
    fbank = KaldiFbank(num_mel_bins=80)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; data: {args.data_dir} ({len(utts)} utterances)")

    # ---------------------------------------------------------------------------------------------- writes
    rows, caches = [], {}
    audio_s = None
    for label, fmt, wopts in WRITERS:
        out = work / label.replace(" ", "").replace("(", "_").replace(")", "")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        s = spk_toolkit.cache_features(data, out, "fbank", {"num_mel_bins": 80}, output_format=fmt,
                                       writer_options={fmt: wopts} if wopts else None, progress=False,
                                       num_workers=1)
        wall = time.perf_counter() - t
        audio_s = s["audio_hours"] * 3600
        files = spk_toolkit.open_cache(out)
        size = sum(size_of(out / Path(p).name) for p in s["outputs_by_name"]["fbank"].values())
        if fmt == "kaldi_ark":
            size += size_of(out / "fbank.ark")
        rows.append((label, wall, size))
        caches[label] = files
    sb_ways = {}
    try:
        import speechbrain  # noqa: F401
    except ImportError:
        print("speechbrain: not installed here, its @cache not timed")
    else:
        for label, hdf5, nw in (("SpeechBrain @cache .pt", False, 2), ("SpeechBrain @cache HDF5", True, 0)):
            root = work / label.split()[-1].lower().lstrip(".")
            shutil.rmtree(root, ignore_errors=True)
            ds = SpeechBrainCache(utts, fbank, root, hdf5=hdf5)
            t = time.perf_counter()
            epoch(ds, args.batch_size, nw)  # first pass: computes each item in the pipeline and caches it
            wall = time.perf_counter() - t
            if hdf5:  # close the writer; readers open the file read-only
                ds.item.hdf5file.close()
                ds = SpeechBrainCache(utts, fbank, root, hdf5=True, file_mode="r")
            rows.append((f"{label} ({nw} workers)", wall, size_of(root)))
            sb_ways[label] = ds
    print(f"\naudio: {audio_s / 60:.1f} min")
    print(f"{'write':<40} {'wall s':>8} {'x real time':>12} {'size MB':>9}")
    for label, wall, size in rows:
        print(f"{label:<40} {wall:8.1f} {audio_s / wall:12.0f} {size / 1e6:9.1f}")

    # ----------------------------------------------------------------------------------------------- reads
    ways = {label: CacheDataset(c) for label, c in caches.items()}
    ways.update(sb_ways)
    ways["fbank on the fly"] = OnTheFly(utts, fbank)
    try:
        import lhotse  # noqa: F401

        print("lhotse is importable: its batch extraction is not wired in this benchmark yet")
    except ImportError:
        print("lhotse: not installed here, not timed")
    worker_counts = [int(w) for w in str(args.num_workers).split(",") if w.strip()]
    best = {(k, w): None for k in ways for w in worker_counts}
    order = list(best)
    for r in range(args.repeats):
        for key in (order if r % 2 == 0 else order[::-1]):
            res = epoch(ways[key[0]], args.batch_size, key[1])
            if best[key] is None or res[0] < best[key][0]:
                best[key] = res
    fly = min(best[("fbank on the fly", w)][0] for w in worker_counts)
    print(f"\n{'read (one epoch, DataLoader)':<40} {'workers':>7} {'s/epoch':>8} {'utt/s':>8} {'MB/s':>8} "
          f"{'x on the fly':>13}")
    for label, w in order:
        sec, n, nb = best[(label, w)]
        print(f"{label:<40} {w:7d} {sec:8.2f} {n / sec:8.0f} {nb / sec / 1e6:8.1f} {fly / sec:13.1f}")
    per_cache = {k: min(best[(k, w)][0] for w in worker_counts) for k in caches}
    print(f"\ntarget: reading cached fbank >= 10x faster than computing it on the fly (each way's best worker "
          f"count): best cache {fly / min(per_cache.values()):.1f}x, slowest cache "
          f"{fly / max(per_cache.values()):.1f}x")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
