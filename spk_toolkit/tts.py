"""Speaker embeddings for ESPnet TTS recipes on the engine: ESPnet2's ``tts.sh`` stage 3 and ESPnet3's x-vector runner.

ESPnet2 (``egs2/TEMPLATE/tts1/pyscripts/utils/extract_spk_embed.py in_folder out_folder``) writes, per data dir::

    out_folder/<tag>.ark, <tag>.scp          one embedding (D,) float32 per utterance, in the key order of
                                              in_folder/text (ESPnet's iterable loader reads the scp and text
                                              line by line and refuses another order: "Keys are mismatched")
    out_folder/spk_<tag>.ark, spk_<tag>.scp  one speaker mean (D,) float32 per speaker, in spk2utt order

:func:`extract_tts_embeddings` writes exactly these, from one run of :func:`spk_toolkit.engine.extract` in
``out_folder`` (whose ``plan.json``, ``shards/``, ``embeddings.npz``, ``errors.tsv`` and ``summary.json`` make the
run resumable and the errors visible): the corpus is handed to the engine as records in ``text`` order, so the
engine's input order is ``text`` order; the speaker means are :func:`spk_toolkit.scoring.speaker_means` of the
stored utterance embeddings. An utterance listed in ``text`` that has no embedding (its audio failed, or it is
missing from ``wav.scp``) is an error: ESPnet's loader would fail on it later, so nothing is exported and the
message names the utterances and ``errors.tsv``.

scp entries name the ark the way ESPnet's own script does (``scp_paths="espnet"``): ``<out_folder>/<tag>.ark:<offset>``
with ``out_folder`` exactly as given, so a relative ``out_folder`` (``tts.sh`` passes ``dump/xvector/<dset>``)
gives entries relative to the working directory, which resolve where ESPnet reads them (the recipe directory);
``scp_paths="absolute"`` writes absolute paths, readable from anywhere. spk_toolkit's own Kaldi reader resolves a
relative entry against the scp's directory and its parents first, then the working directory
(:class:`spk_toolkit.io.storage.KaldiArkReader`).

ESPnet3 (``training_config.yaml``'s ``xvector:`` block, :func:`read_espnet3_xvector_config`,
:func:`extract_espnet3_xvectors`): every split's manifest TSV is one engine run; each split gets the files above
and, optionally, ESPnet3's layout ``{save_path}/{spk_embed_tag}/{split}/{utt_id}.pt`` (:func:`write_pt_layout`).

Tools for existing dumps: :func:`check_scp_order` (``check_spk_embed_scp``) and :func:`convert_to_average`
(``convert_to_avg_spk_embed``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from spk_toolkit.engine.export import Export
from spk_toolkit.engine.options import ExtractionError
from spk_toolkit.io.datadir import CorpusError, Utterance, load_kaldi_dir, load_manifest_tsv, read_spk2utt

logger = logging.getLogger(__name__)

#: ``spk_mean`` values: average the raw utterance embeddings (ESPnet's convention) or L2-normalised ones.
SPK_MEANS = ("raw", "l2")
#: ``scp_paths`` values (see the module docstring).
SCP_PATHS = ("espnet", "absolute")


class TTSExportError(ExtractionError):
    """Utterances of ``text`` have no embedding, or a speaker map names unknown utterances (nothing exported).

    An :class:`~spk_toolkit.engine.ExtractionError`: the CLIs exit with status 1 (the run failed), one line."""


# ------------------------------------------------------------------------------------------------ the corpus
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


def read_scp_entries(path: str | os.PathLike) -> List[Tuple[str, str]]:
    """``[(key, value), ...]`` of a Kaldi scp in file order (the value is the rest of the line, e.g. ``ark:offset``).

    Read through :func:`spk_toolkit.io.textio.iter_lines` (UTF-8, a byte-order mark stripped, CRLF accepted,
    blank lines skipped).

    Raises
    ------
    CorpusError
        A line without a value, or a key twice (names ``file:line`` and the key).
    spk_toolkit.io.textio.TextFileError
        The file cannot be read, or a line is not UTF-8.
    """
    from spk_toolkit.io.textio import iter_lines

    rows: List[Tuple[str, str]] = []
    seen: Dict[str, int] = {}
    for n, line in iter_lines(path, what=Path(path).name):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise CorpusError(f"{path}:{n}: expected 'key value', got {line.strip()!r}")
        if fields[0] in seen:
            raise CorpusError(f"{path}:{n}: key {fields[0]!r} appears twice (first on line {seen[fields[0]]})")
        seen[fields[0]] = n
        rows.append((fields[0], fields[1].strip()))
    return rows


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


# ------------------------------------------------------------------------------------------------ the export
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


def _is_driver(executor: Optional[str], parallel) -> bool:
    """False only on torchrun ranks > 0 (they serve rank 0, which exports)."""
    if executor != "torchrun":
        return True
    from spk_toolkit.parallel import torchrun_launch

    launch = torchrun_launch()
    return launch is None or launch["rank"] == 0


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


# ------------------------------------------------------------------------------------------------ ESPnet3
_INTERP = re.compile(r"\$\{([^${}]+)\}")


def resolve_interpolations(cfg: dict, source: str = "<config>") -> dict:
    """Resolve OmegaConf-style ``${key}`` / ``${a.b}`` / ``${oc.env:VAR[,default]}`` references in string values.

    ESPnet3 configs are OmegaConf/Hydra YAML (``save_path: ${data_dir}/x_vectors``). This resolves the forms
    those recipes use, without OmegaConf: a dotted path into the whole config (absolute, as OmegaConf), or an
    environment variable. A value that is exactly one reference keeps the referenced value's type.

    Parameters
    ----------
    cfg : dict
        The parsed YAML (not modified).
    source : str
        Named in error messages.

    Returns
    -------
    dict
        A resolved copy.

    Raises
    ------
    ValueError
        A reference to a missing key or unset variable without default, or a cycle (names the reference).
    """
    def lookup(path: str, stack: Tuple[str, ...]):
        if path.startswith("oc.env:"):
            var, _, default = path[len("oc.env:"):].partition(",")
            v = os.environ.get(var.strip())
            if v is None:
                if not _:
                    raise ValueError(f"{source}: ${{{path}}}: environment variable {var.strip()} is not set")
                v = default.strip().strip("'\"")
            return v
        if path in stack:
            raise ValueError(f"{source}: interpolation cycle {' -> '.join(stack + (path,))}")
        node = cfg
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ValueError(f"{source}: ${{{path}}} refers to a key that does not exist")
        return walk(node, stack + (path,))

    def walk(v, stack=()):
        if isinstance(v, dict):
            return {k: walk(x, stack) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, stack) for x in v]
        if isinstance(v, str):
            m = _INTERP.fullmatch(v.strip())
            if m:
                return lookup(m.group(1).strip(), stack)
            return _INTERP.sub(lambda mm: str(lookup(mm.group(1).strip(), stack)), v)
        return v

    return walk(cfg)


#: The keys of ESPnet3's ``xvector:`` block (LibriTTS VITS recipe).
XVECTOR_KEYS = ("toolkit", "pretrained_model", "device", "spk_embed_tag", "save_path", "batch_size",
                "manifest_paths", "splits")


@dataclasses.dataclass
class XVectorConfig:
    """ESPnet3's ``xvector:`` block, resolved.

    Attributes
    ----------
    toolkit : str
        ``espnet`` (ESPnet3's default), ``speechbrain``, ``rawnet`` (ESPnet-SPK RawNet3 with 10 x 3 s crops).
    pretrained_model : str or None
        Model tag, local directory or file.
    device : str or None
        ``cuda:0``, ``cpu``, ... (None: ``cuda:0`` when available, else ``cpu``, as ESPnet3).
    spk_embed_tag : str
    save_path : str
    batch_size : int or None
        Utterances per forward at most (ESPnet3's ``BaseRunner(batch_size=...)``; the engine's
        ``max_batch_size``; the padded-sample bound ``batch_bins`` applies as well).
    manifest_paths : dict
        ``split -> manifest TSV``.
    splits : list of str
    """

    toolkit: str
    pretrained_model: Optional[str]
    device: Optional[str]
    spk_embed_tag: str
    save_path: str
    batch_size: Optional[int]
    manifest_paths: Dict[str, str]
    splits: List[str]

    def split_dir(self, split: str) -> Path:
        """ESPnet3's per-split directory ``{save_path}/{spk_embed_tag}/{split}`` (the ``.pt`` layout)."""
        return Path(self.save_path) / self.spk_embed_tag / split

    def run_dir(self, split: str, root: Optional[str] = None) -> Path:
        """Where the split's engine run and Kaldi ark/scp go: ``{root}/{split}``, by default
        ``{save_path}/spk_toolkit/{spk_embed_tag}/{split}`` (beside ESPnet3's tree, never inside it)."""
        base = Path(root) if root else Path(self.save_path) / "spk_toolkit" / self.spk_embed_tag
        return base / split


def read_espnet3_xvector_config(path: str | os.PathLike) -> XVectorConfig:
    """Read the ``xvector:`` block of an ESPnet3 ``training_config.yaml`` (other keys are ignored).

    Defaults as ESPnet3's ``XVectorProvider``: ``toolkit: espnet``; ``spk_embed_tag: xvector``; every split of
    ``manifest_paths`` when ``splits`` is absent.

    Raises
    ------
    ValueError
        No ``xvector`` mapping, no ``save_path`` or ``manifest_paths``, a split without a manifest, a
        non-integer ``batch_size``, or an unresolvable ``${...}`` (names the file and the key).
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("xvector"), dict):
        raise ValueError(f"{path}: no 'xvector:' block (ESPnet3 training_config.yaml)")
    cfg = resolve_interpolations(raw, str(path))["xvector"]
    unknown = sorted(set(cfg) - set(XVECTOR_KEYS))
    if unknown:
        logger.warning("%s: xvector keys %s are not used by spk_toolkit", path, unknown)
    for key in ("save_path", "manifest_paths"):
        if not cfg.get(key):
            raise ValueError(f"{path}: xvector.{key} is required")
    if not isinstance(cfg["manifest_paths"], dict):
        raise ValueError(f"{path}: xvector.manifest_paths must map split names to manifest TSVs")
    splits = cfg.get("splits") or list(cfg["manifest_paths"])
    if isinstance(splits, str):
        splits = [splits]
    for s in splits:
        if s not in cfg["manifest_paths"]:
            raise ValueError(f"{path}: split {s!r} has no entry in xvector.manifest_paths")
    bs = cfg.get("batch_size")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ValueError(f"{path}: xvector.batch_size must be a positive integer, got {bs!r}")
    return XVectorConfig(toolkit=str(cfg.get("toolkit") or "espnet"),
                         pretrained_model=None if cfg.get("pretrained_model") is None else str(cfg["pretrained_model"]),
                         device=None if cfg.get("device") is None else str(cfg["device"]),
                         spk_embed_tag=check_tag(str(cfg.get("spk_embed_tag") or "xvector")),
                         save_path=str(cfg["save_path"]), batch_size=bs,
                         manifest_paths={str(k): str(v) for k, v in cfg["manifest_paths"].items()},
                         splits=[str(s) for s in splits])


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


def extract_espnet3_xvectors(config: str | os.PathLike | XVectorConfig, model=None, model_kwargs: Optional[dict] = None,
                             executor: Optional[str] = None, parallel=None, pt_layout: bool = False,
                             output_root: Optional[str] = None, splits: Optional[Sequence[str]] = None,
                             spk_mean: str = "raw", scp_paths: str = "absolute", **options) -> Optional[dict]:
    """ESPnet3's ``compute_xvectors`` stage on the engine: every split of the ``xvector:`` block, in our formats
    and, with ``pt_layout``, in ESPnet3's ``{save_path}/{spk_embed_tag}/{split}/{utt_id}.pt``.

    Parameters
    ----------
    config : path or XVectorConfig
        ``training_config.yaml`` (its ``xvector:`` block, :func:`read_espnet3_xvector_config`) or the parsed block.
    model : EmbeddingModel, optional
        Built once and used for every split (in-process and torchrun executors); else built from the block's
        ``toolkit`` with ``model_kwargs`` (Dask workers build their own).
    model_kwargs : dict, optional
        Backend constructor arguments (``device``, ``model_file``, ``source`` ...), derived by the caller from
        the block's ``pretrained_model`` and ``device``.
    executor, parallel
        As :func:`spk_toolkit.engine.extract`.
    pt_layout : bool
        Also write one ``{utt_id}.pt`` (float32 ``(D,)``) per utterance (:func:`write_pt_layout`).
    output_root : str, optional
        Root of the per-split engine runs (default ``{save_path}/spk_toolkit/{spk_embed_tag}``).
    splits : sequence of str, optional
        Subset of the block's ``splits``.
    spk_mean, scp_paths
        As :func:`export_tts`.
    **options
        :class:`spk_toolkit.engine.ExtractOptions` fields; ``max_batch_size`` defaults to the block's
        ``batch_size``.

    Returns
    -------
    dict or None
        ``split -> summary`` (each with ``"tts"`` paths and, with ``pt_layout``, ``"pt_dir"`` / ``"pt_files"``);
        None on torchrun ranks > 0.

    Raises
    ------
    ValueError
        A bad block, or a split not in it.
    CorpusError, ExtractionError, TTSExportError
        As :func:`extract_tts_embeddings`, for the first split that fails (earlier splits stay done).
    """
    from spk_toolkit.engine import extract

    xc = config if isinstance(config, XVectorConfig) else read_espnet3_xvector_config(config)
    todo = list(splits) if splits else list(xc.splits)
    for s in todo:
        if s not in xc.manifest_paths:
            raise ValueError(f"split {s!r} is not in xvector.manifest_paths ({sorted(xc.manifest_paths)})")
    if xc.batch_size and "max_batch_size" not in options:
        options["max_batch_size"] = xc.batch_size
    for k, v in default_options_of(xc.toolkit, model).items():
        options.setdefault(k, v)
    results = {}
    for split in todo:
        corpus = load_manifest_corpus(xc.manifest_paths[split])
        run_dir = xc.run_dir(split, output_root)
        export = TTSExport(xc.spk_embed_tag, corpus, spk_mean, scp_paths,
                           pt_dir=xc.split_dir(split) if pt_layout else None)
        logger.info("xvector split %s: %d utterances from %s -> %s", split, len(corpus.utts),
                    xc.manifest_paths[split], run_dir)
        summary = extract(corpus.utts, run_dir, toolkit=xc.toolkit, model=model, model_kwargs=model_kwargs,
                          executor=executor, parallel=parallel, exports=[export], **options)
        if summary is None:
            continue
        result = dict(export.result)
        if pt_layout:
            summary["pt_dir"], summary["pt_files"] = result.pop("pt_dir"), result.pop("pt_files")
        summary["tts"] = {**result, "spk_embed_tag": xc.spk_embed_tag, "order": corpus.order_from,
                          "spk_mean": spk_mean, "speakers": len(corpus.spk2utt)}
        results[split] = summary
    return results if _is_driver(executor, parallel) else None


def load_manifest_corpus(manifest: str | os.PathLike) -> TTSCorpus:
    """An ESPnet3 manifest TSV (``utt_id<TAB>wav_path<TAB>text<TAB>speaker_id``) as a :class:`TTSCorpus`
    (manifest order; speakers in order of first appearance).

    Raises
    ------
    CorpusError
        As :func:`spk_toolkit.io.datadir.load_manifest_tsv`.
    """
    utts = load_manifest_tsv(manifest)
    spk2utt: Dict[str, List[str]] = {}
    for u in utts:
        if u.spk_id is not None:
            spk2utt.setdefault(u.spk_id, []).append(u.utt_id)
    return TTSCorpus(utts, [u.utt_id for u in utts], spk2utt, "manifest")


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


# ------------------------------------------------------------------------------------------------ tools
@dataclasses.dataclass
class ScpReport:
    """How one ``<tag>.scp`` compares with its data dir's ``text``.

    Attributes
    ----------
    scp, text : Path
    n_text, n_scp : int
        Keys in each.
    missing : list of str
        In ``text``, not in the scp (cannot be fixed here: extract them).
    extra : list of str
        In the scp, not in ``text`` (dropped by ``--fix``).
    out_of_order : int
        Positions where the common keys differ in order.
    first_mismatch : tuple or None
        ``(line, text key, scp key)`` of the first difference of the common keys (1-based line of ``text``).
    fixed : bool
        The scp was rewritten in ``text`` order.
    """

    scp: Path
    text: Path
    n_text: int
    n_scp: int
    missing: List[str]
    extra: List[str]
    out_of_order: int
    first_mismatch: Optional[tuple]
    fixed: bool = False

    @property
    def ok(self) -> bool:
        """True when the scp has exactly ``text``'s keys in ``text``'s order."""
        return not self.missing and not self.extra and not self.out_of_order

    def format(self) -> str:
        """A short human report (one line when aligned)."""
        head = f"{self.scp}: {self.n_scp} entries vs {self.n_text} in {self.text}"
        if self.ok:
            return head + ": aligned"
        lines = [head + ":"]
        if self.missing:
            lines.append(f"  missing {len(self.missing)} (in text, not in the scp), e.g. {self.missing[:5]}")
        if self.extra:
            lines.append(f"  extra   {len(self.extra)} (in the scp, not in text), e.g. {self.extra[:5]}")
        if self.out_of_order:
            ln, a, b = self.first_mismatch
            lines.append(f"  out of order at {self.out_of_order} position(s); first at text line {ln}: "
                         f"text {a!r}, scp {b!r}")
        if self.fixed:
            lines.append("  fixed: rewritten in text order" + (" without the extra entries" if self.extra else "")
                         + (f"; {len(self.missing)} still missing" if self.missing else ""))
        return "\n".join(lines)


def find_text_for(scp: Path, dumpdir: Path, tag: str) -> Optional[Path]:
    """The ``text`` a ``dumpdir/<tag>/<dset>/<tag>.scp`` must match.

    Parameters
    ----------
    scp : Path
        ``dumpdir/<tag>/<dset>/<tag>.scp``.
    dumpdir : Path
    tag : str

    Returns
    -------
    Path or None
        ``dumpdir/raw/<dset>/text`` (what ``tts.sh`` trains on after stage 4, which filters the scp with
        ``utils/filter_scp.pl``), else ``dumpdir/raw/org/<dset>/text`` (stage 3's), else a ``text`` next to the
        scp; None when none exists. Source: ESPnet ``egs2/TEMPLATE/tts1/tts.sh`` stages 3-4 and PR #6227's
        ``scripts/utils/sort_spk_embed_scp.sh``.
    """
    dset = scp.parent.name
    for cand in (dumpdir / "raw" / dset / "text", dumpdir / "raw" / "org" / dset / "text", scp.parent / "text"):
        if cand.is_file():
            return cand
    return None


def check_scp_order(scp: str | os.PathLike, text: str | os.PathLike, fix: bool = False) -> ScpReport:
    """Compare an scp's keys with ``text`` (missing, extra, out of order); with ``fix`` rewrite it in ``text`` order.

    ``fix`` keeps every entry's value as it is (relative ark paths included), drops the extra keys and
    writes atomically, keeping the original as ``<scp>.orig`` (``.bak`` is what ``tts.sh`` stage 4 writes).

    Parameters
    ----------
    scp, text : path
    fix : bool

    Returns
    -------
    ScpReport

    Raises
    ------
    CorpusError
        A key twice in ``text`` or in the scp (named).
    """
    from spk_toolkit.io.atomic import atomic_write_text

    scp, text = Path(scp), Path(text)
    tkeys = read_keys(text)
    rows = read_scp_entries(scp)
    entries: Dict[str, str] = dict(rows)
    order: List[str] = [k for k, _ in rows]
    tset = set(tkeys)
    missing = [k for k in tkeys if k not in entries]
    extra = [k for k in order if k not in tset]
    common_t = [k for k in tkeys if k in entries]
    common_s = [k for k in order if k in tset]
    line_of = {k: i for i, k in enumerate(tkeys, 1)}
    diffs = [(line_of[a], a, b) for a, b in zip(common_t, common_s) if a != b]
    rep = ScpReport(scp, text, len(tkeys), len(order), missing, extra, len(diffs), diffs[0] if diffs else None)
    if fix and (extra or diffs):
        import shutil

        shutil.copyfile(scp, scp.with_name(scp.name + ".orig"))
        atomic_write_text(scp, "".join(f"{k} {entries[k]}\n" for k in common_t))
        rep.fixed = True
    return rep


def convert_to_average(utt_embed_path: str | os.PathLike, spk_embed_path: str | os.PathLike,
                       spk_id: Optional[str] = None, utt2spk: Optional[str | os.PathLike] = None) -> Tuple[Path, int]:
    """Point every utterance of an scp at a speaker mean (ESPnet's ``convert_to_avg_spk_embed.py``, fixed).

    With ``spk_id`` every utterance gets that speaker's entry; with ``utt2spk`` each utterance gets its own
    speaker's (ESPnet's script raises ``KeyError: None`` here). The original scp is kept as
    ``<dir>/<name>.bak`` (ESPnet's intended name; its script writes a file literally called
    ``os.path.filename(utt_embed_path).bak``); ark files are untouched; the scp is rewritten atomically in its
    own order.

    Parameters
    ----------
    utt_embed_path : path
        ``dump/<tag>/<dset>/<tag>.scp``.
    spk_embed_path : path
        ``dump/<tag>/<dset>/spk_<tag>.scp``.
    spk_id : str, optional
    utt2spk : path, optional
        Exactly one of ``spk_id`` and ``utt2spk``.

    Returns
    -------
    (Path, int)
        The backup file and the number of utterances rewritten.

    Raises
    ------
    FileNotFoundError
        A given file does not exist (named).
    ValueError
        Neither or both of ``spk_id`` / ``utt2spk``; ``spk_id`` not in the speaker scp; utterances without a
        speaker in ``utt2spk`` or speakers without a mean (counts and examples); malformed lines.
    """
    import shutil

    from spk_toolkit.io.atomic import atomic_write_text
    from spk_toolkit.io.datadir import read_utt2spk

    if (spk_id is None) == (utt2spk is None):
        raise ValueError("give exactly one of --spk-id and --utt2spk")
    for p, flag in ((utt_embed_path, "--utt-embed-path"), (spk_embed_path, "--spk-embed-path"),
                    (utt2spk, "--utt2spk")):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{flag} {p} does not exist")

    spk_rows = dict(read_scp_entries(spk_embed_path))
    utt_rows = read_scp_entries(utt_embed_path)
    if spk_id is not None:
        if spk_id not in spk_rows:
            raise ValueError(f"--spk-id {spk_id!r} is not in {spk_embed_path}")
        new = [(u, spk_rows[spk_id]) for u, _ in utt_rows]
    else:
        u2s = read_utt2spk(utt2spk)
        nospk = [u for u, _ in utt_rows if u not in u2s]
        if nospk:
            raise ValueError(f"{len(nospk)} utterance(s) of {utt_embed_path} are not in {utt2spk}, e.g. {nospk[:5]}")
        nomean = sorted({u2s[u] for u, _ in utt_rows if u2s[u] not in spk_rows})
        if nomean:
            raise ValueError(f"{len(nomean)} speaker(s) have no mean in {spk_embed_path}, e.g. {nomean[:5]}")
        new = [(u, spk_rows[u2s[u]]) for u, _ in utt_rows]
    p = Path(utt_embed_path)
    bak = p.with_name(p.name + ".bak")
    shutil.copyfile(p, bak)
    atomic_write_text(p, "".join(f"{u} {v}\n" for u, v in new))
    return bak, len(new)
