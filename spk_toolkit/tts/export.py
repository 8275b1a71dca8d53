"""ESPnet's TTS files from an engine run: ``<tag>.ark/.scp`` in ``text`` order, ``spk_<tag>.ark/.scp`` speaker
means, ESPnet3's ``{utt_id}.pt`` layout; :class:`TTSExport` writes them under the run's lock.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from spk_toolkit.engine.export import Export
from spk_toolkit.engine.options import ExtractionError
from spk_toolkit.io.datadir import Utterance

logger = logging.getLogger(__name__)


#: ``spk_mean`` values: average the raw utterance embeddings (ESPnet's convention) or L2-normalised ones.
SPK_MEANS = ("raw", "l2")


#: ``scp_paths`` values (see the module docstring).
SCP_PATHS = ("espnet", "absolute")


class TTSExportError(ExtractionError):
    """Utterances of ``text`` have no embedding, or a speaker map names unknown utterances (nothing exported).

    An :class:`~spk_toolkit.engine.ExtractionError`: the CLIs exit with status 1 (the run failed), one line."""


@dataclasses.dataclass
class TTSCorpus:
    """A TTS data dir as the extractor sees it.

    Attributes
    ----------
    utts : list of Utterance
        The utterances to embed, in the output order (``text`` order, else ``wav.scp`` order).
    keys : list of str
        Their ids, in that order (what ``<tag>.scp`` lists).
    spk2utt : dict
        ``speaker -> [utt_id, ...]`` in ``spk2utt`` order, restricted to ``keys`` (speakers left empty are
        dropped); empty without speaker labels.
    order_from : str
        ``"text"``, ``"wav.scp"`` or ``"manifest"``.
    """

    utts: List[Utterance]
    keys: List[str]
    spk2utt: Dict[str, List[str]]
    order_from: str


def _error_reasons(run_dir: Path) -> Dict[str, str]:
    """``utt_id -> reason`` of the run's ``errors.tsv`` (empty when absent or unreadable)."""
    from spk_toolkit.io.rundir import RunDir

    try:
        return RunDir(run_dir).error_reasons()
    except (OSError, ValueError):
        return {}


def tts_output_paths(out_folder: str | os.PathLike, spk_embed_tag: str) -> List[Path]:
    """The four files ESPnet reads.

    Returns
    -------
    list of Path
        ``<tag>.ark``, ``<tag>.scp``, ``spk_<tag>.ark``, ``spk_<tag>.scp`` in ``out_folder``.
    """
    o = Path(out_folder)
    return [o / f"{spk_embed_tag}.ark", o / f"{spk_embed_tag}.scp", o / f"spk_{spk_embed_tag}.ark",
            o / f"spk_{spk_embed_tag}.scp"]


def remove_tts_outputs(out_folder: str | os.PathLike, spk_embed_tag: str) -> List[str]:
    """Remove the four files of :func:`tts_output_paths` (scp first, so no scp ever points into a missing ark).

    Returns
    -------
    list of str
        The paths removed.
    """
    removed = []
    paths = tts_output_paths(out_folder, spk_embed_tag)
    for p in (paths[1], paths[3], paths[0], paths[2]):
        if p.exists():
            p.unlink()
            removed.append(str(p))
    return removed


def _rewrite_scp_refs(scp: Path, ark_ref: str) -> None:
    """Point every line of ``scp`` at ``ark_ref`` (keeping each offset): ESPnet's ``out_folder/<tag>.ark``."""
    from spk_toolkit.io.atomic import atomic_write_text

    lines = []
    for line in scp.read_text(encoding="utf-8").splitlines():
        key, ref = line.split(maxsplit=1)
        lines.append(f"{key} {ark_ref}:{ref.rsplit(':', 1)[1]}\n")
    atomic_write_text(scp, "".join(lines))


def check_tag(tag: str) -> str:
    """Validate ``--spk_embed_tag`` (a plain file name stem); returns it.

    Raises
    ------
    ValueError
        Empty, contains ``/`` or whitespace, or starts with ``.``.
    """
    if not tag or "/" in tag or os.sep in tag or tag.startswith(".") or any(c.isspace() for c in tag):
        raise ValueError(f"--spk_embed_tag must be a plain file name stem, got {tag!r}")
    return tag


