"""torchrun executor: one process per device, ranks share the output directory.

Usage::

    torchrun --nproc_per_node=4 -m spk_toolkit.bin.spk_inference --device cuda --data_dir D --output_dir O
    torchrun --nnodes=2 --node_rank=$R --master_addr=$HOST --nproc_per_node=8 -m spk_toolkit.bin.spk_inference ...

Protocol (every rank runs :func:`extract_distributed`):

1. ``init_process_group``: NCCL when ``--device cuda`` (rank uses ``cuda:LOCAL_RANK``), gloo on CPU.
2. Every rank loads its model once. Rank 0 reads the corpus, builds (or reloads and checks) the plan and writes
   ``plan.json``; it lists the finished shards and assigns the unfinished ones with
   :func:`spk_toolkit.parallel.assign_shards` (longest first to the least-loaded rank). The outcome (or rank 0's
   error) is broadcast; the other ranks then load ``plan.json`` with rank 0's model description.
3. Each rank runs :func:`spk_toolkit.engine.run_shards` on its own shards only (it decodes no other audio) and
   writes ``ranks/rank-RRRRR.json`` (shards, utterances decoded, errors, wall time).
4. ``all_gather_object`` of every rank's status is the barrier: if any rank failed, every rank raises
   :class:`~spk_toolkit.engine.ExtractionError` naming it; otherwise rank 0 merges and writes ``summary.json``.

Why static assignment: the plan already cuts shards of equal audio, so LPT gives each rank the same audio to
within one shard (minutes); it needs no locking on the shared file system (``O_EXCL`` is unreliable on some
NFS setups), it lets each rank feed all its shards through one DataLoader (decoding runs ahead across shard
boundaries), and it is recomputed over the *unfinished* shards on every (re)start, so a resumed job is
balanced too. Its limit is heterogeneous or straggling nodes; use the Dask executor (dynamic, one task per
shard) there.

Only rank 0 shows a progress bar and returns the summary; other ranks return None.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from spk_toolkit.parallel import assign_shards

logger = logging.getLogger(__name__)


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``0, 1, 0`` outside torchrun)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: str, local_rank: int) -> str:
    """The device of a rank: ``cuda`` / ``cuda:N`` -> ``cuda:LOCAL_RANK`` (one GPU per local rank), else ``device``."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def init_distributed(device: str = "cpu", timeout_s: Optional[float] = None):
    """Initialise ``torch.distributed`` from the torchrun environment (idempotent).

    Parameters
    ----------
    device : str
        ``cuda*`` selects NCCL and ``torch.cuda.set_device(LOCAL_RANK)``; anything else gloo.
    timeout_s : float, optional
        Collective timeout in seconds (default ``$SPK_DIST_TIMEOUT`` or 6 h: ranks wait at the final barrier for
        the slowest rank, which with balanced shards is at most about one shard).

    Returns
    -------
    bool
        True when this call created the process group (the caller destroys it).
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    _, _, local_rank = dist_env()
    backend = "gloo"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} requested but CUDA is not available on {socket.gethostname()}")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    timeout = datetime.timedelta(seconds=float(timeout_s or os.environ.get("SPK_DIST_TIMEOUT", 6 * 3600)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


@contextlib.contextmanager
def process_group_teardown():
    """Destroy the default ``torch.distributed`` process group when the block ends, if one is initialised.

    For entry points whose process group is created elsewhere (ESPnet's ``SpeakerTask.main``, ESPnet's
    ``DistributedOption``). Left to interpreter exit, the gloo/NCCL threads are torn down in arbitrary order
    and a rank may abort with "terminate called without an active exception" after its work is done (seen
    with 2 gloo ranks under load); PyTorch asks programs to call ``destroy_process_group()`` before exiting.

    Raises
    ------
    Exception
        Whatever the block raises, after the process group is destroyed; nothing of its own.
    """
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def extract_distributed(data, output_dir, toolkit: str = "resemblyzer", model=None, model_kwargs=None, **options):
    """Run one rank of a torchrun extraction (every rank calls this with the same arguments).

    Parameters
    ----------
    data : path or sequence of Utterance
        Corpus (every rank must see the same corpus; the plan fingerprint checks it).
    output_dir : path
        Shared by all ranks (a shared file system on multi-node jobs).
    toolkit, model, model_kwargs
        As :func:`spk_toolkit.engine.extract`; ``model_kwargs["device"] = "cuda"`` becomes ``cuda:LOCAL_RANK``.
    **options
        :class:`spk_toolkit.engine.ExtractOptions` fields. ``progress`` applies to rank 0 only.

    Returns
    -------
    dict or None
        The summary on rank 0 (``executor="torchrun"``, ``world_size``, ``shards_resumed``, ``ranks``: per-rank
        shards and decoded-utterance counts); None on the other ranks.

    Raises
    ------
    spk_toolkit.engine.ExtractionError
        On every rank, when any rank failed (the message names the rank and its error).
    spk_toolkit.io.datadir.CorpusError
        Malformed corpus (raised on every rank, before any audio is decoded).
    """
    import torch.distributed as dist

    from spk_toolkit.backends.base import load_model
    from spk_toolkit.engine import ExtractionError, ExtractOptions, finished_shards, merge, prepare_run, run_shards
    from spk_toolkit.io.datadir import CorpusError

    t0 = time.perf_counter()
    opts = ExtractOptions(**options)
    rank, world, local_rank = dist_env()
    model_kwargs = dict(model_kwargs or {})
    device = rank_device(model_kwargs.get("device", "cpu"), local_rank)
    created = init_distributed(device)
    out = Path(output_dir)
    try:
        if model is None:
            model = load_model(toolkit, **{**model_kwargs, "device": device})
        # --- rank 0 plans, the others wait, then load plan.json -----------------------------------------------
        head = [None]
        if rank == 0:
            try:
                plan = prepare_run(data, out, model.describe(), opts, write_plan=True)
                done = finished_shards(out, len(plan.shards))
                todo = [k for k in range(len(plan.shards)) if k not in done]
                durs = [plan.shard_duration(k) for k in range(len(plan.shards))]
                head = [{"ok": True, "model_info": plan.model_info, "resumed": len(done),
                         "assignment": assign_shards(durs, todo, world)}]
            except (CorpusError, ExtractionError) as e:
                head = [{"ok": False, "error": str(e), "type": type(e).__name__}]
        dist.broadcast_object_list(head, src=0)
        head = head[0]
        if not head["ok"]:
            raise (CorpusError if head["type"] == "CorpusError" else ExtractionError)(head["error"])
        mine = head["assignment"][rank]
        status = {"rank": rank, "host": socket.gethostname(), "device": device, "shards": mine, "ok": True}
        t1 = time.perf_counter()
        try:
            if rank != 0:
                if not (out / "plan.json").is_file():
                    raise ExtractionError(f"{out / 'plan.json'} written by rank 0 is not visible here: --output_dir "
                                          "must be on a file system shared by every node")
                # overwrite was handled by rank 0; here the saved plan is reloaded (fingerprint checked)
                plan = prepare_run(data, out, head["model_info"], dataclasses.replace(opts, overwrite=False),
                                   write_plan=False)
            # --- every rank embeds its own shards -----------------------------------------------------------
            stats = run_shards(plan, mine, model, out,
                               dataclasses.replace(opts, progress=opts.progress and rank == 0, overwrite=False))
            status.update(stats)
            status["utterances_in_shards"] = int(sum(len(plan.shards[k]) for k in mine))
        except Exception as e:  # reported to every rank at the barrier below
            logger.exception("rank %d failed", rank)
            status.update(ok=False, error=f"{type(e).__name__}: {e}")
        status["wall_seconds"] = time.perf_counter() - t1
        rdir = out / "ranks"
        rdir.mkdir(parents=True, exist_ok=True)
        tmp = rdir / f".rank-{rank:05d}.json.tmp"
        tmp.write_text(json.dumps(status, indent=1, default=str))
        os.replace(tmp, rdir / f"rank-{rank:05d}.json")
        # --- barrier + error propagation ----------------------------------------------------------------------
        statuses = [None] * world
        dist.all_gather_object(statuses, status)
        failed = [s for s in statuses if not s["ok"]]
        if failed:
            raise ExtractionError("; ".join(f"rank {s['rank']} ({s['host']}): {s['error']}" for s in failed))
        n_err = sum(s.get("errors", 0) for s in statuses)
        if 0 <= opts.max_errors < n_err:
            raise ExtractionError(f"{n_err} utterances failed over {world} ranks, more than --max_errors "
                                  f"{opts.max_errors}; see the log")
        if rank != 0:
            return None
        waste = [s.get("padding_waste", 0.0) for s in statuses if s.get("shards_run")]
        return merge(plan, out, opts, {
            "wall_seconds": time.perf_counter() - t0, "shards_resumed": head["resumed"],
            "padding_waste": float(sum(waste) / len(waste)) if waste else 0.0,
            "executor": "torchrun", "world_size": world, "backend": dist.get_backend(),
            "ranks": [{k: s.get(k) for k in ("rank", "host", "device", "shards", "shards_run", "shards_skipped",
                                              "utterances", "errors", "decoded", "wall_seconds")}
                      for s in statuses],
        })
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
