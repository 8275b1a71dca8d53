"""Dask executor: shards as Dask tasks on a LocalCluster, dask_cuda LocalCUDACluster or a dask-jobqueue cluster.

Configuration (``--parallel conf/parallel_local.yaml``; the ESPnet3 ``parallel:`` block)::

    env: local          # local | local_gpu | slurm | pbs | sge
    n_workers: 2        # worker processes (local) / jobs (slurm, pbs, sge)
    options: {}         # passed to the cluster class (LocalCluster, LocalCUDACluster, SLURMCluster, ...)

The model is built once per worker by a :class:`ModelPlugin` (``WorkerPlugin.setup``; the ESPnet3 Provider's
``build_worker_setup_fn`` idea), never per task. The driver (this process) does not load the model: it asks a
worker for the model description (needed for the plan fingerprint), plans, scatters the plan to every worker
once, and submits one task per unfinished shard. Dask's scheduler gives the next shard to the first idle
worker (dynamic assignment, so heterogeneous workers finish together); a worker that dies has its task rerun
elsewhere, and finished shards are on disk. The driver merges in input order with
:func:`spk_toolkit.engine.merge`, exactly as the other executors.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger(__name__)

ENVS = ("local", "local_gpu", "slurm", "pbs", "sge")
_INSTALL = {
    "dask": "pip install 'dask[distributed]'",
    "dask_cuda": "pip install dask-cuda  (env: local_gpu)",
    "dask_jobqueue": "pip install dask-jobqueue  (env: slurm | pbs | sge)",
}

# per worker process: how many times the model was built (tested: exactly once per worker)
_STATE = {"model": None, "loads": 0, "shards": []}


def load_parallel_config(cfg: Union[str, os.PathLike, dict]) -> dict:
    """Read and validate a parallel config (YAML path or dict, optionally under a top-level ``parallel:`` key).

    Returns
    -------
    dict
        ``{"env": str, "n_workers": int, "options": dict}``.

    Raises
    ------
    ValueError
        Unknown ``env``, ``n_workers`` < 1, unknown keys (names the file).
    """
    src = str(cfg) if not isinstance(cfg, dict) else "<dict>"
    if not isinstance(cfg, dict):
        import yaml

        with open(cfg) as f:
            cfg = yaml.safe_load(f) or {}
    if "parallel" in cfg and isinstance(cfg["parallel"], dict):
        cfg = cfg["parallel"]
    unknown = sorted(set(cfg) - {"env", "n_workers", "options"})
    if unknown:
        raise ValueError(f"{src}: unknown parallel key(s) {unknown}; expected env, n_workers, options")
    env = cfg.get("env", "local")
    if env not in ENVS:
        raise ValueError(f"{src}: env must be one of {ENVS}, got {env!r}")
    n = int(cfg.get("n_workers", 1))
    if n < 1:
        raise ValueError(f"{src}: n_workers must be >= 1, got {n}")
    return {"env": env, "n_workers": n, "options": dict(cfg.get("options") or {})}


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        hint = _INSTALL.get(name.split(".")[0], "pip install " + name)
        raise ImportError(f"the Dask executor needs {name}: {hint}") from e


def make_cluster(cfg: dict):
    """Build the cluster a parallel config describes (imports lazily, with an install hint when missing).

    ``local``: ``distributed.LocalCluster(n_workers, threads_per_worker=1, processes=True, **options)``;
    ``local_gpu``: ``dask_cuda.LocalCUDACluster(n_workers=..., **options)`` (one worker per GPU);
    ``slurm``/``pbs``/``sge``: ``dask_jobqueue.{SLURM,PBS,SGE}Cluster(**options)`` then ``scale(n_workers)``.
    """
    env, n, o = cfg["env"], cfg["n_workers"], cfg["options"]
    if env == "local":
        distributed = _import("distributed")
        import logging as _logging

        return distributed.LocalCluster(**{"n_workers": n, "threads_per_worker": 1, "processes": True,
                                           "dashboard_address": ":0", "silence_logs": _logging.WARNING, **o})
    if env == "local_gpu":
        return _import("dask_cuda").LocalCUDACluster(**{"n_workers": n, "threads_per_worker": 1, **o})
    jq = _import("dask_jobqueue")
    cls = {"slurm": jq.SLURMCluster, "pbs": jq.PBSCluster, "sge": jq.SGECluster}[env]
    cluster = cls(**o)
    cluster.scale(n)
    return cluster


def _worker_device(device: str) -> str:
    # dask_cuda sets CUDA_VISIBLE_DEVICES per worker so its GPU is cuda:0
    return "cuda:0" if str(device).startswith("cuda") else str(device)


try:  # this module is imported only when the Dask executor is used
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - reported with an install hint by extract_dask
    _WorkerPlugin = object


class ModelPlugin(_WorkerPlugin):
    """Worker plugin building the embedding model once when a worker starts (or joins later).

    Parameters
    ----------
    toolkit : str
        Backend name.
    model_kwargs : dict
        Backend constructor arguments; ``device="cuda"`` means the worker's own GPU.
    """

    name = "spk_toolkit-model"

    def __init__(self, toolkit: str, model_kwargs: Optional[dict] = None):
        self.toolkit, self.model_kwargs = toolkit, dict(model_kwargs or {})

    def setup(self, worker=None):
        _load_worker_model(self.toolkit, self.model_kwargs)

    def teardown(self, worker=None):
        pass


def _load_worker_model(toolkit, model_kwargs):
    key = repr((toolkit, sorted(dict(model_kwargs).items())))
    if _STATE["model"] is None or _STATE.get("key") != key:  # a reused client may switch models
        import torch

        from spk_toolkit.backends.base import load_model

        torch.set_num_threads(max(1, int(os.environ.get("SPK_TORCH_THREADS", "1"))))
        kw = dict(model_kwargs)
        kw["device"] = _worker_device(kw.get("device", "cpu"))
        _STATE["model"] = load_model(toolkit, **kw)
        _STATE["key"] = key
        _STATE["loads"] += 1
    return _STATE["model"]


def _worker_describe(toolkit, model_kwargs) -> dict:
    return _load_worker_model(toolkit, model_kwargs).describe()


def _reset_worker_shards() -> None:
    _STATE["shards"] = []


def _worker_info() -> dict:
    return {"pid": os.getpid(), "model_loads": _STATE["loads"], "shards": list(_STATE["shards"])}


def _run_shard_task(plan, k: int, output_dir: str, opts, toolkit: str, model_kwargs: dict) -> dict:
    """One Dask task: embed shard ``k`` with this worker's model (written atomically by the engine)."""
    import multiprocessing

    from spk_toolkit.engine import run_shards

    model = _load_worker_model(toolkit, model_kwargs)  # built by the plugin; a no-op here
    # Dask worker processes are daemonic by default and cannot start DataLoader workers: decode in-process then.
    nw = 0 if multiprocessing.current_process().daemon else opts.num_workers
    t = time.perf_counter()
    stats = run_shards(plan, [k], model, output_dir, dataclasses.replace(opts, progress=False, num_workers=nw))
    _STATE["shards"].append(k)
    stats.update(shard=k, pid=os.getpid(), wall=time.perf_counter() - t,
                 seconds=plan.shard_duration(k))
    return stats