def export_tts(run_dir: str | os.PathLike, spk_embed_tag: str, keys: Sequence[str],
               spk2utt: Mapping[str, Sequence[str]], spk_mean: str = "raw", scp_paths: str = "espnet",
               out_folder_as_given: Optional[str] = None) -> Dict[str, str]:
    """Write ``<tag>.ark/.scp`` (``keys`` order) and ``spk_<tag>.ark/.scp`` (``spk2utt`` order) from an engine run.

    Parameters
    ----------
    run_dir : path
        An :func:`spk_toolkit.engine.extract` output directory (its ``summary.json`` names the embeddings).
    spk_embed_tag : str
    keys : sequence of str
        Utterance ids in the order ``<tag>.scp`` must have (``text`` order).
    spk2utt : mapping
        ``speaker -> utterances`` in the order ``spk_<tag>.scp`` must have; every utterance must be in ``keys``.
    spk_mean : {"raw", "l2"}
        ``raw``: the plain mean of the speaker's utterance embeddings (ESPnet's ``extract_spk_embed.py``);
        ``l2``: the mean of the L2-normalised utterance embeddings (not re-normalised). Computed in float64,
        stored as float32 (:func:`spk_toolkit.scoring.speaker_means`).
    scp_paths : {"espnet", "absolute"}
        How scp entries name the ark (module docstring).
    out_folder_as_given : str, optional
        ``out_folder`` as the user spelled it (for ``scp_paths="espnet"``); default ``str(run_dir)``.

    Returns
    -------
    dict
        ``{"utt_scp", "utt_ark", "spk_scp", "spk_ark"}`` paths.

    Raises
    ------
    TTSExportError
        Utterances of ``keys`` have no embedding (count, examples and their reasons from ``errors.tsv``); the
        four output files are removed first, so no stale or partial export remains.
    ValueError
        Unknown ``spk_mean`` / ``scp_paths``, a bad tag, or an embedding that is not a float vector ``(D,)``.
    """
    from spk_toolkit.io.rundir import RunDir
    from spk_toolkit.io.storage import KaldiArkWriter, open_reader
    from spk_toolkit.scoring import speaker_means

    check_tag(spk_embed_tag)
    if spk_mean not in SPK_MEANS:
        raise ValueError(f"spk_mean must be one of {SPK_MEANS}, got {spk_mean!r}")
    if scp_paths not in SCP_PATHS:
        raise ValueError(f"scp_paths must be one of {SCP_PATHS}, got {scp_paths!r}")
    run_dir = Path(run_dir)
    remove_tts_outputs(run_dir, spk_embed_tag)
    with open_reader(run_dir) as emb:
        missing = [k for k in keys if k not in emb]
        if missing:
            why = _error_reasons(run_dir)
            eg = "; ".join(f"{k}: {why.get(k, 'not extracted')}" for k in missing[:5])
            raise TTSExportError(
                f"{len(missing)} of {len(keys)} utterance(s) in text have no speaker embedding ({eg}); ESPnet's "
                f"loader needs one per line of text: fix or remove them (utils/fix_data_dir.sh) and rerun "
                f"(finished shards are reused); see {RunDir(run_dir).errors_path}")
        stray = sorted({u for us in spk2utt.values() for u in us} - set(keys))
        if stray:
            raise TTSExportError(f"spk2utt names {len(stray)} utterance(s) that are not exported, e.g. {stray[:5]}")
        paths = {}
        with KaldiArkWriter(run_dir, spk_embed_tag) as w:
            for k in keys:
                v = np.asarray(emb[k])
                if v.ndim != 1 or v.dtype.kind != "f":
                    raise ValueError(f"{k}: expected a float embedding (D,), got {v.dtype} {v.shape} "
                                     "(crops must be averaged for TTS)")
                w.write(k, v.astype(np.float32, copy=False))
        paths["utt_scp"], paths["utt_ark"] = str(w.path), str(w.ark_path)
        if spk2utt:
            means = speaker_means(emb, spk2utt={s: list(us) for s, us in spk2utt.items()},
                                  normalize=spk_mean == "l2")
            with KaldiArkWriter(run_dir, f"spk_{spk_embed_tag}") as w:
                for spk in spk2utt:
                    w.write(spk, means[spk].astype(np.float32))
            paths["spk_scp"], paths["spk_ark"] = str(w.path), str(w.ark_path)
        else:
            logger.warning("no speaker labels (spk2utt / utt2spk): spk_%s.scp not written", spk_embed_tag)
    if scp_paths == "espnet":
        given = out_folder_as_given if out_folder_as_given is not None else str(run_dir)
        for kind in ("utt", "spk"):
            if f"{kind}_scp" in paths:
                stem = Path(paths[f"{kind}_ark"]).name
                _rewrite_scp_refs(Path(paths[f"{kind}_scp"]), os.path.join(given, stem))
    return paths


