"""Prepare an ESPnet-SPK training directory from a Kaldi data dir.

``python -m spk_toolkit.recipes.espnet_spk --data data/fillets_small --out dump/spk`` (or
``bin/prepare_spk_train.sh``) writes::

    <out>/wav/<quoted utt id>.flac   16 kHz mono FLAC (ESPnet reads audio with soundfile, at one rate)
    <out>/train/wav.scp utt2spk spk2utt speech_shape      training utterances  (speech_shape: ``utt n_samples``)
    <out>/valid/wav.scp utt2spk spk2utt                   held-out utterances
    <out>/valid/trial.scp trial2.scp trial_label speech_shape
                                                          ESPnet trials: ``enr*tst enroll_wav``,
                                                          ``enr*tst test_wav``, ``enr*tst 1|0``;
                                                          speech_shape keyed by trial id (ESPnet's sampler
                                                          needs the dataset keys)
    <out>/spk_train.args             the data options of ``python -m spk_toolkit.bin.spk_train``, one per line

Split: every speaker keeps all but ``--valid_per_spk`` of its utterances for training (closed-set speakers,
unseen utterances), and speakers listed in ``--valid_spks`` go entirely to validation (open set). Trials are
every pair of validation utterances (``--max_trials`` caps them with a seeded, label-stratified sample).
Utterances shorter than ``--min_duration`` seconds are left out. Deterministic for a given ``--seed``.

Audio is decoded, down-mixed and resampled by :func:`spk_toolkit.io.audio.read_audio` (soundfile + soxr), so
Ogg/44.1 kHz inputs such as the fillets voice packs become what ESPnet's ``sound`` loader accepts.
"""
from __future__ import annotations

import argparse
import itertools
import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import quote

import numpy as np
import soundfile as sf

from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import load_corpus