def extract_dask(data, output_dir, parallel, toolkit: str = "resemblyzer", model_kwargs=None, client=None,
                 **options) -> dict:
    """Extract with shards as Dask tasks; same plan, shard files and merge as the other executors.

    Parameters
    ----------
    data : path or sequence of Utterance
    output_dir : path
        Must be reachable by every worker (shared file system for slurm/pbs/sge).
    parallel : path or dict
        Parallel config (:func:`load_parallel_config`).
    toolkit, model_kwargs
        Backend name and constructor arguments (the model is built on the workers, never on the driver).
    client : distributed.Client, optional
        Use this client instead of building a cluster from ``parallel`` (``parallel`` is then only recorded).
    **options
        :class:`spk_toolkit.engine.ExtractOptions` fields.

    Returns
    -------
    dict
        The summary (``executor="dask"``, ``env``, ``n_workers``, ``shards_resumed``, ``workers``: per-worker
        ``model_loads`` and shards).

    Raises
    ------
    spk_toolkit.engine.ExtractionError
        A task failed (``on_error=raise``, ``max_errors``); finished shards stay on disk for a rerun.
    ImportError
        dask / dask_cuda / dask_jobqueue missing (with the pip command).
    """
    from spk_toolkit.engine import ExtractionError, ExtractOptions, finished_shards, merge, prepare_run

    t0 = time.perf_counter()
    cfg = load_parallel_config(parallel)
    opts = ExtractOptions(**options)
    model_kwargs = dict(model_kwargs or {})
    distributed = _import("distributed")
    cluster = None
    own_client = client is None
    if own_client:
        cluster = make_cluster(cfg)
        client = distributed.Client(cluster)
    out = Path(output_dir)
    try:
        client.register_plugin(ModelPlugin(toolkit, model_kwargs), name=ModelPlugin.name)
        client.run(_reset_worker_shards)  # per-run shard lists (a reused client keeps its workers)
        model_info = client.submit(_worker_describe, toolkit, model_kwargs, pure=False).result()
        plan = prepare_run(data, out, model_info, opts, write_plan=True)
        done = finished_shards(out, len(plan.shards))
        todo = [k for k in range(len(plan.shards)) if k not in done]
        task_opts = dataclasses.replace(opts, overwrite=False, progress=False)
        pbar = None
        if opts.progress:
            from tqdm import tqdm

            pbar = tqdm(total=round(sum(plan.shard_duration(k) for k in todo)), unit="s", unit_scale=True,
                        desc=f"embedding audio ({cfg['env']} x{cfg['n_workers']})", dynamic_ncols=True)
        results, n_err = [], 0
        if todo:
            plan_f = client.scatter(plan, broadcast=True)
            futs = [client.submit(_run_shard_task, plan_f, k, str(out), task_opts, toolkit, model_kwargs,
                                  key=f"spk-shard-{k:05d}-{plan.fingerprint[:10]}", pure=False, priority=-k)
                    for k in todo]
            try:
                for fut in distributed.as_completed(futs):
                    try:
                        r = fut.result()
                    except ExtractionError:
                        raise
                    except Exception as e:  # a worker-side bug or a killed worker beyond allowed-failures
                        raise ExtractionError(f"Dask task {fut.key} failed: {type(e).__name__}: {e}") from e
                    results.append(r)
                    n_err += r["errors"]
                    if 0 <= opts.max_errors < n_err:
                        raise ExtractionError(f"{n_err} utterances failed, more than --max_errors "
                                              f"{opts.max_errors}; see the workers' logs")
                    if pbar is not None:
                        pbar.update(round(r["seconds"]))
            except BaseException:
                client.cancel(futs)
                raise
        if pbar is not None:
            pbar.close()
        info = client.run(_worker_info)
        waste = [r["padding_waste"] for r in results]
        return merge(plan, out, opts, {
            "wall_seconds": time.perf_counter() - t0, "shards_resumed": len(done),
            "padding_waste": float(sum(waste) / len(waste)) if waste else 0.0,
            "executor": "dask", "env": cfg["env"], "n_workers": len(info), "world_size": len(info),
            "workers": {addr: v for addr, v in sorted(info.items())},
        })
    finally:
        if own_client:
            client.close()
            cluster.close()
