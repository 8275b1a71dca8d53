"""torchrun executor: one process per device, rank 0 drives, every rank runs its own shards.

Usage::

    torchrun --nproc_per_node=4 -m spk_toolkit.bin.spk_inference --device cuda --data_dir D --output_dir O
    torchrun --nnodes=2 --node_rank=$R --master_addr=$HOST --nproc_per_node=8 -m spk_toolkit.bin.spk_inference ...

The CLIs detect the launch (``RANK``/``WORLD_SIZE``, :func:`spk_toolkit.parallel.torchrun_launch`), log it and
pass ``executor="torchrun"``; a library call must ask for it (``extract(..., executor="torchrun")``). The protocol
is in :class:`TorchrunExecutor`. Only rank 0 shows a progress bar and returns the summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from spk_toolkit.io.rundir import RunDir
from spk_toolkit.engine.options import ExtractionError
from spk_toolkit.parallel import Executor, assign_shards, register_executor, torchrun_launch

logger = logging.getLogger(__name__)


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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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


@register_executor
class TorchrunExecutor(Executor):
    """One process per device under torchrun; rank 0 is the driver, every rank (rank 0 too) runs shards.

    Protocol (collectives on the default process group: gloo on CPU, NCCL with ``device="cuda"``, one device per
    local rank):

    1. Every rank builds its model (``cuda`` -> ``cuda:LOCAL_RANK``).
    2. Rank 0 (the driver) takes the output directory lock, plans, verifies finished shards, then broadcasts the
       start message: the plan fingerprint and the assignment of the unfinished shards
       (:func:`spk_toolkit.parallel.assign_shards`, longest first to the least-loaded rank) — or the driver's
       error, which every rank raises.
    3. Each rank reloads ``plan.json`` (fingerprint checked) and runs its own shards only (it decodes no other
       audio); ``all_gather_object`` of the ranks' reports (or errors) is the barrier after which the driver
       accounts every report.
    4. The driver merges and broadcasts the outcome, so every rank exits with the same status.

    Why static assignment: the plan cuts shards of equal audio, so LPT gives each rank the same audio to within
    one shard; it needs no locking on the shared file system, each rank feeds its shards through one DataLoader
    (decoding runs ahead across shard boundaries), and it is recomputed over the *unfinished* shards on every
    (re)start. Its limit is heterogeneous or straggling nodes; use the Dask executor (dynamic) there.
    """

    name = "torchrun"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        launch = torchrun_launch()
        dist = _dist()
        if dist.is_available() and dist.is_initialized():  # e.g. ESPnet's trainer (--dist_rank, SLURM launches)
            rank, world = dist.get_rank(), dist.get_world_size()
            if launch is not None and (launch["rank"], launch["world_size"]) != (rank, world):
                raise ValueError(f"RANK/WORLD_SIZE {launch['rank']}/{launch['world_size']} disagree with the "
                                 f"initialised process group (rank {rank} of {world})")
            local = launch["local_rank"] if launch else int(os.environ.get("LOCAL_RANK", "0") or 0)
            launch = {"rank": rank, "world_size": world, "local_rank": local}
        if launch is None:
            raise ValueError("--executor torchrun needs a torchrun launch (RANK and WORLD_SIZE are not set) or an "
                             "initialised process group: torchrun --nproc_per_node=N -m spk_toolkit.bin.spk_inference")
        self.rank, self.world, self.local_rank = launch["rank"], launch["world_size"], launch["local_rank"]
        self.is_driver = self.rank == 0
        self.device = rank_device(self.model_kwargs.get("device", "cpu"), self.local_rank)
        self._created = False
        self._phase = "idle"  # idle -> started (start message sent/received) -> gathered -> done
        self.host = socket.gethostname()
        self.worker = f"rank {self.rank} ({self.host})"

    # -- set-up / tear-down ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._created = init_distributed(self.device)
        logger.info("torchrun executor: rank %d of %d (local rank %d) on %s, device %s, backend %s", self.rank,
                    self.world, self.local_rank, self.host, self.device, _dist().get_backend())
        if self.model is None:
            from spk_toolkit.backends.base import load_model

            self.model = load_model(self.toolkit, **{**self.model_kwargs, "device": self.device})

    def close(self, exc: Optional[BaseException] = None) -> None:
        dist = _dist()
        try:
            if self.is_driver and dist.is_initialized():
                err = None if exc is None else _message(exc)
                if self._phase == "idle":  # failed before the start message: release the waiting ranks
                    self._bcast({"ok": False, "error": err or "the driver stopped before starting", "type":
                                 type(exc).__name__ if exc else "ExtractionError"})
                elif self._phase == "started":  # failed while ranks run: join their barrier, then tell them
                    self._gather({"ok": False, "error": err, "worker": self.worker, "reports": []})
                if self._phase in ("started", "gathered"):
                    self._bcast({"ok": exc is None, "error": err})
                self._phase = "done"
        finally:
            if self._created and dist.is_initialized():
                dist.destroy_process_group()

    # -- collectives -------------------------------------------------------------------------------------------
    def _bcast(self, obj=None):
        box = [obj]
        _dist().broadcast_object_list(box, src=0)
        return box[0]

    def _gather(self, obj):
        allv = [None] * self.world
        _dist().all_gather_object(allv, obj)
        self._phase = "gathered"
        return allv

    # -- driver ------------------------------------------------------------------------------------------------
    def model_info(self) -> dict:
        return self.model.describe()

    def run(self, plan, shard_ids, output_dir, opts, on_progress=None):
        durs = [plan.shard_duration(k) for k in range(len(plan.shards))]
        assignment = assign_shards(durs, shard_ids, self.world)
        self._bcast({"ok": True, "fingerprint": plan.fingerprint, "model_info": plan.model_info,
                     "assignment": assignment})
        self._phase = "started"
        from spk_toolkit.engine.run import run_shards

        status = {"ok": True, "worker": self.worker, "reports": []}
        try:  # rank 0's reports reach the driver as they come (progress, error policy)
            yield from run_shards(plan, assignment[0], self.model, output_dir, opts, on_progress=on_progress,
                                  worker=self.worker)
        except Exception as e:  # joined with the other ranks' outcome at the barrier
            _log_failure(self.worker, e)
            status.update(ok=False, error=_message(e))
        statuses = self._gather(status)
        failed = [s for s in statuses if not s["ok"]]
        if failed:
            raise ExtractionError("; ".join(f"{s['worker']}: {s['error']}" for s in failed))
        for s in statuses[1:]:
            yield from s["reports"]

    # -- ranks > 0 ---------------------------------------------------------------------------------------------
    def serve(self, data, output_dir, opts) -> None:
        from spk_toolkit.engine.plan import prepare_run
        from spk_toolkit.io.datadir import CorpusError

        head = self._bcast()
        if not head["ok"]:
            self._phase = "done"
            raise (CorpusError if head.get("type") == "CorpusError" else ExtractionError)(head["error"])
        self._phase = "started"
        status = {"ok": True, "worker": self.worker, "reports": []}
        try:
            plan_file = RunDir(output_dir).plan_path
            if not plan_file.is_file():
                raise ExtractionError(f"{plan_file} written by rank 0 is not visible here: "
                                      "--output_dir must be on a file system shared by every node")
            plan = prepare_run(data, output_dir, head["model_info"], dataclasses.replace(opts, overwrite=False),
                               write_plan=False)
            if plan.fingerprint != head["fingerprint"]:
                raise ExtractionError("this rank sees another corpus than rank 0 (plan fingerprints differ)")
            from spk_toolkit.engine.run import run_shards

            status["reports"] = list(run_shards(plan, head["assignment"][self.rank], self.model, output_dir,
                                                dataclasses.replace(opts, progress=False), worker=self.worker))
        except Exception as e:
            _log_failure(self.worker, e)
            status.update(ok=False, error=_message(e))
        self._gather(status)
        final = self._bcast()
        self._phase = "done"
        if not final["ok"]:
            raise ExtractionError(final["error"] or "the run failed on rank 0")

    def info(self) -> dict:
        return {"executor": "torchrun", "world_size": self.world, "backend": _dist().get_backend()}


def _dist():
    import torch.distributed as dist

    return dist


def _log_failure(worker: str, e: BaseException) -> None:
    if isinstance(e, ExtractionError):  # an expected failure (bad utterance, error policy): one line
        logger.error("%s stopped: %s", worker, e)
    else:
        logger.exception("%s failed", worker)


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, ExtractionError) else f"{type(e).__name__}: {e}"
