"""Real-speech recipe: Fish Fillets NG voice packs (Debian ``fillets-ng-data-cs`` / ``-nl``, GPL-2).

Game dialogue read by professional actors. Files are
``usr/share/games/fillets-ng/sound/<level>/<lang>/<level-abbrev>-<spk>-<word>.ogg`` (22.05/44.1 kHz, some
stereo). The two fish (``m`` small, ``v`` big) have > 35 min each per language; the actors differ between
languages, so ``cs_m``, ``cs_v``, ``nl_m``, ``nl_v`` are four speakers.

``python -m spk_toolkit.recipes.fillets --root data/fillets --out data`` writes:

* ``<out>/fillets/`` a Kaldi data dir (``wav.scp``, ``utt2spk``, ``spk2utt``, ``utt2dur``) of every speaker with at
  least ``--min_speaker_minutes`` of speech; utterance ids ``<lang>_<spk>/<level>/<file stem>``;
* ``<out>/fillets_trials.txt`` VoxCeleb-format trials (``label enroll.wav test.wav``) over utterances of at least
  ``--min_trial_duration`` seconds: ``--n_target`` target and as many nontarget pairs, seeded;
* ``<out>/fillets_small/`` a small data dir (``--small_per_speaker`` utterances per speaker) for tests;
* ``<out>/fillets_demo/`` + ``fillets_demo_trials.txt``: ``--demo_per_speaker`` utterances per speaker for
  ``make demo``.
"""
from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict
from pathlib import Path

import soundfile as sf

NAME = re.compile(r"^[a-z0-9]+-([a-z]+)-(.+)\.ogg$")


def scan(root: Path) -> list[tuple[str, str, str, float]]:
    """Return ``(utt_id, spk_id, path, duration_s)`` for every dialogue file under ``root`` (sorted by id)."""
    sound = root / "usr/share/games/fillets-ng/sound"
    if not sound.is_dir():
        raise FileNotFoundError(f"{sound} not found: run bin/prepare_fillets.sh (downloads the Debian packages)")
    out = []
    for p in sorted(sound.glob("*/*/*.ogg")):
        m = NAME.match(p.name)
        if not m:
            continue
        level, lang = p.parent.parent.name, p.parent.name
        spk = f"{lang}_{m.group(1)}"
        out.append((f"{spk}/{level}/{p.stem}", spk, str(p.resolve()), sf.info(str(p)).duration))
    out.sort(key=lambda r: r[0].encode())
    return out


def write_datadir(d: Path, rows) -> None:
    """Write ``wav.scp``, ``utt2spk``, ``spk2utt``, ``utt2dur`` (keys sorted as ``LC_ALL=C``)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r[0].encode())
    (d / "wav.scp").write_text("".join(f"{u} {p}\n" for u, s, p, t in rows))
    (d / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s, p, t in rows))
    (d / "utt2dur").write_text("".join(f"{u} {t:.4f}\n" for u, s, p, t in rows))
    spk2utt = defaultdict(list)
    for u, s, p, t in rows:
        spk2utt[s].append(u)
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))


def make_trials(rows, n_target: int, min_duration: float, seed: int = 0) -> list[tuple[int, str, str]]:
    """Seeded VoxCeleb-style trials: ``n_target`` target and ``n_target`` nontarget pairs, no self-pairs."""
    rng = random.Random(seed)
    by_spk = defaultdict(list)
    for u, s, p, t in rows:
        if t >= min_duration:
            by_spk[s].append(u)
    spks = sorted(by_spk)
    trials, seen = [], set()
    while sum(1 for t in trials if t[0] == 1) < n_target:
        s = rng.choice(spks)
        a, b = rng.sample(by_spk[s], 2)
        if (a, b) not in seen:
            seen.add((a, b))
            trials.append((1, a, b))
    while len(trials) < 2 * n_target:
        s1, s2 = rng.sample(spks, 2)
        a, b = rng.choice(by_spk[s1]), rng.choice(by_spk[s2])
        if (a, b) not in seen:
            seen.add((a, b))
            trials.append((0, a, b))
    rng.shuffle(trials)
    return trials


def main(argv=None):
    """Command line: scan the unpacked packages, write the data dirs and trial lists (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("data/fillets_pkg"), help="where the .deb files were unpacked")
    ap.add_argument("--out", type=Path, default=Path("data"))
    ap.add_argument("--min_speaker_minutes", type=float, default=20.0)
    ap.add_argument("--min_trial_duration", type=float, default=1.0, help="seconds")
    ap.add_argument("--n_target", type=int, default=3000)
    ap.add_argument("--small_per_speaker", type=int, default=12)
    ap.add_argument("--demo_per_speaker", type=int, default=150, help="utterances per speaker in fillets_demo")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rows = scan(a.root)
    total = defaultdict(float)
    for u, s, p, t in rows:
        total[s] += t
    keep = {s for s, t in total.items() if t >= 60 * a.min_speaker_minutes}
    rows = [r for r in rows if r[1] in keep]
    write_datadir(a.out / "fillets", rows)
    trials = make_trials(rows, a.n_target, a.min_trial_duration, a.seed)
    (a.out / "fillets_trials.txt").write_text("".join(f"{l} {e}.wav {t}.wav\n" for l, e, t in trials))
    rng = random.Random(a.seed)
    small = []
    for s in sorted(keep):
        cand = [r for r in rows if r[1] == s and 0.5 <= r[3] <= 20.0]
        small += rng.sample(cand, min(a.small_per_speaker, len(cand)))
    write_datadir(a.out / "fillets_small", small)
    demo = []
    for s in sorted(keep):
        cand = [r for r in rows if r[1] == s and r[3] >= a.min_trial_duration]
        demo += rng.sample(cand, min(a.demo_per_speaker, len(cand)))
    write_datadir(a.out / "fillets_demo", demo)
    demo_trials = make_trials(demo, a.n_target // 3, a.min_trial_duration, a.seed)
    (a.out / "fillets_demo_trials.txt").write_text("".join(f"{l} {e}.wav {t}.wav\n" for l, e, t in demo_trials))
    for s in sorted(keep):
        print(f"speaker {s}: {sum(1 for r in rows if r[1] == s)} utterances, {total[s] / 60:.1f} min")
    print(f"wrote {a.out / 'fillets'} ({len(rows)} utterances), {a.out / 'fillets_trials.txt'} ({len(trials)} trials), "
          f"{a.out / 'fillets_small'} ({len(small)} utterances), {a.out / 'fillets_demo'} ({len(demo)} utterances, "
          f"{len(demo_trials)} trials)")


if __name__ == "__main__":
    main()
