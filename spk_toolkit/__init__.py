"""spk_toolkit: dataset-scale speaker embedding extraction and open-set verification scoring.

Python API (heavy modules load on first use, so ``import spk_toolkit`` is fast)::

    import spk_toolkit
    e = spk_toolkit.embed_file("a.wav")                                            # (256,) float32, resemblyzer
    r = spk_toolkit.verify("a.wav", "b.wav", threshold=0.75)                       # Verification(score, decision, ..)
    E = spk_toolkit.embed_waveforms([w1, w2], sample_rate=22050)                   # resampled, VAD as the pipeline
    summary = spk_toolkit.extract_embeddings("data/fillets", "exp/fillets")         # a whole corpus, resumable
    emb = spk_toolkit.load_embeddings("exp/fillets/embeddings.npz")                # {utt_id: (D,) float32}
    res = spk_toolkit.score_trials(emb, "data/fillets_trials.txt")                  # EER %, minDCF
    model = spk_toolkit.load_model("resemblyzer"); model.embed(wav, lengths)       # (B, T), (B,) -> (B, D)
    spk_toolkit.metrics.eer(scores, labels); spk_toolkit.available_models()
    spk_toolkit.cache_features("data/fillets", "exp/fbank", "fbank")              # offline feature cache (hdf5)
    fbank = spk_toolkit.open_cache("exp/fbank"); fbank.read(utt_id, 100, 400)      # (300, 80) float32, partial read
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "spk_toolkit.backends.base",
    "available_backends": "spk_toolkit.backends.base",
    "EmbeddingModel": "spk_toolkit.backends.base",
    "load_embeddings": "spk_toolkit.io.readers",
    "load_corpus": "spk_toolkit.io.datadir",
    "Utterance": "spk_toolkit.io.datadir",
    "CorpusError": "spk_toolkit.io.datadir",
    "ExtractionError": "spk_toolkit.errors",
    "UtteranceError": "spk_toolkit.errors",
    "ExtractOptions": "spk_toolkit.engine",
    "AudioLoadingError": "spk_toolkit.io.audio",
    "embed_file": "spk_toolkit.api",
    "embed_files": "spk_toolkit.api",
    "embed_waveforms": "spk_toolkit.api",
    "verify": "spk_toolkit.api",
    "Verification": "spk_toolkit.api",
    "get_model": "spk_toolkit.api",
    "available_models": "spk_toolkit.api",
    "resolve_model": "spk_toolkit.models",
    "cache_features": "spk_toolkit.features.cache",
    "open_cache": "spk_toolkit.features.cache",
    "load_extractor": "spk_toolkit.features",
}
#: submodules reachable as attributes (``spk_toolkit.metrics.eer``) without importing them up front
_SUBMODULES = ("api", "backends", "data", "engine", "features", "io", "metrics", "models", "parallel", "plot",
               "scoring", "testing")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"spk_toolkit.{name}")
    raise AttributeError(f"module 'spk_toolkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def extract_embeddings(data, output_dir, toolkit: str = "resemblyzer", model=None, model_kwargs=None,
                       executor=None, parallel=None, **options):
    """Extract one embedding per utterance of a corpus into ``output_dir`` (:func:`spk_toolkit.engine.extract`).

    Runs in this process unless ``executor`` (``"torchrun"``: every rank calls this, rank 0 merges; ``"dask"``)
    or ``parallel`` (a Dask parallel config) says otherwise; the environment never switches executor. Resumes
    a previous run in ``output_dir`` (finished shards are verified and skipped).

    Parameters
    ----------
    data : path or sequence of Utterance
        Kaldi data dir, ESPnet3 manifest TSV, audio tree ``root/<dataset>/<speaker>/<utt>.<ext>``, or records.
    output_dir : path
    toolkit : str
        Backend registry name (``resemblyzer`` default, ``espnet``).
    model : EmbeddingModel, optional
        Use this backend instance instead of building one (in-process and torchrun executors).
    model_kwargs : dict, optional
        Backend constructor arguments.
    executor : str, optional
        ``inprocess`` (default), ``torchrun``, ``dask`` (:mod:`spk_toolkit.parallel`).
    parallel : path or dict, optional
        Dask parallel config (YAML path or ``{env, n_workers, options}``); implies ``executor="dask"``.
    **options
        :class:`spk_toolkit.engine.ExtractOptions` fields (``batch_bins``, ``num_workers``, ``output_format``,
        ``on_error``, ``max_errors``, ``min_duration``, ``allow_pipes``, ``shard_duration``, ``overwrite``,
        ``crops``, ``lock_timeout``, ...).

    Returns
    -------
    dict or None
        The run summary (``summary.json``); None on torchrun ranks > 0.

    Raises
    ------
    spk_toolkit.CorpusError
        Malformed corpus, before any work starts.
    spk_toolkit.ExtractionError
        ``on_error="raise"`` met a bad utterance, too many errors, a changed corpus/model in ``output_dir``,
        the directory is in use by another run, or a worker failed.
    """
    from spk_toolkit import engine

    return engine.extract(data, output_dir, toolkit=toolkit, model=model, model_kwargs=model_kwargs,
                          executor=executor, parallel=parallel, **options)


def score_trials(embeddings, trials, fmt: str = "auto", p_targets=(0.01, 0.05)) -> dict:
    """Cosine-score a trial list and compute EER and minDCF (definitions in :mod:`spk_toolkit.metrics`).

    Parameters
    ----------
    embeddings : dict or path
        ``utt_id -> (D,)`` or anything :func:`load_embeddings` reads.
    trials : path
        Trial list in any supported format (:func:`spk_toolkit.io.trials.read_trials`).
    fmt : str
        Trial format or ``"auto"``.
    p_targets : tuple of float
        Prior target probabilities for minDCF (C_miss = C_fa = 1).

    Returns
    -------
    dict
        ``{"trials", "n_trials", "scores", "n_target", "n_nontarget", "eer_pct", "min_dcf": {p_target: value}}``:
        ``scores`` is the cosine score of every trial, float64 of shape (n_trials,), in list order; the metrics
        only when the list is labelled with both target and nontarget trials.

    Raises
    ------
    ValueError
        Trials name utterances missing from ``embeddings`` (count and examples in the message).
    """
    import numpy as np

    from spk_toolkit.io.readers import load_embeddings
    from spk_toolkit.io.trials import read_trials
    from spk_toolkit.metrics import compute_metrics
    from spk_toolkit.scoring import cosine_score

    emb = embeddings if isinstance(embeddings, dict) else load_embeddings(embeddings)
    tr = read_trials(trials, fmt=fmt)
    scores = cosine_score(emb, tr)
    out = {"trials": str(trials), "n_trials": int(len(scores)), "scores": np.asarray(scores)}
    if tr.labels is not None and 0 < int(np.count_nonzero(tr.labels)) < len(tr.labels):
        m = compute_metrics(np.asarray(scores), np.asarray(tr.labels), p_targets=p_targets)
        out.update(n_target=int(m["n_target"]), n_nontarget=int(m["n_nontarget"]), eer_pct=100.0 * m["eer"],
                   min_dcf={float(k): float(v) for k, v in m["min_dcf"].items()})
    return out
