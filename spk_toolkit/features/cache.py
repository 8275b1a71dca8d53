"""The offline feature / token cache: compute once on the one engine, read back fast (keyed, partial, per worker).

:func:`cache_features` runs a feature extractor over a corpus through :func:`spk_toolkit.engine.extract`: the
same plan, duration-balanced shards, executors (in-process, torchrun, Dask), resume, lock, error policy and
``summary.json`` as embedding extraction. The cache directory holds, per output ``<name>`` (``fbank``,
``tokens``, ...), one file set per storage format (``<name>.h5``, ``<name>.scp`` + ``.ark``, ``<name>.npz``,
``<name>/``), in the corpus' input order, with exactly each utterance's frames (no padding).

:func:`open_cache` gives a lazy ``Mapping[utt_id, np.ndarray]`` (:class:`FeatureCache`) with partial reads
(``cache.read(key, start_frame, end_frame)``) and, given the extractor you mean to train with, refuses a cache
computed with another one (:class:`StaleCacheError`, naming every difference). :class:`CacheDataset` serves a
cache to a ``torch.utils.data.DataLoader`` (handles reopened in each worker after fork; crops as partial reads).

Staleness, all recorded by the engine: the extractor's ``describe()`` (its whole config, a hash of its code and
of the implementation it calls, weights hashes, package versions) is part of the plan and shard fingerprints,
so a rerun with another extractor is refused naming what changed (or ``overwrite=True``), and each shard's
fingerprint covers its source files' size and modification time, so a changed audio file is recomputed on the
next run while the other shards are kept.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from spk_toolkit.features.base import FeatureExtractor, as_extractor

__all__ = ["cache_features", "open_cache", "FeatureCache", "CacheDataset", "StaleCacheError", "collate_frames"]


class StaleCacheError(ValueError):
    """A cache computed with another extractor (config, code, weights or version) than the one asked for."""


def _extractor_class(name: str):
    from spk_toolkit.backends.base import BACKENDS, _import_all

    _import_all()
    cls = BACKENDS.get(name)
    if cls is None or not issubclass(cls, FeatureExtractor):
        from spk_toolkit.features import available_extractors

        raise ValueError(f"unknown feature extractor {name!r}; registered: {', '.join(available_extractors())}")
    return cls


def cache_features(data, output_dir, extractor: Union[str, FeatureExtractor, object] = "fbank",
                   extractor_conf: Optional[dict] = None, output_format: Union[str, Sequence[str]] = "hdf5",
                   writer_options: Optional[Dict[str, dict]] = None, executor: Optional[str] = None, parallel=None,
                   device: str = "cpu", **options) -> Optional[dict]:
    """Compute a feature extractor's outputs for every utterance of a corpus into a cache directory.

    Runs on the one engine (:func:`spk_toolkit.engine.extract`): resumable (finished shards are verified and
    kept), one run per directory (a lock), every executor, the error policy, ``summary.json``.

    Parameters
    ----------
    data : path or sequence of Utterance
        Kaldi data dir, ESPnet3 manifest TSV, audio tree, or records.
    output_dir : path
        The cache directory.
    extractor : str, FeatureExtractor or callable, default="fbank"
        A registry name (:func:`spk_toolkit.features.available_extractors`; built on each worker with
        ``extractor_conf``: every executor), an extractor instance, or a callable / ``nn.Module`` already wrapped
        by :func:`spk_toolkit.features.as_extractor` (instances: in-process and torchrun executors only).
    extractor_conf : dict, optional
        Constructor options of a named extractor (``{"num_mel_bins": 80, "dtype": "float16"}``).
    output_format : str or list of str, default="hdf5"
        Storage formats (``hdf5``, ``kaldi_ark``, ``npz``, ``npy_dir``; comma list).
    writer_options : dict, optional
        ``format -> options`` of its writer (``{"hdf5": {"compression": "lzf"}}``).
    executor : str, optional
        ``inprocess`` (default), ``torchrun`` (every rank calls this; rank 0 merges), ``dask``.
    parallel : path or dict, optional
        Dask parallel config (implies ``executor="dask"``).
    device : str, default="cpu"
        Where a named extractor runs (``cuda``: torchrun ranks use their local GPU, Dask workers theirs).
    **options
        Further :class:`spk_toolkit.engine.ExtractOptions` fields (``batch_bins``, ``num_workers``,
        ``shard_duration``, ``on_error``, ``max_errors``, ``min_duration``, ``overwrite``, ``lock_timeout``, ...).

    Returns
    -------
    dict or None
        The run summary (``summary.json``: ``model`` is the extractor's description, ``kinds`` the outputs,
        ``outputs_by_name`` their files); None on torchrun ranks > 0.

    Raises
    ------
    ValueError
        Unknown extractor or invalid options (before any work), ``extractor_conf`` with an instance.
    spk_toolkit.CorpusError
        Malformed corpus.
    spk_toolkit.ExtractionError
        The directory holds a cache of another extractor / corpus (what changed is named), is locked by another
        run, the error policy stopped the run, or a worker failed.

    Examples
    --------
    >>> s = cache_features("data/fillets_small", "exp/cache_fbank", "fbank", {"num_mel_bins": 80},
    ...                    output_format="hdf5")                                       # doctest: +SKIP
    >>> cache = open_cache("exp/cache_fbank")                                          # doctest: +SKIP
    """
    from spk_toolkit import engine

    common = dict(executor=executor, parallel=parallel, output_format=output_format,
                  writer_options=dict(writer_options or {}), **options)
    if isinstance(extractor, str):
        _extractor_class(extractor)
        return engine.extract(data, output_dir, toolkit=extractor,
                              model_kwargs={"device": device, **dict(extractor_conf or {})}, **common)
    if extractor_conf:
        raise ValueError("extractor_conf applies to an extractor given by name, not to an instance")
    model = as_extractor(extractor)
    return engine.extract(data, output_dir, toolkit=model.name or "callable", model=model, **common)


# ----------------------------------------------------------------------------------------------------- reading
def _json(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _drop(d, ignore: Sequence[str]):
    d = _json(d)
    for path in ignore:
        cur, parts = d, path.split(".")
        for p in parts[:-1]:
            cur = cur.get(p) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return d


def _expected_description(extractor, extractor_conf) -> Optional[dict]:
    if extractor is None:
        if extractor_conf:
            raise ValueError("extractor_conf without extractor")
        return None
    if isinstance(extractor, str):
        return _extractor_class(extractor)(**dict(extractor_conf or {})).describe()
    if extractor_conf:
        raise ValueError("extractor_conf applies to an extractor given by name")
    if isinstance(extractor, FeatureExtractor):
        return extractor.describe()
    if isinstance(extractor, Mapping):
        return dict(extractor)
    raise TypeError(f"extractor must be a registry name, a FeatureExtractor or a description dict, got "
                    f"{type(extractor).__name__}")


def open_cache(path, output: Optional[str] = None, fmt: Optional[str] = None, extractor=None,
               extractor_conf: Optional[dict] = None, ignore: Sequence[str] = ()) -> "FeatureCache":
    """Open a finished cache directory as a lazy ``Mapping[utt_id, np.ndarray]``.

    Parameters
    ----------
    path : path
        The cache directory (its ``summary.json`` names the outputs and records the extractor).
    output : str, optional
        Output name (``fbank``, ``tokens``, ...); required when the cache holds several.
    fmt : str, optional
        Storage format to read (default: the first of the run's ``output_format`` whose files exist).
    extractor : str, FeatureExtractor or dict, optional
        The extractor you mean to use the cache with: a registry name (built with ``extractor_conf``), an
        instance, or a ``describe()`` dict. Its description must equal the recorded one, except for the dotted
        keys in ``ignore``; otherwise :class:`StaleCacheError`.
    extractor_conf : dict, optional
        Options of a named ``extractor``.
    ignore : sequence of str
        Description keys not compared (``"spk_toolkit_version"``, ``"code_sha256"``, ``"config.dtype"``, ...).

    Returns
    -------
    FeatureCache

    Raises
    ------
    FileNotFoundError
        No such directory, or no ``summary.json`` (the run did not finish: rerun ``cache_features``, which
        resumes), or the output's files are gone.
    ValueError
        ``output`` missing / unknown (the outputs listed), ``fmt`` not written (the formats listed).
    StaleCacheError
        The recorded extractor differs from ``extractor``: every difference named (``config.num_mel_bins: 80 ->
        64``).
    """
    from spk_toolkit.engine.plan import describe_changes
    from spk_toolkit.io.rundir import RunDir
    from spk_toolkit.io.storage import READERS, get_reader, load_plugins

    load_plugins()

    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"cache directory not found: {d}")
    rd = RunDir(d)
    sfile = rd.summary_path
    summary = rd.read_summary()
    if summary is None:
        raise FileNotFoundError(f"{d} holds no finished cache (no {sfile.name}): run cache_features into it to "
                                "completion (it resumes the finished shards)")
    by_name = summary.get("outputs_by_name") or {}
    kinds = summary.get("kinds") or {}
    if not by_name:
        raise ValueError(f"{sfile} names no outputs")
    if output is None:
        if len(by_name) != 1:
            raise ValueError(f"{d} holds outputs {', '.join(sorted(by_name))}: choose one with output=")
        output = next(iter(by_name))
    if output not in by_name:
        raise ValueError(f"{d} has no output {output!r}; outputs: {', '.join(sorted(by_name))}")
    files = by_name[output]
    written = summary.get("output_formats", [])
    order = [f for f in written if f in files] + [f for f in files if f not in written]
    if fmt is not None:
        name = get_reader(fmt).name
        if name not in files:
            raise ValueError(f"{d}: output {output!r} was not written as {name}; formats: {', '.join(order)}")
        order = [name]
    target = None
    for f in order:
        if f in READERS and (d / Path(files[f]).name).exists():  # the directory may have moved since
            target = f
            break
    if target is None:
        raise FileNotFoundError(f"{d}: none of the files of output {output!r} exists "
                                f"({', '.join(Path(files[f]).name for f in order)})")
    recorded = summary.get("model") or {}
    expected = _expected_description(extractor, extractor_conf)
    if expected is not None:
        changes = describe_changes(_drop(recorded, ignore), _drop(expected, ignore))
        if changes:
            raise StaleCacheError(
                f"{d} was cached with another extractor than the one asked for: " + "; ".join(changes[:12])
                + (f" (and {len(changes) - 12} more)" if len(changes) > 12 else "")
                + "; recompute it (cache_features(..., overwrite=True)) or read it with the recorded settings")
    reader = READERS[target](d / Path(files[target]).name)
    return FeatureCache(reader, output, kinds.get(output, {}), recorded, summary, d, target)


class FeatureCache(Mapping):
    """A lazy, read-only ``Mapping[utt_id, np.ndarray]`` over one output of a cache (:func:`open_cache`).

    ``cache[utt_id]`` reads one utterance's ``(T', F)`` frames (or ``(T',)`` tokens) in the stored dtype;
    iteration follows the corpus' input order; ``len`` and ``in`` read no arrays. Picklable without its file
    handles, which are reopened in each process (DataLoader workers after fork, spawn workers).

    Attributes
    ----------
    path : Path
        The cache directory.
    output : str
        The output name.
    kind : dict
        ``{"kind": "sequence", "dtype": ..., "shape": [F]}``.
    extractor : dict
        The recorded extractor description (``config``, ``code_sha256``, versions, ...).
    format : str
        The storage format read.
    reader : spk_toolkit.io.storage.Reader
    summary : dict
        ``summary.json``.
    """

    def __init__(self, reader, output: str, kind: dict, extractor: dict, summary: dict, path: Path, fmt: str):
        self.reader, self.output, self.kind, self.extractor = reader, output, kind, extractor
        self.summary, self.path, self.format = summary, Path(path), fmt

    @property
    def frame_rate(self) -> Optional[float]:
        """Frames per second where the extractor records it (fbank / mfcc), else None."""
        fr = self.extractor.get("frame_rate")
        return float(fr) if fr else None

    def __getitem__(self, key: str) -> np.ndarray:
        return self.reader[key]

    def read(self, key: str, start_frame: int = 0, end_frame: Optional[int] = None) -> np.ndarray:
        """Frames ``start_frame:end_frame`` of ``key`` only (:meth:`spk_toolkit.io.storage.Reader.read`).

        Returns
        -------
        np.ndarray of shape (end_frame - start_frame, *F)

        Raises
        ------
        KeyError
            Unknown key.
        ValueError
            A range outside ``[0, num_frames(key)]``.
        """
        return self.reader.read(key, start_frame, end_frame)

    def num_frames(self, key: str) -> int:
        """Frames of ``key`` (from the header where the format allows)."""
        return self.reader.num_frames(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader)

    def __len__(self) -> int:
        return len(self.reader)

    def __contains__(self, key) -> bool:
        return key in self.reader

    def close(self) -> None:
        """Close the file handle (reopened on the next read)."""
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"FeatureCache({os.fspath(self.path)!r}, output={self.output!r}, format={self.format!r}, "
                f"{len(self)} utterances, {self.kind.get('dtype')} {self.kind.get('shape')})")


# ------------------------------------------------------------------------------------------------ the dataset
class CacheDataset(torch.utils.data.Dataset):
    """A ``torch.utils.data.Dataset`` over a cache: item ``i`` is one utterance (or one crop of it).

    The cache is opened lazily in each process that reads (the reader reopens its handle after a fork), so a
    ``DataLoader`` with worker processes reads HDF5 safely.

    Parameters
    ----------
    cache : FeatureCache or path
        An open cache, or a cache directory (opened with ``open_kwargs``).
    keys : sequence of str, optional
        Utterances to serve, in order (default: every utterance of the cache).
    segments : sequence of (str, int, int), optional
        ``(utt_id, start_frame, end_frame)`` items instead of whole utterances (partial reads: e.g. the fixed
        crops of a training epoch).
    open_kwargs : dict, optional
        :func:`open_cache` arguments when ``cache`` is a path (``output``, ``fmt``, ``extractor`` ...).

    Returns (``__getitem__``)
    -------------------------
    dict
        ``{"id": utt_id, "feats": torch.Tensor (T, *F) in the stored dtype, "frames": int}``.

    Raises
    ------
    KeyError
        (at construction) a key that is not in the cache.
    """

    def __init__(self, cache, keys: Optional[Sequence[str]] = None,
                 segments: Optional[Sequence[Tuple[str, int, int]]] = None, open_kwargs: Optional[dict] = None):
        if keys is not None and segments is not None:
            raise ValueError("give keys or segments, not both")
        self._cache = cache if isinstance(cache, FeatureCache) else None
        self._path = None if self._cache is not None else Path(cache)
        self._open_kwargs = dict(open_kwargs or {})
        c = self.cache
        if segments is not None:
            self.items: List[Tuple[str, int, Optional[int]]] = [(str(k), int(s), int(e)) for k, s, e in segments]
        else:
            self.items = [(k, 0, None) for k in (list(keys) if keys is not None else list(c))]
        missing = [k for k, _, _ in self.items if k not in c]
        if missing:
            raise KeyError(f"{len(missing)} utterance(s) not in {c.path}, e.g. {missing[:3]}")

    @property
    def cache(self) -> FeatureCache:
        """The cache (opened on first use in this process when given as a path)."""
        if self._cache is None:
            self._cache = open_cache(self._path, **self._open_kwargs)
        return self._cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        key, s, e = self.items[i]
        a = self.cache.read(key, s, e) if (s, e) != (0, None) else self.cache[key]
        return {"id": key, "feats": torch.from_numpy(np.ascontiguousarray(a)), "frames": int(a.shape[0])}

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._path is not None:
            state["_cache"] = None  # reopened in the receiving process
        return state


def collate_frames(items: Sequence[dict]) -> dict:
    """Collate :class:`CacheDataset` items into a zero-padded batch (``DataLoader(collate_fn=collate_frames)``).

    Returns
    -------
    dict
        ``{"ids": list of str, "feats": (B, T_max, *F) zero-padded, "lengths": (B,) int64 frames}``.
    """
    from spk_toolkit.features.base import pad_frames

    feats, lengths = pad_frames([it["feats"] for it in items])
    return {"ids": [it["id"] for it in items], "feats": feats, "lengths": lengths}
