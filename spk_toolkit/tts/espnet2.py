"""ESPnet2's ``tts.sh`` stage 3 on the engine: a TTS data dir (``wav.scp``, ``text``, ``utt2spk`` / ``spk2utt``) in
``text`` order, extracted and exported (:func:`extract_tts_embeddings`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from spk_toolkit.io.datadir import CorpusError, Utterance, load_kaldi_dir, read_spk2utt
from spk_toolkit.tts.export import SCP_PATHS, SPK_MEANS, TTSCorpus, TTSExport, check_tag

logger = logging.getLogger(__name__)


def read_keys(path: str | os.PathLike) -> List[str]:
    """The first field of every non-empty line of a Kaldi-style file (``text``, an scp), in file order.

    Read through :func:`spk_toolkit.io.textio.iter_lines` (the one reader of input files: UTF-8, a byte-order
    mark stripped, CRLF accepted, blank lines skipped).

    Raises
    ------
    CorpusError
        A key appears twice (names the file, the line and the key).
    spk_toolkit.io.textio.TextFileError
        The file cannot be read, or a line is not UTF-8 (``file:line``).
    """
    from spk_toolkit.io.textio import iter_lines

    keys, seen = [], {}
    for n, line in iter_lines(path, what=Path(path).name):
        key = line.split(maxsplit=1)[0]
        if key in seen:
            raise CorpusError(f"{path}:{n}: key {key!r} appears twice (first on line {seen[key]})")
        seen[key] = n
        keys.append(key)
    return keys


def load_tts_corpus(in_folder: str | os.PathLike) -> TTSCorpus:
    """Read an ESPnet TTS data dir (``wav.scp``, ``text``, ``utt2spk``, ``spk2utt``; ``segments`` honoured).

    The output order is ``text``'s (ESPnet's loader pairs ``text`` and ``<tag>.scp`` line by line); without a
    ``text`` file it is ``wav.scp``'s (logged). Utterances of ``wav.scp`` that ``text`` does not list are not
    embedded (logged: ESPnet's loader would refuse them in ``<tag>.scp``).

    Parameters
    ----------
    in_folder : path
        The data dir ``tts.sh`` passes (``dump/raw/org/<dset>`` or ``dump/raw/<dset>``).

    Returns
    -------
    TTSCorpus

    Raises
    ------
    CorpusError
        No ``wav.scp``; ``text`` lists utterances that ``wav.scp`` (or ``segments``) does not (named, with the
        count); a key twice in ``text``; ``spk2utt`` and ``utt2spk`` disagree on an utterance's speaker;
        ``spk2utt`` lists an utterance twice.
    """
    d = Path(in_folder)
    utts = load_kaldi_dir(d)
    by_id = {u.utt_id: u for u in utts}
    if (d / "text").is_file():
        keys = read_keys(d / "text")
        missing = [k for k in keys if k not in by_id]
        if missing:
            raise CorpusError(f"{d / 'text'}: {len(missing)} utterance(s) have no audio in "
                              f"{d / ('segments' if (d / 'segments').is_file() else 'wav.scp')}, e.g. {missing[:5]}")
        extra = len(by_id) - len(keys)
        if extra:
            logger.info("%s: %d utterance(s) of wav.scp are not in text and are not embedded", d, extra)
        order_from = "text"
    else:
        keys = [u.utt_id for u in utts]
        logger.warning("%s has no text file: writing <tag>.scp in wav.scp order", d)
        order_from = "wav.scp"
    ordered = [by_id[k] for k in keys]
    spk2utt = _speaker_map(d, ordered)
    return TTSCorpus(ordered, keys, spk2utt, order_from)


def _speaker_map(d: Path, utts: Sequence[Utterance]) -> Dict[str, List[str]]:
    """``spk2utt`` (file order) restricted to ``utts``, checked against their ``utt2spk`` labels."""
    wanted = {u.utt_id: u.spk_id for u in utts}
    if not (d / "spk2utt").is_file():
        out: Dict[str, List[str]] = {}
        for u in utts:
            if u.spk_id is not None:
                out.setdefault(u.spk_id, []).append(u.utt_id)
        return out
    raw = read_spk2utt(d / "spk2utt")
    out, owner, unknown = {}, {}, 0
    for spk, us in raw.items():
        for u in us:
            if u in owner:
                raise CorpusError(f"{d / 'spk2utt'}: utterance {u!r} listed for speakers {owner[u]!r} and {spk!r}")
            owner[u] = spk
            if u not in wanted:
                unknown += 1
                continue
            if wanted[u] is not None and wanted[u] != spk:
                raise CorpusError(f"{d}: spk2utt puts {u!r} under {spk!r}, utt2spk under {wanted[u]!r}")
            out.setdefault(spk, []).append(u)
    if unknown:
        logger.info("%s: %d utterance(s) of spk2utt are not embedded (not in text); speaker means leave them out",
                    d / "spk2utt", unknown)
    lost = [u for u in wanted if u not in owner]
    if lost:
        logger.warning("%s: %d utterance(s) have no speaker in spk2utt (e.g. %s); they count in no speaker mean",
                       d / "spk2utt", len(lost), lost[:3])
    return out


def _is_driver(executor: Optional[str], parallel) -> bool:
    """False only on torchrun ranks > 0 (they serve rank 0, which exports)."""
    if executor != "torchrun":
        return True
    from spk_toolkit.parallel import torchrun_launch

    launch = torchrun_launch()
    return launch is None or launch["rank"] == 0


def default_options_of(toolkit: str, model=None) -> dict:
    """Engine options a backend implies (``rawnet``: ``{"crops": 10, "crop_duration": 3.0}``), else ``{}``.

    Parameters
    ----------
    toolkit : str
        Backend registry name (unknown names give ``{}``).
    model : EmbeddingModel, optional
        A built backend: its class's attribute is used instead.

    Returns
    -------
    dict
        A copy of the backend class's ``default_options`` (:class:`spk_toolkit.engine.ExtractOptions` fields).
    """
    if model is not None:
        return dict(getattr(type(model), "default_options", {}) or {})
    from spk_toolkit.backends.base import BACKENDS, _import_all

    _import_all()
    cls = BACKENDS.get(toolkit)
    return dict(getattr(cls, "default_options", {}) or {}) if cls is not None else {}


def extract_tts_embeddings(in_folder: str | os.PathLike, out_folder: str | os.PathLike, spk_embed_tag: str = "spk_embed",
                           toolkit: str = "espnet", model=None, model_kwargs: Optional[dict] = None,
                           executor: Optional[str] = None, parallel=None, spk_mean: str = "raw",
                           scp_paths: str = "espnet", **options) -> Optional[dict]:
    """ESPnet's speaker-embedding stage for one data dir, on the engine (any executor, resumable).

    Parameters
    ----------
    in_folder : path
        ESPnet/Kaldi data dir (``wav.scp``, ``text``, ``utt2spk``, ``spk2utt``; :func:`load_tts_corpus`).
    out_folder : path
        Gets ``<tag>.ark/.scp``, ``spk_<tag>.ark/.scp`` and the engine's run files (a rerun resumes).
    spk_embed_tag : str
        ESPnet's ``--spk_embed_tag`` (``xvector`` in most recipes).
    toolkit, model, model_kwargs, executor, parallel
        As :func:`spk_toolkit.engine.extract` (``toolkit``: a backend name: ``espnet``, ``rawnet``,
        ``speechbrain``, ``resemblyzer``).
    spk_mean : {"raw", "l2"}
        See :func:`export_tts` (``raw`` = ESPnet's).
    scp_paths : {"espnet", "absolute"}
        See :func:`export_tts`.
    **options
        :class:`spk_toolkit.engine.ExtractOptions` fields (``batch_bins``, ``num_workers``, ``crops`` ...).
        The backend's ``default_options`` fill what is not given (``rawnet``: ESPnet's 10 crops of 3 s,
        :func:`default_options_of`). ``average_crops=False`` is refused (TTS needs one ``(D,)`` vector per
        utterance).

    Returns
    -------
    dict or None
        The engine's summary plus ``"tts"``: the exported paths, tag, order source and speaker-mean mode;
        None on torchrun ranks > 0 (rank 0 exports).

    Raises
    ------
    CorpusError
        Malformed data dir (before any model is loaded).
    ExtractionError
        From the engine (error policy, lock, worker failure).
    TTSExportError
        Utterances of ``text`` could not be embedded (named; the four output files are absent afterwards).
    ValueError
        Bad tag, ``spk_mean``, ``scp_paths``, or ``average_crops=False``.
    """
    from spk_toolkit.engine import extract

    check_tag(spk_embed_tag)
    if options.get("average_crops") is False:
        raise ValueError("TTS needs one (D,) embedding per utterance: average_crops must stay true")
    if spk_mean not in SPK_MEANS or scp_paths not in SCP_PATHS:
        raise ValueError(f"spk_mean must be one of {SPK_MEANS} and scp_paths one of {SCP_PATHS}")
    corpus = load_tts_corpus(in_folder)
    for k, v in default_options_of(toolkit, model).items():
        options.setdefault(k, v)
    export = TTSExport(spk_embed_tag, corpus, spk_mean, scp_paths, out_folder_as_given=os.fspath(out_folder))
    summary = extract(corpus.utts, out_folder, toolkit=toolkit, model=model, model_kwargs=model_kwargs,
                      executor=executor, parallel=parallel, exports=[export], **options)
    if summary is None:
        return None
    summary["tts"] = {**export.result, "spk_embed_tag": spk_embed_tag, "order": corpus.order_from,
                      "spk_mean": spk_mean, "speakers": len(corpus.spk2utt)}
    return summary
