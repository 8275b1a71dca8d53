"""Corpus readers: Kaldi data dir, ESPnet3 manifest TSV, audio tree -> :class:`Utterance` records.

Formats (REFERENCE.md):

* **Kaldi data dir**: ``wav.scp`` (``utt_id path`` or ``utt_id cmd ... |``), optional ``segments``
  (``utt_id rec_id start end`` in seconds), ``utt2spk``, ``spk2utt`` (derived from ``utt2spk`` when missing),
  ``utt2dur`` (seconds) / ``utt2num_samples`` read when present, written back as a cache when computed.
* **ESPnet3 manifest TSV**: ``utt_id<TAB>wav_path<TAB>text<TAB>speaker_id``.
* **Audio tree** (3D-Speaker pipeline): ``root/<dataset>/<speaker>/<utt>.<ext>``; key
  ``<dataset>/<speaker>/<utt>`` (``/`` cannot occur inside a path component, so keys never collide).

Malformed input (a duplicate ``utt_id``, a ``wav.scp`` line without a path, a ``segments`` entry naming an
unknown recording) raises :class:`CorpusError` before any work starts, naming the file and line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from spk_toolkit.io.audio import AudioLoadingError, audio_info, is_pipe

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".sph")


class CorpusError(ValueError):
    """A corpus description is malformed (raised before any audio is decoded)."""


@dataclasses.dataclass
class Utterance:
    """One utterance of a corpus.

    Attributes
    ----------
    utt_id : str
        Unique key (may contain ``/``).
    path : str
        Audio file path or ``cmd |`` pipe.
    start, end : float or None
        Segment bounds in seconds within ``path`` (None = whole file).
    spk_id : str or None
        Speaker label (from ``utt2spk`` / manifest / tree).
    duration : float or None
        Length in seconds (None until measured; unknown for unreadable files).
    dataset : str or None
        Dataset name (audio tree input).
    audio : np.ndarray of shape (T,), float32, or None
        The waveform itself, for utterances that exist only in memory (e.g. decoded by a training iterator);
        ``path`` is then a description only and ``sample_rate`` is required.
    sample_rate : int or None
        Rate of ``audio`` in Hz.
    """

    utt_id: str
    path: str
    start: Optional[float] = None
    end: Optional[float] = None
    spk_id: Optional[str] = None
    duration: Optional[float] = None
    dataset: Optional[str] = None
    audio: Optional[object] = dataclasses.field(default=None, repr=False, compare=False)
    sample_rate: Optional[int] = None


def read_kv(path: Path, min_fields: int = 2, rest: bool = True) -> List[tuple]:
    """Read a Kaldi-style ``key value...`` file into ``[(key, value), ...]`` keeping file order.

    With ``rest`` the value is the remainder of the line after the first whitespace (paths with spaces,
    pipes); otherwise the tuple holds every whitespace-separated field.

    Raises
    ------
    CorpusError
        A non-empty line with fewer than ``min_fields`` fields (names file and line number).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(maxsplit=1) if rest else line.split()
            if len(fields) < 2 or (not rest and len(fields) < min_fields):
                raise CorpusError(f"{path}:{n}: expected at least {min_fields} fields, got {line!r}")
            out.append(tuple(fields))
    return out


def read_utt2spk(path: str | os.PathLike) -> Dict[str, str]:
    """Read a Kaldi ``utt2spk`` file (``utt_id spk_id`` per line) into a dict, keeping file order.

    Raises
    ------
    CorpusError
        A line without exactly two fields, or a duplicate utterance id (names file and line).
    """
    rows = read_kv(Path(path), min_fields=2, rest=False)
    for r in rows:
        if len(r) != 2:
            raise CorpusError(f"{path}: expected 'utt_id spk_id', got {' '.join(r)!r}")
    return {k: v[1] for k, v in _unique_dict(rows, Path(path)).items()}


def read_spk2utt(path: str | os.PathLike) -> Dict[str, List[str]]:
    """Read a Kaldi ``spk2utt`` file (``spk_id utt1 utt2 ...`` per line) into a dict of lists.

    Raises
    ------
    CorpusError
        A line with fewer than two fields (names file and line).
    """
    return {r[0]: list(r[1:]) for r in read_kv(Path(path), min_fields=2, rest=False)}


