"""Shard files: the unit of work and of recovery (DESIGN.md property 4).

``shards/shard-KKKKK.npz`` is an uncompressed ``np.savez`` archive committed atomically
(:func:`spk_toolkit.io.atomic.atomic_path`), with

``meta``
    uint8 array holding UTF-8 JSON: format version, shard index, plan fingerprint, shard fingerprint, utterance
    ids of the stored rows (in row order), error records ``[utt_id, path, reason]``, per output its kind,
    dtype and trailing shape, audio seconds, wall time, worker, and the sha256 of the data arrays.
``o.<name>.data``
    one output's rows concatenated along axis 0: ``(N, D)`` for a vector output, ``(sum T_i, ...)`` for a
    sequence output, in the dtype the model gave.
``o.<name>.lengths``
    int64 ``(N,)`` per-utterance first-axis lengths of a sequence output (absent for vector outputs).

Utterance ids live in the JSON (any string round-trips; numpy's fixed-width unicode would drop trailing NULs).
:func:`read_shard` verifies all of it against the plan; anything that does not verify raises
:class:`ShardInvalid` naming the file, and the driver recomputes that shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from spk_toolkit.engine.faults import fault_point
from spk_toolkit.io.atomic import atomic_path
from spk_toolkit.io.preflight import naming
from spk_toolkit.io.rundir import RunDir

SHARD_VERSION = 1


class ShardInvalid(ValueError):
    """A shard file that cannot be used: unreadable, truncated, foreign (other plan/model/sources) or corrupt."""


@dataclasses.dataclass
class ShardData:
    """One finished shard, as written by a worker and read back by the driver.

    Attributes
    ----------
    index : int
        Shard id in the plan.
    keys : list of str
        Utterance ids of the stored rows, in row order.
    outputs : dict
        ``name -> list of np.ndarray`` (one array per key: ``(D,)`` vector or ``(T, ...)`` sequence).
    kinds : dict
        ``name -> {"kind": "vector"|"sequence", "dtype": str, "shape": list}`` (trailing shape).
    errors : list of [utt_id, path, reason]
    audio_seconds : float
        Audio of the embedded utterances (planned input durations, or the clipped length where clipped).
    wall : float
        Seconds the shard took on its worker.
    worker : str
        Who computed it (``"in-process"``, ``"rank 1 (host)"``, a Dask worker address).
    clipped : list of [utt_id, seconds]
        Stored segments that ran past the end of their file, clipped to the seconds that exist
        (``--segment_overrun clip``).
    """

    index: int
    keys: List[str]
    outputs: Dict[str, List[np.ndarray]]
    kinds: Dict[str, dict]
    errors: List[list]
    audio_seconds: float = 0.0
    wall: float = 0.0
    worker: str = ""
    clipped: List[list] = dataclasses.field(default_factory=list)


def shard_path(output_dir, k: int) -> Path:
    """Path of shard ``k``'s file: ``<output_dir>/shards/shard-KKKKK.npz``."""
    return RunDir(output_dir).shard_path(k)


