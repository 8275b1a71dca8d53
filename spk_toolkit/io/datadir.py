"""Corpus readers: Kaldi data dir, ESPnet3 manifest TSV, audio tree -> :class:`Utterance` records.

Formats (REFERENCE.md):

* **Kaldi data dir**: ``wav.scp`` (``utt_id path`` or ``utt_id cmd ... |``), optional ``segments``
  (``utt_id rec_id start end`` in seconds), ``utt2spk``, ``spk2utt`` (derived from ``utt2spk`` when missing),
  ``utt2dur`` (seconds) / ``utt2num_samples`` read when present, written back as a cache when computed.
* **ESPnet3 manifest TSV**: ``utt_id<TAB>wav_path<TAB>text<TAB>speaker_id``.
* **Audio tree** (3D-Speaker pipeline): ``root/<dataset>/<speaker>/<utt>.<ext>``; key
  ``<dataset>/<speaker>/<utt>`` (``/`` cannot occur inside a path component, so keys never collide).

Every text file is read by :func:`spk_toolkit.io.textio.iter_lines`: UTF-8 with a byte-order mark stripped (and
logged once), ``\r\n`` accepted, blank lines skipped. Malformed input (a duplicate id in any file, a ``wav.scp``
line without a path, a ``segments`` entry naming an unknown recording or with times that are not finite, a negative
start or ``start >= end``, a duration that is not finite or negative, bytes that are not UTF-8) raises
:class:`CorpusError` before any work starts, naming ``file:line`` (docs/bad_input.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from spk_toolkit.io.audio import AudioLoadingError, audio_info, is_pipe
from spk_toolkit.io.textio import TextFileError, iter_lines, parse_seconds

logger = logging.getLogger(__name__)

#: Extensions an audio tree takes without opening the file: what libsndfile (``soundfile.available_formats()``)
#: decodes under its usual names. A file with another extension is opened once (``soundfile.info``) and taken when
#: it decodes; :data:`NOT_AUDIO_EXTENSIONS` are skipped without opening (counted and listed in the log).
AUDIO_EXTENSIONS = (".wav", ".wave", ".wavex", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".sph", ".nist", ".aif",
                    ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64", ".voc", ".paf", ".svx", ".ircam",
                    ".htk", ".xi", ".sds", ".avr", ".wve", ".mpc")
NOT_AUDIO_EXTENSIONS = (".txt", ".lab", ".json", ".jsonl", ".textgrid", ".csv", ".tsv", ".md", ".yaml", ".yml",
                        ".npy", ".npz", ".pt", ".pth", ".lst", ".list", ".scp", ".ark", ".h5", ".log", ".xml",
                        ".html", ".pdf", ".png", ".jpg", ".jpeg", ".zip", ".gz", ".tar", ".py", ".sh")
#: At most this many skipped files are named one by one in the log (the counts are always complete).
TREE_SKIPS_LISTED = 1000


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


def _lines(path: Path, what: str):
    """:func:`spk_toolkit.io.textio.iter_lines` raising :class:`CorpusError`."""
    try:
        yield from iter_lines(path, what)
    except TextFileError as e:
        raise CorpusError(str(e)) from None


def _rows(path: Path, min_fields: int = 2, rest: bool = True, max_fields: Optional[int] = None) -> List[tuple]:
    """``[(line_number, fields), ...]`` of a Kaldi-style file (see :func:`read_kv`)."""
    out = []
    for n, line in _lines(path, path.name):
        line = line.strip()
        fields = tuple(line.split(maxsplit=1) if rest else line.split())
        if len(fields) < 2 or (not rest and len(fields) < min_fields):
            raise CorpusError(f"{path}:{n}: expected at least {min_fields} fields, got {line!r}")
        if max_fields is not None and len(fields) > max_fields:
            raise CorpusError(f"{path}:{n}: expected {max_fields} fields, got {len(fields)}: {line!r}")
        out.append((n, fields))
    return out


def read_kv(path: Path, min_fields: int = 2, rest: bool = True) -> List[tuple]:
    """Read a Kaldi-style ``key value...`` file into ``[(key, value), ...]`` keeping file order.

    With ``rest`` the value is the remainder of the line after the first whitespace (paths with spaces,
    pipes); otherwise the tuple holds every whitespace-separated field. The file is read as UTF-8 (a
    byte-order mark stripped and logged once), ``\r\n`` line ends are accepted and blank lines skipped
    (:func:`spk_toolkit.io.textio.iter_lines`).

    Parameters
    ----------
    path : Path
    min_fields : int
        Fields a line must have (without ``rest``).
    rest : bool
        Split off the key only.

    Returns
    -------
    list of tuple

    Raises
    ------
    CorpusError
        A non-empty line with fewer than ``min_fields`` fields, bytes that are not UTF-8, an unreadable file
        (names file and line number).
    """
    return [f for _, f in _rows(Path(path), min_fields, rest)]


def _unique(rows: Iterable[tuple], path: Path, what: str = "utterance id") -> Dict[str, tuple]:
    """``key -> (line, fields)`` of ``[(line, fields), ...]``; a repeated key is a :class:`CorpusError`."""
    d: Dict[str, tuple] = {}
    for n, f in rows:
        if f[0] in d:
            raise CorpusError(f"{path}:{n}: duplicate {what} {f[0]!r} (first on line {d[f[0]][0]})")
        d[f[0]] = (n, f)
    return d


def read_utt2spk(path: str | os.PathLike) -> Dict[str, str]:
    """Read a Kaldi ``utt2spk`` file (``utt_id spk_id`` per line) into a dict, keeping file order.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    dict
        ``utt_id -> spk_id``.

    Raises
    ------
    CorpusError
        A line without exactly two fields, a duplicate utterance id, bytes that are not UTF-8 (names file and
        line).
    """
    p = Path(path)
    rows = _rows(p, min_fields=2, rest=False)
    for n, r in rows:
        if len(r) != 2:
            raise CorpusError(f"{p}:{n}: expected 'utt_id spk_id', got {' '.join(r)!r}")
    return {k: v[1][1] for k, v in _unique(rows, p).items()}


def read_spk2utt(path: str | os.PathLike) -> Dict[str, List[str]]:
    """Read a Kaldi ``spk2utt`` file (``spk_id utt1 utt2 ...`` per line) into a dict of lists.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    dict
        ``spk_id -> [utt_id, ...]`` in file order.

    Raises
    ------
    CorpusError
        A line with fewer than two fields, a speaker listed twice, an utterance listed under two speakers or
        twice, bytes that are not UTF-8 (names file and line).
    """
    p = Path(path)
    rows = _unique(_rows(p, min_fields=2, rest=False), p, "speaker id")
    owner: Dict[str, tuple] = {}
    for spk, (n, r) in rows.items():
        for utt in r[1:]:
            if utt in owner:
                raise CorpusError(f"{p}:{n}: utterance {utt!r} listed again (already under speaker "
                                  f"{owner[utt][0]!r} on line {owner[utt][1]})")
            owner[utt] = (spk, n)
    return {spk: list(r[1:]) for spk, (n, r) in rows.items()}


def _speaker_coverage(utts: List[Utterance], u2s: Dict[str, str], path: Path) -> None:
    """Attach speakers; warn (count, examples) about utterances without one and entries naming no utterance."""
    ids = set()
    for u in utts:
        u.spk_id = u2s.get(u.utt_id)
        ids.add(u.utt_id)
    no_spk = [u.utt_id for u in utts if u.spk_id is None]
    if no_spk:
        logger.warning("%s: %d of %d utterances have no speaker (e.g. %s); they get no speaker mean",
                       path, len(no_spk), len(utts), ", ".join(repr(x) for x in no_spk[:3]))
    extra = [k for k in u2s if k not in ids]
    if extra:
        logger.warning("%s: %d entries name no utterance of the corpus (e.g. %s); ignored", path, len(extra),
                       ", ".join(repr(x) for x in extra[:3]))


def load_kaldi_dir(data_dir: str | os.PathLike) -> List[Utterance]:
    """Read a Kaldi data directory.

    Every file is read as UTF-8 (a byte-order mark stripped), ``\r\n`` accepted, blank lines skipped; every
    field is checked here, before anything else happens, and a problem names ``file:line``.

    Parameters
    ----------
    data_dir : path-like

    Returns
    -------
    list of Utterance
        In ``wav.scp`` order (or ``segments`` order when present). ``duration`` filled from ``utt2dur``
        when that file exists (or from the segment bounds).

    Raises
    ------
    CorpusError
        Missing ``wav.scp``; a duplicate id in any file; a line without a path; a ``segments`` line that is not
        ``utt_id rec_id start end``, names an unknown recording, has a time that is not a finite number, a
        negative start, or ``start >= end`` (an end of ``-1`` means the end of the recording, as in Kaldi); an
        ``utt2dur`` value that is not a finite duration >= 0; bytes that are not UTF-8.
    """
    d = Path(data_dir)
    if not (d / "wav.scp").is_file():
        raise CorpusError(f"{d}: no wav.scp (expected a Kaldi data dir)")
    wav = _unique(_rows(d / "wav.scp"), d / "wav.scp")
    utts: List[Utterance] = []
    if (d / "segments").is_file():
        sp = d / "segments"
        segs = _unique(_rows(sp, min_fields=4, rest=False, max_fields=4), sp, "segment id")
        for utt_id, (n, s) in segs.items():
            where = f"{sp}:{n}"
            if s[1] not in wav:
                raise CorpusError(f"{where}: utterance {s[0]!r} names unknown recording {s[1]!r} "
                                  f"(not in {d / 'wav.scp'})")
            try:
                start = parse_seconds(s[2], where, "start")
                end = parse_seconds(s[3], where, "end", allow_negative_one=True)
            except TextFileError as e:
                raise CorpusError(f"{e} (segment {s[0]!r})") from None
            if end != -1 and start >= end:
                raise CorpusError(f"{where}: segment {s[0]!r} has start {s[2]} >= end {s[3]} (an empty or "
                                  "reversed segment)")
            utts.append(Utterance(s[0], wav[s[1]][1][1], start, end,
                                  duration=(end - start) if end != -1 else None))
    else:
        utts = [Utterance(k, v[1][1]) for k, v in wav.items()]
    if (d / "utt2spk").is_file():
        _speaker_coverage(utts, read_utt2spk(d / "utt2spk"), d / "utt2spk")
    elif (d / "spk2utt").is_file():
        u2s = {utt: spk for spk, us in read_spk2utt(d / "spk2utt").items() for utt in us}
        _speaker_coverage(utts, u2s, d / "spk2utt")
    if (d / "utt2dur").is_file():
        dp = d / "utt2dur"
        durs = {}
        for utt_id, (n, f) in _unique(_rows(dp, min_fields=2, rest=False, max_fields=2), dp).items():
            try:
                durs[utt_id] = parse_seconds(f[1], f"{dp}:{n}", "duration")
            except TextFileError as e:
                raise CorpusError(f"{e} (utterance {utt_id!r})") from None
        for u in utts:
            if u.utt_id in durs and u.duration is None:
                u.duration = durs[u.utt_id]
    return utts


def load_manifest_tsv(path: str | os.PathLike) -> List[Utterance]:
    """Read an ESPnet3 manifest ``utt_id<TAB>wav_path<TAB>text<TAB>speaker_id`` (header line optional).

    Read as UTF-8 (a byte-order mark stripped), ``\r\n`` accepted, blank lines skipped.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    list of Utterance
        In file order.

    Raises
    ------
    CorpusError
        Lines with fewer than 2 columns or an empty id or path, duplicate ids, bytes that are not UTF-8 (names
        file and line).
    """
    utts, seen = [], {}
    first = True
    for n, line in _lines(Path(path), "manifest"):
        cols = line.split("\t")
        if first and cols[0].strip().lower() in ("utt_id", "id", "key"):
            first = False
            continue
        first = False
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            raise CorpusError(f"{path}:{n}: expected utt_id<TAB>wav_path[<TAB>text<TAB>speaker_id], got {line!r}")
        if cols[0] in seen:
            raise CorpusError(f"{path}:{n}: duplicate utterance id {cols[0]!r} (first on line {seen[cols[0]]})")
        seen[cols[0]] = n
        utts.append(Utterance(cols[0], cols[1], spk_id=cols[3] if len(cols) > 3 and cols[3] else None))
    return utts


def load_audio_tree(root: str | os.PathLike) -> List[Utterance]:
    """Read every audio file under ``root``; the layout is ``root/<dataset>/<speaker>/<utt>.<ext>`` (3D-Speaker).

    Keys are the path below ``root`` without its extension (``<dataset>/<speaker>/<utt>``, deeper folders kept:
    ``<dataset>/<speaker>/<sub>/<utt>``), sorted in ``LC_ALL=C`` order; speaker ids are ``<dataset>/<speaker>``, so
    equal speaker names in two datasets stay apart. Nothing readable is left out silently: a file of
    :data:`AUDIO_EXTENSIONS` is taken at any depth (one above the layout gets no speaker, and a warning counts
    those), a file with another extension is taken when libsndfile opens it, and every file skipped (hidden,
    :data:`NOT_AUDIO_EXTENSIONS`, not decodable) is counted per reason in one warning and named in the log.

    Parameters
    ----------
    root : str or PathLike
        The tree's root directory.

    Returns
    -------
    list of Utterance

    Raises
    ------
    CorpusError
        No audio found (the skipped files counted), or two files differing only in extension.
    """
    root = Path(root)
    utts: List[Utterance] = []
    seen: Dict[str, str] = {}
    skipped: Dict[str, List[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            p = Path(dirpath) / name
            why = _tree_skip_reason(p)
            if why:
                skipped.setdefault(why, []).append(str(p))
                continue
            parts = (*rel_dir, p.stem)
            key = "/".join(parts)
            if key in seen:
                raise CorpusError(f"{root}: two audio files map to the same utterance key {key!r}: {seen[key]} and {p}")
            seen[key] = str(p)
            spk = f"{parts[0]}/{parts[1]}" if len(parts) >= 3 else None
            utts.append(Utterance(key, str(p), spk_id=spk, dataset=parts[0] if len(parts) >= 2 else None))
    _log_tree_skips(root, skipped, sum(u.spk_id is None for u in utts))
    if not utts:
        found = "; ".join(f"{len(v)} {k}" for k, v in sorted(skipped.items())) or "no files at all"
        raise CorpusError(f"{root}: no audio files found (as <dataset>/<speaker>/<utt>.<ext>; skipped: {found})")
    utts.sort(key=lambda u: u.utt_id.encode())
    return utts


def _tree_skip_reason(p: Path) -> Optional[str]:
    """Why an audio tree leaves out file ``p`` (``None``: it is taken)."""
    if p.name.startswith("."):
        return "hidden"
    if not p.is_file():
        return "not a regular file"
    ext = p.suffix.lower()
    if ext in AUDIO_EXTENSIONS:
        return None
    if ext in NOT_AUDIO_EXTENSIONS:
        return "not audio by extension"
    import soundfile as sf

    try:
        sf.info(str(p))
    except Exception:  # noqa: BLE001  (libsndfile's errors vary by file; any of them means "not decodable")
        return "not decodable by libsndfile"
    return None


def _log_tree_skips(root: Path, skipped: Dict[str, List[str]], no_speaker: int) -> None:
    if no_speaker:
        logger.warning("%s: %d audio file(s) above <dataset>/<speaker>/ have no speaker id (embedded, left out of "
                       "speaker means and trials)", root, no_speaker)
    if not skipped:
        return
    logger.warning("%s: %d file(s) skipped: %s (each named in the log)", root, sum(map(len, skipped.values())),
                   ", ".join(f"{len(v)} {k}" for k, v in sorted(skipped.items())))
    listed = 0
    for why, paths in sorted(skipped.items()):
        for path in paths[:max(0, TREE_SKIPS_LISTED - listed)]:
            logger.info("skipped (%s): %s", why, path)
        listed += min(len(paths), max(0, TREE_SKIPS_LISTED - listed))
    if listed < sum(map(len, skipped.values())):
        logger.info("... and %d more skipped file(s)", sum(map(len, skipped.values())) - listed)


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


def timed_map(fn: Callable, items: Sequence, num_threads: int, timeout, on_timeout: Callable) -> Iterator:
    """``fn(item)`` for every item, in order, on ``num_threads`` daemon threads, each call bounded by ``timeout``.

    A call still running ``timeout`` seconds after it started yields ``on_timeout(item)`` instead; its thread is
    abandoned (a daemon: it never keeps the process alive, and a fresh thread takes its place), so one hung
    file system call costs at most ``timeout`` seconds and Ctrl-C always gets out at once.

    Parameters
    ----------
    fn : callable
        ``fn(item) -> result``.
    items : sequence
    num_threads : int
        Concurrent calls (>= 1).
    timeout : float or callable
        Seconds per call (> 0), or ``timeout(item) -> seconds``.
    on_timeout : callable
        ``on_timeout(item) -> result`` for a call that ran out of time.

    Yields
    ------
    object
        The result of each item, in input order.

    Raises
    ------
    Exception
        Whatever ``fn`` raised, re-raised in the caller's thread.
    """
    import threading
    import time

    n = len(items)
    results: list = [None] * n
    done = [False] * n
    started: Dict[int, float] = {}
    cond = threading.Condition()
    nxt = [0]

    def worker():
        while True:
            with cond:
                if nxt[0] >= n:
                    return
                i = nxt[0]
                nxt[0] += 1
                started[i] = time.monotonic()
            try:
                r = (True, fn(items[i]))
            except BaseException as e:  # noqa: B902 - re-raised in the caller
                r = (False, e)
            with cond:
                if not done[i]:
                    results[i], done[i] = r, True
                cond.notify_all()

    def spawn():
        threading.Thread(target=worker, daemon=True, name="spk-header").start()

    for _ in range(max(1, min(int(num_threads), n))):
        spawn()
    for i in range(n):
        with cond:
            while not done[i]:
                t0 = started.get(i)
                limit = timeout(items[i]) if callable(timeout) else timeout
                left = limit if t0 is None else limit - (time.monotonic() - t0)
                if t0 is not None and left <= 0:
                    results[i], done[i] = (True, on_timeout(items[i])), True
                    spawn()
                    break
                cond.wait(min(max(left, 0.01), 1.0))
            ok, r = results[i]
            results[i] = None
        if not ok:
            raise r
        yield r


def measure_durations(
    utts: List[Utterance], num_threads: int = 8, allow_pipes: bool = False, cache_dir: Optional[Path] = None,
    header_timeout: float = 30.0, pipe_timeout: float = 600.0,
) -> Dict[str, str]:
    """Fill ``duration`` (seconds) from audio headers where unknown.

    Header reads run on daemon threads (:func:`timed_map`), each bounded by ``header_timeout`` (pipes by
    ``pipe_timeout``): special files are refused without being opened, so a FIFO costs nothing, and a hung read
    costs at most the timeout. Utterances whose header cannot be read keep ``duration=None`` and their reason
    is returned (the engine records them in ``errors.tsv``). When ``cache_dir`` is given and writable,
    ``utt2dur`` and ``utt2num_samples`` are written there atomically (Kaldi conventions; native sample rate).

    Parameters
    ----------
    utts : list of Utterance
        Updated in place.
    num_threads : int
        Concurrent header reads.
    allow_pipes : bool
        Run ``cmd |`` entries (refused otherwise).
    cache_dir : Path, optional
        The data directory, for the ``utt2dur`` cache.
    header_timeout, pipe_timeout : float
        Seconds per header read and per pipe command.

    Returns
    -------
    dict
        ``utt_id -> reason`` for utterances whose header could not be read (never raised: each is one
        ``errors.tsv`` line; a cache that cannot be written is logged and ignored).
    """
    from spk_toolkit.io.atomic import atomic_write_text

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
            frames, sr = audio_info(u.path, allow_pipes=allow_pipes, pipe_timeout=pipe_timeout)
        except AudioLoadingError as e:
            return u, None, e.reason
        if u.start is not None:
            end = u.end if u.end and u.end > 0 else frames / sr
            return u, (max(end - u.start, 0.0), None), None
        return u, (frames / sr, frames), None

    def limit(u: Utterance) -> float:  # a pipe is killed by its own timeout first (its message is the precise one)
        return pipe_timeout + 5.0 if is_pipe(u.path) and allow_pipes else header_timeout

    def late(u: Utterance):
        return u, None, f"header read timed out after {limit(u):g} s"

    if todo:
        for u, res, err in timed_map(one, todo, num_threads, limit, late):
            if err is not None:
                failures[u.utt_id] = err
            else:
                u.duration = res[0]
                if res[1] is not None:
                    nsamp[u.utt_id] = res[1]
        if cache_dir is not None and not failures:
            try:
                atomic_write_text(Path(cache_dir) / "utt2dur", "".join(f"{u.utt_id} {u.duration:.4f}\n" for u in utts))
                if len(nsamp) == len(utts):
                    atomic_write_text(Path(cache_dir) / "utt2num_samples",
                                      "".join(f"{u.utt_id} {nsamp[u.utt_id]}\n" for u in utts))
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
