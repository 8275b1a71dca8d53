"""ESPnet3's x-vector runner on the engine: the ``xvector:`` block of ``training_config.yaml``, one run per split's
manifest TSV, ESPnet2's files plus the ``.pt`` layout (:func:`extract_espnet3_xvectors`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from spk_toolkit.io.datadir import load_manifest_tsv
from spk_toolkit.tts.espnet2 import _is_driver, default_options_of
from spk_toolkit.tts.export import TTSCorpus, TTSExport, check_tag

logger = logging.getLogger(__name__)


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