def _unique_dict(pairs: Iterable[tuple], path: Path) -> Dict[str, tuple]:
    d: Dict[str, tuple] = {}
    for p in pairs:
        if p[0] in d:
            raise CorpusError(f"{path}: duplicate utterance id {p[0]!r}")
        d[p[0]] = p
    return d


def load_kaldi_dir(data_dir: str | os.PathLike) -> List[Utterance]:
    """Read a Kaldi data directory.

    Returns
    -------
    list of Utterance
        In ``wav.scp`` order (or ``segments`` order when present). ``duration`` filled from ``utt2dur``
        when that file exists.

    Raises
    ------
    CorpusError
        Missing ``wav.scp``, duplicate ids, lines without a path, segments naming unknown recordings.
    """
    d = Path(data_dir)
    if not (d / "wav.scp").is_file():
        raise CorpusError(f"{d}: no wav.scp (expected a Kaldi data dir)")
    wav = _unique_dict(read_kv(d / "wav.scp"), d / "wav.scp")
    utts: List[Utterance] = []
    if (d / "segments").is_file():
        segs = read_kv(d / "segments", min_fields=4, rest=False)
        _unique_dict(segs, d / "segments")
        for s in segs:
            if s[1] not in wav:
                raise CorpusError(f"{d / 'segments'}: utterance {s[0]!r} names unknown recording {s[1]!r}")
            try:
                start, end = float(s[2]), float(s[3])
            except ValueError as e:
                raise CorpusError(f"{d / 'segments'}: utterance {s[0]!r} has bad times {s[2:4]}") from e
            utts.append(Utterance(s[0], wav[s[1]][1], start, end, duration=(end - start) if end > 0 else None))
    else:
        utts = [Utterance(k, v[1]) for k, v in wav.items()]
    if (d / "utt2spk").is_file():
        u2s = read_utt2spk(d / "utt2spk")
        for u in utts:
            u.spk_id = u2s.get(u.utt_id)
    elif (d / "spk2utt").is_file():
        u2s = {utt: spk for spk, us in read_spk2utt(d / "spk2utt").items() for utt in us}
        for u in utts:
            u.spk_id = u2s.get(u.utt_id)
    if (d / "utt2dur").is_file():
        durs = {k: v for k, v in read_kv(d / "utt2dur")}
        for u in utts:
            if u.utt_id in durs and u.duration is None:
                u.duration = float(durs[u.utt_id])
    return utts


def load_manifest_tsv(path: str | os.PathLike) -> List[Utterance]:
    """Read an ESPnet3 manifest ``utt_id<TAB>wav_path<TAB>text<TAB>speaker_id`` (header line optional).

    Raises
    ------
    CorpusError
        Lines with fewer than 2 columns, duplicate ids.
    """
    utts, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if n == 1 and cols[0].lower() in ("utt_id", "id", "key"):
                continue
            if len(cols) < 2 or not cols[1].strip():
                raise CorpusError(f"{path}:{n}: expected utt_id<TAB>wav_path[<TAB>text<TAB>speaker_id], got {line!r}")
            if cols[0] in seen:
                raise CorpusError(f"{path}: duplicate utterance id {cols[0]!r}")
            seen.add(cols[0])
            utts.append(Utterance(cols[0], cols[1], spk_id=cols[3] if len(cols) > 3 and cols[3] else None))
    return utts


def load_audio_tree(root: str | os.PathLike) -> List[Utterance]:
    """Read ``root/<dataset>/<speaker>/<utt>.<ext>`` (3D-Speaker pipeline layout).

    Keys are ``<dataset>/<speaker>/<utt>`` (extension stripped), sorted with ``LC_ALL=C`` order; speaker ids
    are ``<dataset>/<speaker>`` so equal speaker names in two datasets stay apart.

    Raises
    ------
    CorpusError
        No audio found, or two files differing only in extension.
    """
    root = Path(root)
    utts, seen = [], set()
    for p in sorted(root.glob("*/*/*")):
        if not p.is_file() or p.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        ds, spk = p.parent.parent.name, p.parent.name
        key = f"{ds}/{spk}/{p.stem}"
        if key in seen:
            raise CorpusError(f"{root}: two audio files map to the same utterance key {key!r}")
        seen.add(key)
        utts.append(Utterance(key, str(p), spk_id=f"{ds}/{spk}", dataset=ds))
    if not utts:
        raise CorpusError(f"{root}: no audio files found as <dataset>/<speaker>/<utt>.<ext>")
    utts.sort(key=lambda u: u.utt_id.encode())
    return utts


