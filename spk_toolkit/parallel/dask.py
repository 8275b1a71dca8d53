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
elsewhere, and finished shards are on disk. The driver (:func:`spk_toolkit.engine.extract`) accounts and merges,
exactly as for the other executors.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Union

from spk_toolkit.parallel import Executor, register_executor

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
        Not valid YAML (``file:line:column``), not a mapping, unknown ``env``, ``n_workers`` not an integer >= 1,
        ``options`` not a mapping, unknown keys (names the file).
    OSError
        The file cannot be read.
    """
    src = str(cfg) if not isinstance(cfg, dict) else "<dict>"
    if not isinstance(cfg, dict):
        import yaml

        try:
            with open(cfg, encoding="utf-8-sig") as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{src}:{mark.line + 1}:{mark.column + 1}" if mark is not None else src
            raise ValueError(f"{where}: the parallel config is not valid YAML ({getattr(e, 'problem', None) or e})") \
                from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{src}: the parallel config is not UTF-8 text ({e.reason})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{src}: a parallel config is a mapping (env, n_workers, options), got {type(cfg).__name__}")
    if "parallel" in cfg and isinstance(cfg["parallel"], dict):
        cfg = cfg["parallel"]
    unknown = sorted(set(cfg) - {"env", "n_workers", "options"})
    if unknown:
        raise ValueError(f"{src}: unknown parallel key(s) {unknown}; expected env, n_workers, options")
    env = cfg.get("env", "local")
    if env not in ENVS:
        raise ValueError(f"{src}: env must be one of {ENVS}, got {env!r}")
    n = cfg.get("n_workers", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{src}: n_workers must be an integer >= 1, got {n!r}")
    options = cfg.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{src}: options must be a mapping of cluster arguments, got {options!r}")
    return {"env": env, "n_workers": n, "options": dict(options)}


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


def _run_shard_task(plan, k: int, output_dir: str, opts, toolkit: str, model_kwargs: dict) -> list:
    """One Dask task: compute shard ``k`` with this worker's model; returns its report(s)."""
    import multiprocessing

    from spk_toolkit.engine.run import run_shards

    from spk_toolkit.engine.options import ExtractionError

    model = _load_worker_model(toolkit, model_kwargs)  # built by the plugin; a no-op here
    # Dask worker processes are daemonic by default and cannot start DataLoader workers: decode in-process then.
    nw = 0 if multiprocessing.current_process().daemon else opts.num_workers
    try:
        reports = list(run_shards(plan, [k], model, output_dir,
                                  dataclasses.replace(opts, progress=False, num_workers=nw), worker=_worker_name()))
    except ExtractionError as e:  # an expected stop (error policy): the driver raises it, without a traceback
        return {"error": str(e)}
    _STATE["shards"].append(k)
    return reports


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


@register_executor
class DaskExecutor(Executor):
    """Shards as Dask tasks on a LocalCluster, a dask_cuda LocalCUDACluster or a dask-jobqueue cluster.

    The driver process does not load the model: a worker describes it (for the plan fingerprint); the plan is
    scattered to every worker once and one task is submitted per unfinished shard. Dask's scheduler gives the next
    shard to the first idle worker (dynamic assignment, so heterogeneous workers finish together); a worker that
    dies has its task rerun elsewhere, and finished shards are on disk.

    Parameters
    ----------
    config : dict
        :func:`load_parallel_config` output (``env``, ``n_workers``, ``options``).
    client : distributed.Client, optional
        Set :attr:`client` before ``start()`` to use an existing client (its cluster is not closed).
    """

    name = "dask"

    @classmethod
    def create(cls, toolkit: str = "resemblyzer", model=None, model_kwargs: Optional[dict] = None,
               parallel=None) -> "DaskExecutor":
        """Build from a parallel config (path or dict; ``None``: a LocalCluster with the defaults).

        Raises
        ------
        ValueError
            A built ``model`` (each worker builds its own), or a malformed parallel config.
        """
        if model is not None:
            raise ValueError("the Dask executor builds the model on each worker; pass toolkit/model_kwargs, "
                             "not a built model")
        return cls(toolkit, None, model_kwargs, parallel or {})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = load_parallel_config(self.config or {})
        self.client = None
        self._own = True
        self._cluster = None

    def start(self) -> None:
        distributed = _import("distributed")
        if logging.getLogger().getEffectiveLevel() > logging.INFO:  # Dask's INFO chatter only with -v
            logging.getLogger("distributed").setLevel(logging.WARNING)
        if self.client is None:
            self._cluster = make_cluster(self.config)
            self.client = distributed.Client(self._cluster)
        else:
            self._own = False
        self.client.register_plugin(ModelPlugin(self.toolkit, self.model_kwargs), name=ModelPlugin.name)
        self.client.run(_reset_worker_shards)  # per-run shard lists (a reused client keeps its workers)
        self._info = self.client.submit(_worker_describe, self.toolkit, self.model_kwargs, pure=False).result()

    def close(self, exc: Optional[BaseException] = None) -> None:
        if self._own and self.client is not None:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()

    def model_info(self) -> dict:
        return self._info

    def run(self, plan, shard_ids, output_dir, opts, on_progress=None):
        from spk_toolkit.engine.options import ExtractionError

        distributed = _import("distributed")
        if not shard_ids:
            return
        task_opts = dataclasses.replace(opts, overwrite=False, progress=False)
        plan_f = self.client.scatter(plan, broadcast=True)
        futs = [self.client.submit(_run_shard_task, plan_f, k, str(output_dir), task_opts, self.toolkit,
                                   self.model_kwargs, key=f"spk-shard-{k:05d}-{plan.fingerprint[:10]}",
                                   pure=False, priority=-k)
                for k in shard_ids]
        try:
            for fut in distributed.as_completed(futs):
                try:
                    reports = fut.result()
                except Exception as e:  # a worker-side bug or a killed worker beyond allowed-failures
                    raise ExtractionError(f"Dask task {fut.key} failed: {type(e).__name__}: {e}") from e
                if isinstance(reports, dict):  # the worker stopped as the error policy says
                    raise ExtractionError(reports["error"])
                for rep in reports:
                    if on_progress is not None:
                        on_progress(plan.shard_duration(rep.shard))
                    yield rep
        finally:
            self.client.cancel(futs)

    def info(self) -> dict:
        info = self.client.run(_worker_info)
        return {"executor": "dask", "env": self.config["env"], "n_workers": len(info), "world_size": len(info),
                "workers": {addr: v for addr, v in sorted(info.items())}}