def _write(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    tmp.replace(path)


def make_trials(utts: Sequence[str], utt2spk: Dict[str, str], max_trials: Optional[int], seed: int = 0):
    """All pairs ``(enroll, test, label)`` of ``utts`` (enroll < test in C order), optionally sub-sampled.

    With ``max_trials``, targets and nontargets are sampled separately in proportion (at least one of each when
    both exist), seeded, and the result is sorted by trial id.
    """
    pairs = [(a, b) for a, b in itertools.combinations(sorted(utts), 2)]
    tar = [(a, b, 1) for a, b in pairs if utt2spk[a] == utt2spk[b]]
    non = [(a, b, 0) for a, b in pairs if utt2spk[a] != utt2spk[b]]
    if max_trials is not None and len(pairs) > max_trials:
        rng = random.Random(seed)
        n_t = max(1, round(max_trials * len(tar) / len(pairs))) if tar else 0
        n_t = min(n_t, len(tar))
        tar = rng.sample(tar, n_t)
        non = rng.sample(non, min(len(non), max_trials - n_t))
    return sorted(tar + non, key=lambda t: f"{t[0]}*{t[1]}")


def prepare(
    data: str | Path,
    out: str | Path,
    sample_rate: int = 16000,
    valid_per_spk: int = 3,
    valid_spks: Sequence[str] = (),
    max_train_per_spk: Optional[int] = None,
    min_duration: float = 0.5,
    max_trials: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """Write the ESPnet-SPK training directory; return a summary dict.

    Parameters
    ----------
    data : path
        Kaldi data dir (``wav.scp`` + ``utt2spk``) or anything :func:`spk_toolkit.io.datadir.load_corpus` reads,
        with speaker labels.
    out : path
        Output directory (created).
    sample_rate : int
        Rate of the written FLAC files, Hz.
    valid_per_spk : int
        Utterances of each training speaker held out for validation (the longest-first order is seeded
        shuffled; chosen deterministically).
    valid_spks : sequence of str
        Speakers used for validation only (open-set trials).
    max_train_per_spk : int, optional
        Cap on training utterances per speaker.
    min_duration : float
        Seconds; shorter utterances are skipped.
    max_trials : int, optional
        Cap on validation trials.
    seed : int

    Returns
    -------
    dict
        ``{"n_train", "n_valid", "n_spk", "n_trials", "n_target", "out"}``.

    Raises
    ------
    ValueError
        No speaker labels, an utterance id containing ``*`` or whitespace (ESPnet trial ids are ``enr*tst``),
        fewer than 2 training speakers, or no target/nontarget trial.
    """
    out = Path(out)
    utts = load_corpus(data)
    by_spk: Dict[str, List] = defaultdict(list)
    for u in utts:
        if u.spk_id is None:
            raise ValueError(f"{data}: utterance {u.utt_id!r} has no speaker (utt2spk)")
        if "*" in u.utt_id or any(c.isspace() for c in u.utt_id):
            raise ValueError(f"utterance id {u.utt_id!r} contains '*' or whitespace (ESPnet trial ids are enr*tst)")
        by_spk[u.spk_id].append(u)
    rng = random.Random(seed)
    train, valid = [], []
    wavdir = out / "wav"
    wavdir.mkdir(parents=True, exist_ok=True)
    n_samples: Dict[str, int] = {}
    paths: Dict[str, str] = {}

    def convert(u) -> bool:
        dst = wavdir / (quote(u.utt_id, safe="") + ".flac")
        if dst.is_file():
            n = sf.info(str(dst)).frames
        else:
            wav, _ = read_audio(u.path, sample_rate, start=u.start, end=u.end)
            tmp = dst.with_name(dst.stem + ".tmp.flac")
            sf.write(str(tmp), wav, sample_rate, subtype="PCM_16")
            tmp.replace(dst)
            n = len(wav)
        if n < min_duration * sample_rate:
            return False
        n_samples[u.utt_id] = int(n)
        paths[u.utt_id] = str(dst.resolve())
        return True

    for spk in sorted(by_spk):
        lst = sorted(by_spk[spk], key=lambda u: u.utt_id)
        rng.shuffle(lst)
        kept = [u for u in lst if convert(u)]
        if spk in valid_spks:
            valid += kept
            continue
        valid += kept[:valid_per_spk]
        tr = kept[valid_per_spk:]
        train += tr[:max_train_per_spk] if max_train_per_spk else tr
    utt2spk = {u.utt_id: u.spk_id for u in utts}
    train_ids = sorted(u.utt_id for u in train)
    valid_ids = sorted(u.utt_id for u in valid)
    train_spks = sorted({utt2spk[i] for i in train_ids})
    if len(train_spks) < 2:
        raise ValueError(f"need >= 2 training speakers, got {train_spks}")

    for name, ids in (("train", train_ids), ("valid", valid_ids)):
        d = out / name
        _write(d / "wav.scp", [f"{i} {paths[i]}" for i in ids])
        _write(d / "utt2spk", [f"{i} {utt2spk[i]}" for i in ids])
        s2u = defaultdict(list)
        for i in ids:
            s2u[utt2spk[i]].append(i)
        _write(d / "spk2utt", [f"{s} {' '.join(s2u[s])}" for s in sorted(s2u)])
    _write(out / "train" / "speech_shape", [f"{i} {n_samples[i]}" for i in train_ids])

    trials = make_trials(valid_ids, utt2spk, max_trials, seed)
    n_tar = sum(t[2] for t in trials)
    if n_tar == 0 or n_tar == len(trials):
        raise ValueError(f"validation trials need targets and nontargets: {n_tar} of {len(trials)} are targets")
    v = out / "valid"
    _write(v / "trial.scp", [f"{a}*{b} {paths[a]}" for a, b, _ in trials])
    _write(v / "trial2.scp", [f"{a}*{b} {paths[b]}" for a, b, _ in trials])
    _write(v / "trial_label", [f"{a}*{b} {lab}" for a, b, lab in trials])
    _write(v / "speech_shape", [f"{a}*{b} {n_samples[a]}" for a, b, _ in trials])
    o = out.resolve()
    _write(out / "spk_train.args", [
        f"--train_data_path_and_name_and_type={o}/train/wav.scp,speech,sound",
        f"--train_data_path_and_name_and_type={o}/train/utt2spk,spk_labels,text",
        f"--train_shape_file={o}/train/speech_shape",
        f"--valid_data_path_and_name_and_type={o}/valid/trial.scp,speech,sound",
        f"--valid_data_path_and_name_and_type={o}/valid/trial2.scp,speech2,sound",
        f"--valid_data_path_and_name_and_type={o}/valid/trial_label,spk_labels,text",
        f"--valid_shape_file={o}/valid/speech_shape",
        f"--spk2utt={o}/train/spk2utt",
        f"--spk_num={len(train_spks)}",
    ])  # fmt: skip
    return {"n_train": len(train_ids), "n_valid": len(valid_ids), "n_spk": len(train_spks),
            "n_trials": len(trials), "n_target": n_tar, "out": str(o),
            "train_seconds": float(np.sum([n_samples[i] for i in train_ids]) / sample_rate)}


def prepare_from_cache(dump: str | Path, cache: str | Path, out: Optional[str | Path] = None,
                       name: str = "fbank") -> dict:
    """ESPnet-SPK training data options reading a feature cache instead of audio (issue 16 criterion 6).

    ``cache`` is a ``kaldi_ark`` feature cache (:func:`spk_toolkit.cache_features`, ``output_format="kaldi_ark"``)
    holding every utterance of ``<dump>/train`` and ``<dump>/valid`` (a directory written by :func:`prepare`).
    Writes, under ``out`` (default ``<dump>/cache_<name>``)::

        train/feats.scp   the cache's ``<name>.scp`` lines of the training utterances (``utt /abs/x.ark:offset``)
        train/utt2spk spk2utt                             copies
        train/feats_shape ``utt T,F`` (frames, feature dim), in the order of ``<dump>/train/speech_shape``
        valid/trial.scp trial2.scp                        ``enr*tst /abs/x.ark:offset`` of the enrolment / test side
        valid/trial_label                                 copy
        valid/feats_shape ``enr*tst T,F`` of the enrolment side
        spk_train.args    ``--*_data_path_and_name_and_type ...,kaldi_ark`` etc. (ESPnet's ``kaldi_ark`` type)

    Use with a config that has ``frontend: null``, ``input_size: F`` and ``preprocessor: spk_frames`` with
    ``input: features`` (e.g. ``conf/train_xvector_cached_fbank.yaml``).

    Raises
    ------
    FileNotFoundError
        No ``<cache>/<name>.scp`` (not a ``kaldi_ark`` cache of that output).
    KeyError
        An utterance of the dump that the cache lacks (named).
    """
    dump, cache = Path(dump), Path(cache)
    out = Path(out) if out is not None else dump / f"cache_{name}"
    scp = cache / f"{name}.scp"
    if not scp.is_file():
        raise FileNotFoundError(f"{scp}: not a kaldi_ark cache of output {name!r} (cache_features(..., "
                                "output_format='kaldi_ark'))")
    return _write_cache_args(dump, scp, out)


def _read_pairs(path: Path) -> List[List[str]]:
    return [ln.split(maxsplit=1) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _write_cache_args(dump: Path, scp: Path, out: Path) -> dict:
    from spk_toolkit.io.scp import load_scp_array, read_scp_entries

    entries = dict(read_scp_entries(scp))
    shapes: Dict[str, str] = {}

    def entry(u: str) -> str:
        if u not in entries:
            raise KeyError(f"utterance {u!r} of {dump} is not in the cache {scp}")
        if u not in shapes:
            shapes[u] = ",".join(str(d) for d in load_scp_array(entries[u]).shape)
        return entries[u]

    train = [u for u, _ in _read_pairs(dump / "train" / "speech_shape")]
    _write(out / "train" / "feats.scp", [f"{u} {entry(u)}" for u in train])
    _write(out / "train" / "feats_shape", [f"{u} {shapes[u]}" for u in train])
    for f in ("utt2spk", "spk2utt"):
        _write(out / "train" / f, (dump / "train" / f).read_text(encoding="utf-8").splitlines())
    trials = [t for t, _ in _read_pairs(dump / "valid" / "trial_label")]
    pairs = [t.split("*") for t in trials]
    _write(out / "valid" / "trial.scp", [f"{t} {entry(a)}" for t, (a, _) in zip(trials, pairs)])
    _write(out / "valid" / "trial2.scp", [f"{t} {entry(b)}" for t, (_, b) in zip(trials, pairs)])
    _write(out / "valid" / "trial_label", (dump / "valid" / "trial_label").read_text(encoding="utf-8").splitlines())
    _write(out / "valid" / "feats_shape", [f"{t} {shapes[a]}" for t, (a, _) in zip(trials, pairs)])
    o = out.resolve()
    n_spk = len(_read_pairs(dump / "train" / "spk2utt"))
    _write(out / "spk_train.args", [
        f"--train_data_path_and_name_and_type={o}/train/feats.scp,speech,kaldi_ark",
        f"--train_data_path_and_name_and_type={o}/train/utt2spk,spk_labels,text",
        f"--train_shape_file={o}/train/feats_shape",
        f"--valid_data_path_and_name_and_type={o}/valid/trial.scp,speech,kaldi_ark",
        f"--valid_data_path_and_name_and_type={o}/valid/trial2.scp,speech2,kaldi_ark",
        f"--valid_data_path_and_name_and_type={o}/valid/trial_label,spk_labels,text",
        f"--valid_shape_file={o}/valid/feats_shape",
        f"--spk2utt={o}/train/spk2utt",
        f"--spk_num={n_spk}",
    ])  # fmt: skip
    return {"n_train": len(train), "n_trials": len(trials), "n_spk": n_spk, "out": str(o)}


def train_args(out: str | Path) -> List[str]:
    """The data options written to ``<out>/spk_train.args`` (for building a ``spk_train`` command line)."""
    return Path(out, "spk_train.args").read_text(encoding="utf-8").split()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="Kaldi data dir with utt2spk")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sample_rate", type=int, default=16000)
    p.add_argument("--valid_per_spk", type=int, default=3)
    p.add_argument("--valid_spks", default="", help="comma-separated speakers used for validation only")
    p.add_argument("--max_train_per_spk", type=int, default=None)
    p.add_argument("--min_duration", type=float, default=0.5)
    p.add_argument("--max_trials", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    s = prepare(a.data, a.out, a.sample_rate, a.valid_per_spk, [x for x in a.valid_spks.split(",") if x],
                a.max_train_per_spk, a.min_duration, a.max_trials, a.seed)
    print(f"{s['n_train']} training utterances of {s['n_spk']} speakers ({s['train_seconds']:.0f} s), "
          f"{s['n_valid']} validation utterances, {s['n_trials']} trials ({s['n_target']} target) -> {s['out']}")
    print(f"training data options: {s['out']}/spk_train.args")


if __name__ == "__main__":
    main()