def load_corpus(source: str | os.PathLike) -> List[Utterance]:
    """Read a corpus in any supported format (auto-detected).

    A directory with ``wav.scp`` is a Kaldi data dir, a ``.tsv`` file a manifest, any other directory an audio
    tree.

    Raises
    ------
    CorpusError
        Unknown or malformed input.
    """
    p = Path(source)
    if p.is_dir() and (p / "wav.scp").is_file():
        return load_kaldi_dir(p)
    if p.is_file() and p.suffix in (".tsv", ".txt"):
        return load_manifest_tsv(p)
    if p.is_dir():
        return load_audio_tree(p)
    raise CorpusError(f"{p}: not a Kaldi data dir, manifest TSV or audio tree")


def measure_durations(
    utts: List[Utterance], num_threads: int = 8, allow_pipes: bool = False, cache_dir: Optional[Path] = None
) -> Dict[str, str]:
    """Fill ``duration`` (seconds) from audio headers where unknown.

    Header reads run in a thread pool. Utterances whose header cannot be read keep ``duration=None`` and
    their reason is returned (the engine records them in ``errors.tsv``). When ``cache_dir`` is given and
    writable, ``utt2dur`` and ``utt2num_samples`` are written there (Kaldi conventions; native sample rate).

    Returns
    -------
    dict
        ``utt_id -> reason`` for utterances whose header could not be read.
    """
    for u in utts:
        if u.audio is not None and u.duration is None:
            u.duration = len(u.audio) / float(u.sample_rate)
    todo = [u for u in utts if u.duration is None]
    failures: Dict[str, str] = {}
    nsamp: Dict[str, int] = {}

    def one(u: Utterance):
        if is_pipe(u.path) and not allow_pipes:
            return u, None, "wav.scp pipe entry refused (pass --allow_pipes to run commands)"
        try:
            frames, sr = audio_info(u.path, allow_pipes=allow_pipes)
        except AudioLoadingError as e:
            return u, None, e.reason
        if u.start is not None:
            end = u.end if u.end and u.end > 0 else frames / sr
            return u, (max(end - u.start, 0.0), None), None
        return u, (frames / sr, frames), None

    if todo:
        with ThreadPoolExecutor(num_threads) as ex:
            for u, res, err in ex.map(one, todo):
                if err is not None:
                    failures[u.utt_id] = err
                else:
                    u.duration = res[0]
                    if res[1] is not None:
                        nsamp[u.utt_id] = res[1]
        if cache_dir is not None and not failures:
            try:
                with open(Path(cache_dir) / "utt2dur.tmp", "w") as f:
                    f.writelines(f"{u.utt_id} {u.duration:.4f}\n" for u in utts)
                os.replace(Path(cache_dir) / "utt2dur.tmp", Path(cache_dir) / "utt2dur")
                if len(nsamp) == len(utts):
                    with open(Path(cache_dir) / "utt2num_samples.tmp", "w") as f:
                        f.writelines(f"{u.utt_id} {nsamp[u.utt_id]}\n" for u in utts)
                    os.replace(Path(cache_dir) / "utt2num_samples.tmp", Path(cache_dir) / "utt2num_samples")
            except OSError as e:  # read-only data dir: the cache is an optimisation only
                logger.info("could not write utt2dur cache in %s: %s", cache_dir, e)
    return failures


def spk2utt_from(utts: Iterable[Utterance]) -> Dict[str, List[str]]:
    """Group utterance ids by speaker (utterances without a speaker are left out), in input order."""
    out: Dict[str, List[str]] = {}
    for u in utts:
        if u.spk_id is not None:
            out.setdefault(u.spk_id, []).append(u.utt_id)
    return out