def _checksum(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\t{a.dtype.str}\t{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_shard(output_dir, shard: ShardData, plan_fingerprint: str, shard_fingerprint: str) -> Path:
    """Commit ``shard`` atomically under :func:`shard_path` (a reader never sees a partial file).

    Raises
    ------
    OSError
        The shard directory is not writable or the disk is full (``filename`` names the shard file; nothing is
        left under the final name or a temporary one).
    """
    arrays: Dict[str, np.ndarray] = {}
    for name, rows in shard.outputs.items():
        kind = shard.kinds[name]
        dtype = np.dtype(kind["dtype"])
        tail = tuple(kind["shape"])
        if kind["kind"] == "vector":
            arrays[f"o.{name}.data"] = np.stack(rows).astype(dtype, copy=False) if rows else np.zeros((0, *tail), dtype)
        else:
            arrays[f"o.{name}.data"] = (np.concatenate(rows, axis=0).astype(dtype, copy=False) if rows
                                        else np.zeros((0, *tail), dtype))
            arrays[f"o.{name}.lengths"] = np.array([len(r) for r in rows], dtype=np.int64)
    meta = {"version": SHARD_VERSION, "shard": int(shard.index), "plan_fingerprint": plan_fingerprint,
            "fingerprint": shard_fingerprint, "keys": list(shard.keys),
            "errors": [list(e) for e in shard.errors], "kinds": shard.kinds,
            "audio_seconds": float(shard.audio_seconds), "wall": float(shard.wall), "worker": shard.worker,
            "clipped": [[str(u), float(sec)] for u, sec in shard.clipped], "checksum": _checksum(arrays)}
    path = shard_path(output_dir, shard.index)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8), **arrays)
            fault_point("shard_writing")
    return path


def read_shard(path, expect_index: int, expect_keys: Optional[List[str]] = None,
               expect_fingerprint: Optional[str] = None, with_data: bool = True) -> ShardData:
    """Read and verify a shard file.

    Parameters
    ----------
    path : path
    expect_index : int
        The shard id the file must hold.
    expect_keys : list of str, optional
        The plan's utterance ids of this shard: the stored rows plus the error records must be exactly these.
    expect_fingerprint : str, optional
        :meth:`spk_toolkit.engine.plan.Plan.shard_fingerprint` of this shard now.
    with_data : bool
        Also read (and checksum) the arrays; False reads only the metadata.

    Returns
    -------
    ShardData

    Raises
    ------
    ShardInvalid
        Unreadable / truncated / not a shard, another shard's or run's file, keys that differ from the plan, a
        fingerprint that differs (sources or model changed), or a checksum mismatch; the message names ``path``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            if meta.get("version") != SHARD_VERSION:
                raise ShardInvalid(f"{path}: shard format version {meta.get('version')!r} != {SHARD_VERSION}")
            if meta.get("shard") != expect_index:
                raise ShardInvalid(f"{path}: holds shard {meta.get('shard')!r}, not {expect_index}")
            if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
                raise ShardInvalid(f"{path}: computed for other inputs (a source file, the model or the options "
                                   "changed since)")
            keys = list(meta["keys"])
            errors = [list(e) for e in meta["errors"]]
            if expect_keys is not None:
                got = keys + [e[0] for e in errors]
                if len(got) != len(set(got)) or set(got) != set(expect_keys):
                    raise ShardInvalid(f"{path}: holds {len(got)} utterance records that are not the plan's "
                                       f"{len(expect_keys)} utterances of shard {expect_index}")
            outputs: Dict[str, List[np.ndarray]] = {}
            if with_data:
                arrays = {n: z[n] for n in z.files if n != "meta"}
                if _checksum(arrays) != meta.get("checksum"):
                    raise ShardInvalid(f"{path}: checksum mismatch (corrupt data)")
                for name, kind in meta["kinds"].items():
                    data = arrays[f"o.{name}.data"]
                    if kind["kind"] == "vector":
                        if len(data) != len(keys):
                            raise ShardInvalid(f"{path}: {len(data)} rows of {name!r} for {len(keys)} utterances")
                        outputs[name] = list(data)
                    else:
                        lens = arrays[f"o.{name}.lengths"]
                        if len(lens) != len(keys) or int(lens.sum()) != len(data):
                            raise ShardInvalid(f"{path}: lengths of {name!r} do not match its data")
                        outputs[name] = np.split(data, np.cumsum(lens)[:-1]) if len(lens) else []
    except ShardInvalid:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ShardInvalid(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
    return ShardData(expect_index, keys, outputs, meta["kinds"], errors, float(meta.get("audio_seconds", 0.0)),
                     float(meta.get("wall", 0.0)), str(meta.get("worker", "")), list(meta.get("clipped", [])))