def pt_path(split_dir: str | os.PathLike, utt_id: str) -> Path:
    """``split_dir / f"{utt_id}.pt"``, as ESPnet3's runner names it (a ``/`` in the id makes sub-directories).

    Raises
    ------
    ValueError
        An id that would leave ``split_dir`` (absolute, or with an empty, ``.`` or ``..`` path component).
    """
    parts = utt_id.split("/")
    if utt_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"utterance id {utt_id!r} cannot be a file name under {split_dir} (ESPnet3 .pt layout)")
    return Path(split_dir) / f"{utt_id}.pt"


def write_pt_layout(run_dir: str | os.PathLike, split_dir: str | os.PathLike, keys: Sequence[str]) -> int:
    """Write ESPnet3's layout: one ``{utt_id}.pt`` per utterance, a float32 tensor ``(D,)``.

    Each file is ``torch.save`` of a plain tensor (loadable with ``torch.load(path, weights_only=True)``),
    committed atomically; existing files are replaced (ESPnet3's runner would skip them, keeping embeddings of
    an older model).

    Parameters
    ----------
    run_dir : path
        The split's engine run (its embeddings are read through the storage registry).
    split_dir : path
        ``{save_path}/{spk_embed_tag}/{split}``.
    keys : sequence of str
        The utterances to write (all must have an embedding).

    Returns
    -------
    int
        Files written.

    Raises
    ------
    KeyError
        An utterance without an embedding.
    ValueError
        An id unusable as a file name (:func:`pt_path`).
    """
    import torch

    from spk_toolkit.io.atomic import atomic_path
    from spk_toolkit.io.storage import open_reader

    targets = [(k, pt_path(split_dir, k)) for k in keys]
    n = 0
    with open_reader(run_dir) as emb:
        for k, p in targets:
            p.parent.mkdir(parents=True, exist_ok=True)
            t = torch.from_numpy(np.array(emb[k], dtype=np.float32).reshape(-1))
            with atomic_path(p, fsync=False) as tmp:
                torch.save(t, tmp)
            n += 1
    return n


class TTSExport(Export):
    """ESPnet's four TTS files (:func:`export_tts`) and, optionally, ESPnet3's ``.pt`` layout
    (:func:`write_pt_layout`), written by the engine's driver under the run's lock and named in ``summary.json``
    (``tts_utt_scp``, ``tts_utt_ark``, ``tts_spk_scp``, ``tts_spk_ark``).

    Parameters
    ----------
    spk_embed_tag : str
    corpus : TTSCorpus
        ``keys`` (the ``<tag>.scp`` order) and ``spk2utt`` (the ``spk_<tag>.scp`` order).
    spk_mean, scp_paths, out_folder_as_given
        As :func:`export_tts`.
    pt_dir : path, optional
        Also write ``{utt_id}.pt`` files there (ESPnet3's layout; the directory is recorded, not each file).

    Attributes
    ----------
    result : dict
        After :meth:`write`: :func:`export_tts`'s paths, plus ``pt_dir`` / ``pt_files`` with a ``.pt`` layout.
    """

    def __init__(self, spk_embed_tag: str, corpus: TTSCorpus, spk_mean: str = "raw", scp_paths: str = "espnet",
                 out_folder_as_given: Optional[str] = None, pt_dir: Optional[str | os.PathLike] = None):
        self.tag, self.corpus, self.spk_mean, self.scp_paths = check_tag(spk_embed_tag), corpus, spk_mean, scp_paths
        self.given, self.pt_dir = out_folder_as_given, pt_dir
        self.result: Dict[str, object] = {}

    def paths(self, output_dir: Path) -> List[Path]:
        return tts_output_paths(output_dir, self.tag)

    def write(self, output_dir: Path, summary: dict) -> Dict[str, str]:
        paths = export_tts(output_dir, self.tag, self.corpus.keys, self.corpus.spk2utt, spk_mean=self.spk_mean,
                           scp_paths=self.scp_paths, out_folder_as_given=self.given)
        self.result = dict(paths)
        if self.pt_dir is not None:
            self.result["pt_dir"] = str(self.pt_dir)
            self.result["pt_files"] = write_pt_layout(output_dir, self.pt_dir, self.corpus.keys)
        return {f"tts_{k}": v for k, v in paths.items()}
