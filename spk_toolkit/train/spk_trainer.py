"""SpkTrainer: ESPnet-SPK's trainer with open-set EER validation and resumable embedding extraction.

A drop-in replacement for ``espnet2.train.spk_trainer.SpkTrainer`` (same class methods, same signatures; use it
through :class:`spk_toolkit.tasks.spk.SpeakerTask` or ``python -m spk_toolkit.bin.spk_train``). It is a thin
shell (DESIGN.md property 9): embeddings come from the espnet backend's padding-invisible forward
(:meth:`spk_toolkit.backends.espnet.EspnetSpeakerModel.from_model`), scores from
:func:`spk_toolkit.scoring.cosine_score`, metrics from :func:`spk_toolkit.metrics.compute_metrics`.

Inputs (ESPnet's validation iterator)
-------------------------------------
Each step yields ``(ids, batch)``: ``ids`` are trial ids ``"<enroll>*<test>"`` (B,), ``batch["speech"]`` /
``batch["speech2"]`` are either

* crops ``(B, n_crops, T_crop)`` from ESPnet's ``SpkPreprocessor`` in validation mode (``num_eval`` crops of
  ``target_duration`` seconds, start points ``linspace(0, len - T_crop, n_crops)``, short utterances wrapped), or
* whole utterances ``(B, T)`` zero-padded, with true lengths in ``speech_lengths`` / ``speech2_lengths``
  (samples; all of ``T`` when absent),

plus ``batch["spk_labels"]`` (B,) or (B, 1) with 1 = target, 0 = nontarget, and optionally ``task_tokens``.

Policies (documented choices)
-----------------------------
* **Each unique utterance is embedded once** per validation (a dict keyed by utterance id, O(1) look-up), in
  chunks of as many utterances as the largest batch seen so far has trials (ESPnet's forward batch is the
  largest batch's size). Utterances waiting for
  a chunk are the only audio held; ESPnet instead keeps every crop of every utterance on the device and reads
  the iterator twice.
* **Crops are averaged**: an utterance's validation embedding is the mean of its raw (not L2-normalised) crop
  embeddings; the score is the cosine of the two means (:func:`spk_toolkit.scoring.cosine_score`, which treats an
  ``(n_crops, D)`` value the same way). This is also what scoring an ``extract_embed`` npz gives. ESPnet instead
  scores ``-mean(cdist)`` over all crop pairs of L2-normalised crops.
* **No L2 normalisation in extract_embed**, for every batch (ESPnet normalises only its last partial batch): the
  stored values are the model's projector output as the backend computes it.
* **Metrics** (:mod:`spk_toolkit.metrics`, one sort): ``eer`` in % with linear interpolation between the
  operating points where P_miss - P_fa changes sign; ``mindcf`` at P_target = 0.05 (ESPnet's/VoxSRC's value) and
  ``mindcf_p01`` at P_target = 0.01, C_miss = C_fa = 1, normalised (NIST SRE 2016 eval plan eq. 2-4);
  ``trg_mean``/``trg_std``/``nontrg_mean``/``nontrg_std`` are population mean and standard deviation of the
  target / nontarget cosine scores; ``n_trials``.
* **Distributed**: the device is that of the model's parameters (CPU/gloo and CUDA/NCCL alike); the model's
  buffers are first broadcast from rank 0 (ranks' BatchNorm statistics diverge in the last training step, see
  :func:`sync_buffers`), so every rank validates the model rank 0 saves; a
  ``DistributedDataParallel`` wrapper is removed before any forward (its forward would run a collective per call,
  and ranks embed different numbers of utterances). No collective runs inside the loop; afterwards each rank's
  (trial ids, scores, labels) are gathered with ``all_gather_object`` so every rank registers the same metrics.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from espnet2.train.distributed_utils import DistributedOption
from espnet2.train.reporter import SubReporter
from espnet2.train.trainer import Trainer, TrainerOptions

logger = logging.getLogger(__name__)

P_TARGETS = (0.01, 0.05)
PART_NAME = "embeddings{rank}.npz"
MERGED_NAME = "embeddings.npz"


class ValidationError(ValueError):
    """Malformed validation/extraction batch (bad trial id, label other than 0/1, unknown speech layout)."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (the model itself otherwise)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def dist_info(distributed_option: Optional[DistributedOption]) -> Tuple[int, int]:
    """``(rank, world_size)`` of an initialised process group when ``distributed_option.distributed``, else (0, 1)."""
    if (
        distributed_option is not None
        and getattr(distributed_option, "distributed", False)
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def split_trial_id(trial_id: str) -> Tuple[str, str]:
    """``"enr*tst"`` -> ``("enr", "tst")``.

    Raises
    ------
    ValidationError
        The id does not contain exactly one ``*``.
    """
    parts = trial_id.split("*")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValidationError(f"trial id {trial_id!r} is not '<enroll>*<test>' (ESPnet trial.scp keys)")
    return parts[0], parts[1]


def utterance_rows(batch: Dict[str, torch.Tensor], key: str) -> List[Tuple[torch.Tensor, int]]:
    """Per batch item, the rows to embed and their true length in samples.

    Parameters
    ----------
    batch : dict
        ESPnet collated batch.
    key : {"speech", "speech2"}

    Returns
    -------
    list of (rows, length)
        ``rows`` is ``(n_crops, T_crop)`` for crops (``length = T_crop``) or ``(1, T)`` for a whole zero-padded
        utterance (``length`` from ``<key>_lengths``).

    Raises
    ------
    ValidationError
        Missing key or a tensor that is neither 2-D nor 3-D.
    """
    if key not in batch:
        raise ValidationError(f"batch has no {key!r} (keys: {sorted(batch)}); validation needs trial pairs")
    x = batch[key]
    if x.dim() == 3:
        return [(x[i], int(x.shape[2])) for i in range(x.shape[0])]
    if x.dim() == 2:
        lens = batch.get(f"{key}_lengths")
        lens = [int(x.shape[1])] * x.shape[0] if lens is None else [int(v) for v in lens.reshape(-1).tolist()]
        return [(x[i : i + 1], lens[i]) for i in range(x.shape[0])]
    raise ValidationError(f"{key} must be (B, n_crops, T) crops or (B, T) utterances, got {tuple(x.shape)}")


def trial_labels(batch: Dict[str, torch.Tensor], n: int) -> np.ndarray:
    """``spk_labels`` of a validation batch as int8 (n,), checked to be 0/1.

    Raises
    ------
    ValidationError
        Missing labels, wrong count, or a value other than 0/1.
    """
    if "spk_labels" not in batch:
        raise ValidationError("validation batch has no spk_labels (trial_label file)")
    lab = batch["spk_labels"].reshape(-1).cpu().numpy()
    if lab.shape[0] != n:
        raise ValidationError(f"{lab.shape[0]} labels for {n} trials")
    bad = ~np.isin(lab, (0, 1))
    if bad.any():
        raise ValidationError(f"trial labels must be 0/1, got {lab[bad][:5].tolist()}")
    return lab.astype(np.int8)


class UniqueEmbedder:
    """Embeds each utterance id once, in chunks of ``chunk`` utterances, through one backend.

    Parameters
    ----------
    model : torch.nn.Module
        ESPnet speaker model (unwrapped, eval mode).
    chunk : int
        Utterances per forward (>= 1).
    average : bool
        Keep the crop mean ``(D,)`` (True) or all crops ``(n_crops, D)`` (False).
    keep : callable, optional
        ``keep(utt_id) -> bool``; utterances for which it is False are skipped (rank assignment).

    Attributes
    ----------
    embeddings : dict str -> np.ndarray float32
    n_rows : int
        Crop rows (or whole utterances) sent to the model.
    n_forward : int
        Forward calls (chunks).
    """

    def __init__(self, model: torch.nn.Module, chunk: int, average: bool, keep=None):
        from spk_toolkit.backends.espnet import EspnetSpeakerModel

        if chunk < 1:
            raise ValueError(f"chunk (utterances per forward) must be >= 1, got {chunk}")
        self.backend = EspnetSpeakerModel.from_model(model)
        self.model = model
        self.chunk = int(chunk)
        self.average = average
        self.keep = keep
        self.embeddings: Dict[str, np.ndarray] = {}
        self._seen: set = set()
        self._pending: List[Tuple[str, torch.Tensor, int]] = []
        self.task_token: Optional[torch.Tensor] = None
        self.n_rows = 0
        self.n_forward = 0

    def add(self, utt_id: str, rows: torch.Tensor, length: int) -> None:
        """Queue ``rows`` (n, T) of ``utt_id`` unless seen before; embed when a chunk is full."""
        if utt_id in self._seen:
            return
        self._seen.add(utt_id)
        if self.keep is not None and not self.keep(utt_id):
            return
        # a copy of this utterance's rows only: a view would pin the whole batch tensor until the next flush
        self._pending.append((utt_id, rows[:, :length].clone(), length))
        if len(self._pending) >= self.chunk:
            self.flush()

    @property
    def seen(self) -> set:
        """Every utterance id offered (kept or not)."""
        return self._seen

    def _forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.task_token is None:
            return self.backend.embed(wav, lengths)
        # task tokens are not part of the backend's masked forward: ESPnet's forward on equal-length groups.
        dev = self.backend.device
        out = torch.zeros(wav.shape[0], self.backend.embed_dim)
        for L in torch.unique(lengths).tolist():
            idx = torch.nonzero(lengths == L).flatten()
            tok = self.task_token.to(dev).repeat(len(idx)).unsqueeze(1)
            emb = self.model(speech=wav[idx, :L].to(dev), spk_labels=None, extract_embd=True, task_tokens=tok)
            out[idx] = emb.float().cpu()
        return out

    def flush(self) -> None:
        """Embed every queued utterance in one forward."""
        if not self._pending:
            return
        counts = [r.shape[0] for _, r, _ in self._pending]
        T = max(r.shape[1] for _, r, _ in self._pending)
        wav = torch.zeros(sum(counts), T, dtype=torch.float32)
        lengths = torch.zeros(sum(counts), dtype=torch.int64)
        o = 0
        for (_, r, L), n in zip(self._pending, counts):
            wav[o : o + n, : r.shape[1]] = r
            lengths[o : o + n] = L
            o += n
        emb = self._forward(wav, lengths).numpy()
        if not np.isfinite(emb).all():
            bad = sorted({u for (u, _, _), s, n in zip(self._pending, np.cumsum([0] + counts), counts)
                          if not np.isfinite(emb[s : s + n]).all()})  # fmt: skip
            raise FloatingPointError(f"model produced non-finite embeddings for {len(bad)} utterances, e.g. {bad[:5]}")
        o = 0
        for (u, _, _), n in zip(self._pending, counts):
            e = emb[o : o + n].astype(np.float32)
            self.embeddings[u] = e.mean(axis=0) if self.average else e
            o += n
        self.n_rows += int(sum(counts))
        self.n_forward += 1
        self._pending = []


def sync_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Broadcast every buffer (BatchNorm running statistics, ...) of ``model`` from rank ``src``.

    After the last training step each DDP rank has updated its BatchNorm running statistics with its own batch
    (DDP re-broadcasts rank 0's buffers only at the *next* forward), so without this every rank would validate a
    slightly different model and the EER would not be that of the checkpoint rank 0 saves. Parameters are
    identical across ranks already (DDP averages gradients).
    """
    for b in model.buffers():
        torch.distributed.broadcast(b.data, src)


def _gather_objects(obj, world: int):
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _sha_ids(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for u in sorted(ids):
        h.update(u.encode())
        h.update(b"\n")
    return h.hexdigest()


def rank_of(utt_id: str, world_size: int) -> int:
    """Rank that embeds ``utt_id`` in :meth:`SpkTrainer.extract_embed`: ``crc32(utt_id) % world_size``.

    Independent of the iteration order, so every rank agrees without communication.
    """
    return zlib.crc32(utt_id.encode("utf-8")) % world_size


def part_path(output_dir: str | os.PathLike, rank: int) -> Path:
    """``<output_dir>/embeddings<rank>.npz`` (ESPnet's per-rank file name)."""
    return Path(output_dir) / PART_NAME.format(rank=rank)


def _meta_path(output_dir, rank: int) -> Path:
    return Path(output_dir) / f"embeddings{rank}.json"


def _atomic_savez(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def extract_part(
    model: torch.nn.Module,
    iterator: Iterable,
    output_dir: str | os.PathLike,
    custom_bs: int,
    average: bool,
    rank: int,
    world_size: int,
) -> dict:
    """Embed this rank's share of the iterator's unique utterances into ``embeddings<rank>.npz``.

    Every rank reads the whole iterator (ESPnet's extraction iterator is not sharded), keeps the utterances with
    :func:`rank_of` equal to its rank and embeds them in chunks of ``custom_bs``. The part is written with
    ``np.savez_compressed`` to a temporary name and renamed; ``embeddings<rank>.json`` (written first) records
    the world size, the options and the count + sha256 of *all* unique utterance ids (for :func:`merge_parts`).
    A part whose json matches ``world_size``/``average`` is kept as is (resume): the iterator is not read.

    Returns
    -------
    dict
        ``{"rank", "skipped", "n_utts", "n_rows", "n_forward", "path"}``.

    Raises
    ------
    ValueError
        ``custom_bs < 1``; malformed trial ids.
    """
    if isinstance(custom_bs, bool) or not isinstance(custom_bs, (int, np.integer)) or custom_bs < 1:
        raise ValueError(f"custom_bs (utterances per forward) must be an integer >= 1, got {custom_bs!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, meta_path = part_path(out, rank), _meta_path(out, rank)
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("world_size") == world_size and meta.get("average") == bool(average):
            logger.info("extract_embed: %s already complete (%d utterances), not recomputed", path, meta["n_part"])
            return {"rank": rank, "skipped": True, "n_utts": meta["n_part"], "n_rows": 0, "n_forward": 0,
                    "path": str(path)}
    net = unwrap_model(model)
    net.eval()
    emb = UniqueEmbedder(net, custom_bs, average, keep=lambda u: rank_of(u, world_size) == rank)
    for ids, batch in iterator:
        if "task_tokens" in batch:
            emb.task_token = batch["task_tokens"][0]
        enr = utterance_rows(batch, "speech")
        tst = utterance_rows(batch, "speech2")
        for tid, (r1, l1), (r2, l2) in zip(ids, enr, tst):
            u1, u2 = split_trial_id(tid)
            emb.add(u1, r1, l1)
            emb.add(u2, r2, l2)
    emb.flush()
    meta = {"rank": rank, "world_size": world_size, "average": bool(average), "n_part": len(emb.embeddings),
            "n_all": len(emb.seen), "all_sha256": _sha_ids(emb.seen), "all_ids": sorted(emb.seen)}
    _atomic_text(meta_path, json.dumps(meta))
    _atomic_savez(path, emb.embeddings)
    return {"rank": rank, "skipped": False, "n_utts": len(emb.embeddings), "n_rows": emb.n_rows,
            "n_forward": emb.n_forward, "path": str(path)}


def merge_parts(
    output_dir: str | os.PathLike, world_size: int, out_name: str = MERGED_NAME, remove_parts: bool = True
) -> Path:
    """Merge ``embeddings0..N-1.npz`` into one compressed npz after verifying completeness.

    Checks that all parts agree on the set of unique utterances (count + sha256 recorded by
    :func:`extract_part`), that every utterance is present exactly once over the parts and that nothing else is.
    Writes ``out_name`` atomically (sorted keys), then removes the parts and their json files.

    Returns
    -------
    Path
        The merged file.

    Raises
    ------
    FileNotFoundError
        A part is missing (message names it).
    RuntimeError
        Parts disagree on the utterance set, an utterance is missing or duplicated (count and examples).
    """
    out = Path(output_dir)
    metas, parts = [], []
    for r in range(world_size):
        p, m = part_path(out, r), _meta_path(out, r)
        if not p.is_file() or not m.is_file():
            raise FileNotFoundError(f"missing part {p} (or {m.name}): rerun the extraction to compute it")
        metas.append(json.loads(m.read_text()))
        parts.append(p)
    shas = {m["all_sha256"] for m in metas}
    if len(shas) != 1 or any(m["world_size"] != world_size for m in metas):
        raise RuntimeError(f"parts in {out} come from different runs (utterance sets {len(shas)}, world sizes "
                           f"{sorted({m['world_size'] for m in metas})}); remove them and rerun")
    expected = set(metas[0]["all_ids"])
    merged: Dict[str, np.ndarray] = {}
    dup = []
    for p in parts:
        with np.load(p, allow_pickle=False) as z:
            for k in z.files:
                if k in merged:
                    dup.append(k)
                merged[k] = z[k]
    missing = sorted(expected - merged.keys())
    extra = sorted(merged.keys() - expected)
    if dup or missing or extra:
        raise RuntimeError(f"merge check failed in {out}: {len(missing)} missing (e.g. {missing[:3]}), "
                           f"{len(dup)} duplicated (e.g. {dup[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    dst = out / out_name
    _atomic_savez(dst, {k: merged[k] for k in sorted(merged)})
    if remove_parts:
        for r in range(world_size):
            part_path(out, r).unlink(missing_ok=True)
            _meta_path(out, r).unlink(missing_ok=True)
    logger.info("extract_embed: merged %d parts, %d utterances -> %s", world_size, len(merged), dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class SpkTrainer(Trainer):
    """ESPnet speaker trainer: closed-set classification training, open-set EER validation.

    Class methods only (like ESPnet's ``SpkTrainer``); instantiating raises ``RuntimeError``.
    ``last_validation`` / ``last_extraction`` hold this process's counts of the latest call (unique utterances,
    rows and forward calls), for tests and logs.
    """

    last_validation: dict = {}
    last_extraction: dict = {}

    def __init__(self):
        raise RuntimeError("This class can't be instantiated.")

    @classmethod
    @torch.no_grad()
    def validate_one_epoch(
        cls,
        model: torch.nn.Module,
        iterator: Iterable[Dict[str, torch.Tensor]],
        reporter: SubReporter,
        options: TrainerOptions,
        distributed_option: DistributedOption,
    ) -> None:
        """Embed the unique utterances of this rank's trials once, cosine-score the trials, register metrics.

        Parameters
        ----------
        model : torch.nn.Module
            ``ESPnetSpeakerModel``, possibly ``DistributedDataParallel``-wrapped. Runs on its parameters' device.
        iterator : iterable of (list of str, dict)
            ESPnet's validation iterator of trial pairs (see the module docstring for the layouts).
        reporter : SubReporter
            Receives ``eer`` (%), ``mindcf`` (P_target 0.05), ``mindcf_p01`` (P_target 0.01), ``n_trials``,
            ``trg_mean``, ``trg_std``, ``nontrg_mean``, ``nontrg_std`` (cosine scores; population std).
        options : TrainerOptions
            Unused (kept for ESPnet's signature).
        distributed_option : DistributedOption
            When distributed, trial ids/scores/labels of all ranks are gathered, so every rank registers the
            same metrics.

        Raises
        ------
        ValidationError
            Malformed trial id, label other than 0/1, missing ``speech2``.

        Notes
        -----
        With no trials, or only one class, EER is undefined: ``eer=100``, ``mindcf=1`` are registered (the
        worst values, so such an epoch never becomes the best model) with a warning.
        """
        from spk_toolkit.metrics import compute_metrics
        from spk_toolkit.scoring import cosine_score

        rank, world = dist_info(distributed_option)
        net = unwrap_model(model)
        net.eval()
        if world > 1:
            sync_buffers(net)
        emb: Optional[UniqueEmbedder] = None
        enroll: List[str] = []
        test: List[str] = []
        trial_ids: List[str] = []
        labels: List[np.ndarray] = []
        for ids, batch in iterator:
            assert isinstance(batch, dict), type(batch)
            if emb is None:
                emb = UniqueEmbedder(net, max(1, len(ids)), average=True)
            # ESPnet's forward batch: as many utterances as the largest batch has trials
            emb.chunk = max(emb.chunk, len(ids))
            if "task_tokens" in batch:
                emb.task_token = batch["task_tokens"][0]
            labels.append(trial_labels(batch, len(ids)))
            r1s, r2s = utterance_rows(batch, "speech"), utterance_rows(batch, "speech2")
            for tid, (r1, l1), (r2, l2) in zip(ids, r1s, r2s):
                u1, u2 = split_trial_id(tid)
                enroll.append(u1)
                test.append(u2)
                trial_ids.append(tid)
                emb.add(u1, r1, l1)
                emb.add(u2, r2, l2)
        if emb is not None:
            emb.flush()
        local_scores = (
            cosine_score(emb.embeddings, (enroll, test)) if trial_ids else np.zeros(0, dtype=np.float64)
        )
        local_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8)
        cls.last_validation = {
            "rank": rank, "world_size": world, "n_trials": len(trial_ids),
            "n_unique_utts": 0 if emb is None else len(emb.embeddings),
            "n_rows": 0 if emb is None else emb.n_rows, "n_forward": 0 if emb is None else emb.n_forward,
        }  # fmt: skip
        del emb

        gathered = _gather_objects((trial_ids, local_scores, local_labels), world)
        all_ids = [t for g in gathered for t in g[0]]
        scores = np.concatenate([g[1] for g in gathered]).astype(np.float64)
        labs = np.concatenate([g[2] for g in gathered]).astype(np.int8)
        order = np.argsort(np.asarray(all_ids, dtype=object), kind="stable") if all_ids else np.zeros(0, int)
        ids_sorted = [all_ids[i] for i in order]
        keep = np.ones(len(order), dtype=bool)
        if len(ids_sorted) > 1:
            keep[1:] = np.asarray(ids_sorted[1:], dtype=object) != np.asarray(ids_sorted[:-1], dtype=object)
        if not keep.all():
            logger.warning("validation: %d trials seen on more than one rank counted once", int((~keep).sum()))
        scores, labs = scores[order][keep], labs[order][keep]

        n = int(scores.shape[0])
        tar, non = scores[labs == 1], scores[labs == 0]
        stats = {
            "n_trials": n,
            "trg_mean": float(tar.mean()) if tar.size else float("nan"),
            "trg_std": float(tar.std()) if tar.size else float("nan"),
            "nontrg_mean": float(non.mean()) if non.size else float("nan"),
            "nontrg_std": float(non.std()) if non.size else float("nan"),
        }
        if tar.size == 0 or non.size == 0:
            logger.warning("validation: %d target and %d nontarget trials; EER undefined, registering eer=100, "
                           "mindcf=1", tar.size, non.size)
            reporter.register(stats=dict(eer=100.0, mindcf=1.0, mindcf_p01=1.0, **stats))
            return
        m = compute_metrics(scores, labs, p_targets=P_TARGETS)
        reporter.register(
            stats=dict(
                eer=100.0 * float(m["eer"]),
                mindcf=float(m["min_dcf"][0.05]),
                mindcf_p01=float(m["min_dcf"][0.01]),
                **stats,
            )
        )

    @classmethod
    @torch.no_grad()
    def extract_embed(
        cls,
        model: torch.nn.Module,
        iterator: Iterable[Dict[str, torch.Tensor]],
        reporter: SubReporter,
        options: TrainerOptions,
        distributed_option: DistributedOption,
        output_dir: str,
        custom_bs: int,
        average: bool = False,
    ) -> None:
        """Embed every unique utterance of a trial iterator; write ``embeddings<rank>.npz``, then merge.

        Parameters
        ----------
        model : torch.nn.Module
            ``ESPnetSpeakerModel`` (DDP wrapper removed); runs on its parameters' device.
        iterator : iterable of (list of str, dict)
            ESPnet's (unsharded) trial iterator; every rank reads all of it.
        reporter : SubReporter
            Receives ``n_utts`` (this rank's count).
        options : TrainerOptions
            Unused (ESPnet's signature).
        distributed_option : DistributedOption
            Rank/world size when distributed; unique utterances are split by :func:`rank_of`.
        output_dir : str
            Where ``embeddings<rank>.npz`` and the merged ``embeddings.npz`` go.
        custom_bs : int
            Utterances per forward (>= 1).
        average : bool
            Store the crop mean ``(D,)`` per utterance instead of the crops ``(n_crops, D)`` (whole-utterance
            batches give ``(1, D)``).

        Raises
        ------
        ValueError
            ``custom_bs < 1`` (before any work, on every rank, so no rank waits at a barrier for a failed one).
        RuntimeError / FileNotFoundError
            The merge check failed (see :func:`merge_parts`).

        Notes
        -----
        Values are float32 projector outputs, never L2-normalised. Per-rank parts are written atomically and
        kept on a rerun (resume): after a crash only missing parts are recomputed. Rank 0 merges after a
        barrier into ``<output_dir>/embeddings.npz`` (``np.savez_compressed``, keys = utterance ids, readable
        by ESPnet's scoring scripts with ``np.load``) and removes the parts.
        """
        rank, world = dist_info(distributed_option)
        info = extract_part(model, iterator, output_dir, custom_bs, average, rank, world)
        cls.last_extraction = info
        reporter.register(stats=dict(n_utts=info["n_utts"]))
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            merge_parts(output_dir, world)
        if world > 1:
            torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------------------
# standalone validation of a checkpoint


def build_valid_iterator(train_args, distributed_option: Optional[DistributedOption] = None):
    """ESPnet's validation iterator for an experiment's arguments (``valid_data_path_and_name_and_type``, ...).

    Parameters
    ----------
    train_args : argparse.Namespace
        As returned by ``SpeakerTask.build_model_from_file`` (the experiment's ``config.yaml``).
    distributed_option : DistributedOption, optional
        Default: not distributed (every trial).
    """
    from spk_toolkit.tasks.spk import SpeakerTask

    dopt = distributed_option or DistributedOption(distributed=False)
    return SpeakerTask.build_iter_factory(args=train_args, distributed_option=dopt, mode="valid").build_iter(0)


def validate_checkpoint(config: str | os.PathLike, model_file: str | os.PathLike, device: str = "cpu") -> dict:
    """Run :meth:`SpkTrainer.validate_one_epoch` on an experiment's validation trials, in this process.

    Parameters
    ----------
    config : path
        The experiment's ``config.yaml`` (its ``valid_data_path_and_name_and_type`` and preprocessor are used).
    model_file : path
        Checkpoint, e.g. ``exp/<name>/valid.eer.best.pth`` or ``<N>epoch.pth``.
    device : str

    Returns
    -------
    dict
        The registered statistics (``eer`` %, ``mindcf``, ``mindcf_p01``, ``n_trials``, score statistics).
    """
    from espnet2.train.reporter import Reporter

    from spk_toolkit.tasks.spk import SpeakerTask

    model, args = SpeakerTask.build_model_from_file(str(config), str(model_file), device)
    reporter = Reporter()
    reporter.set_epoch(1)
    with reporter.observe("valid") as sub:
        SpkTrainer.validate_one_epoch(model, build_valid_iterator(args), sub, None,
                                      DistributedOption(distributed=False))
    keys = ("eer", "mindcf", "mindcf_p01", "n_trials", "trg_mean", "trg_std", "nontrg_mean", "nontrg_std")
    return {k: float(reporter.get_value("valid", k)) for k in keys}
