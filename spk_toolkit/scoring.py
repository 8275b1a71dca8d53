"""Trial scoring on unique keys: cosine, mean subtraction, speaker means, AS-norm and S-norm.

Every embedding is normalised once into a row of a matrix; trials are scored by gathering rows by index,
block by block, so memory stays bounded at millions of trials. Cohort statistics for score normalisation are
computed once per unique enrollment/test utterance with chunked matrix products and ``np.argpartition``-style
top-N selection, never per trial.

References
----------
.. [1] P. Matějka et al., "Analysis of score normalization in multilingual speaker recognition",
       Interspeech 2017 (adaptive symmetric score normalisation, AS-norm).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np

from spk_toolkit.io.datadir import read_spk2utt, read_utt2spk  # noqa: F401 (re-exported)
from spk_toolkit.io.trials import KeyResolution, Trials, resolve_keys

__all__ = [
    "EmbeddingTable",
    "cosine_score",
    "score_trials",
    "cohort_stats",
    "as_norm",
    "average_embeddings",
    "speaker_means",
    "read_utt2spk",
    "read_spk2utt",
]

TrialsLike = Union[Trials, tuple]
Embeddings = Mapping[str, np.ndarray]


class EmbeddingTable:
    """Embeddings as one matrix with a key index.

    Parameters
    ----------
    embeddings : mapping str -> ndarray of shape (D,) or (n_crops, D)
        (n_crops, D) values are averaged over crops.
    dtype : numpy dtype, default=float64

    Attributes
    ----------
    keys : list of str, (n_utts,)
    matrix : ndarray of shape (n_utts, D)
    index : dict str -> int

    Raises
    ------
    ValueError
        Empty mapping, inconsistent dimensions, or non-finite values (the message names keys).
    """

    def __init__(self, embeddings: Embeddings, dtype=np.float64):
        if isinstance(embeddings, EmbeddingTable):
            self.keys, self.matrix = embeddings.keys, embeddings.matrix.astype(dtype, copy=False)
        else:
            if len(embeddings) == 0:
                raise ValueError("embeddings is empty (0 keys)")
            self.keys = list(embeddings.keys())
            vals = []
            dims = {}
            for k in self.keys:
                v = np.asarray(embeddings[k], dtype=dtype)  # average crops in the working precision
                if v.ndim == 2:
                    v = v.mean(axis=0)
                if v.ndim != 1:
                    raise ValueError(f"embedding {k!r} has shape {v.shape}; expected (D,) or (n_crops, D)")
                dims.setdefault(v.shape[0], k)
                vals.append(v)
            if len(dims) > 1:
                raise ValueError(f"embeddings have different dimensions: {{dim: example key}} = {dims}")
            self.matrix = np.stack(vals).astype(dtype, copy=False)
        bad = ~np.isfinite(self.matrix).all(axis=1)
        if bad.any():
            ex = [self.keys[i] for i in np.flatnonzero(bad)[:5]]
            raise ValueError(f"{int(bad.sum())} embeddings contain NaN/inf, e.g. {ex}")
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)


def _as_trials(trials: TrialsLike) -> Trials:
    """Accept a Trials, an (enroll, test[, labels]) tuple of sequences, or a list of (enroll, test[, label]) rows."""
    if isinstance(trials, Trials):
        return trials
    if isinstance(trials, tuple) and len(trials) in (2, 3) and not isinstance(trials[0], str):
        return Trials(*trials)
    if isinstance(trials, (list, tuple)) and trials and all(isinstance(r, (list, tuple)) for r in trials):
        widths = {len(r) for r in trials}
        if widths == {2}:
            return Trials([r[0] for r in trials], [r[1] for r in trials])
        if widths == {3}:
            return Trials([r[0] for r in trials], [r[1] for r in trials], [int(r[2]) for r in trials])
    raise TypeError(
        "trials must be a Trials, an (enroll, test[, labels]) tuple of sequences or a list of "
        f"(enroll, test[, label]) rows, got {type(trials).__name__}"
    )


def _normalise_rows(x: np.ndarray, keys: Sequence[str], mean: Optional[np.ndarray] = None) -> np.ndarray:
    if mean is not None:
        mean = np.asarray(mean, dtype=x.dtype)
        if mean.shape != (x.shape[1],):
            raise ValueError(f"mean must have shape ({x.shape[1]},), got {mean.shape}")
        x = x - mean
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        ex = [keys[i] for i in np.flatnonzero(zero)[:5]]
        raise ValueError(f"{int(zero.sum())} embeddings have zero norm (after mean subtraction), e.g. {ex}")
    return x / norms[:, None]


def _gather_dot(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray, block_size: int) -> np.ndarray:
    out = np.empty(ia.shape[0], dtype=np.float64)
    for s in range(0, ia.shape[0], block_size):
        e = slice(s, s + block_size)
        out[e] = np.einsum("ij,ij->i", a[ia[e]], b[ib[e]])
    return out


class _Prepared:
    """Trials resolved to rows of a normalised matrix holding only the keys the trials use."""

    def __init__(self, embeddings, trials: Trials, mean, root, on_missing, dtype):
        table = embeddings if isinstance(embeddings, EmbeddingTable) else EmbeddingTable(embeddings, dtype)
        res: KeyResolution = resolve_keys(trials, table.keys, root=root, on_missing=on_missing)
        used, inv = np.unique(np.concatenate([res.enroll_idx, res.test_idx]), return_inverse=True)
        n = res.enroll_idx.shape[0]
        self.resolution = res
        self.keys = [table.keys[i] for i in used]
        self.matrix = _normalise_rows(table.matrix[used].astype(dtype, copy=False), self.keys, mean)
        self.enroll_idx = inv[:n]
        self.test_idx = inv[n:]


def cosine_score(
    embeddings: Embeddings,
    trials: TrialsLike,
    *,
    mean: Optional[np.ndarray] = None,
    root: Optional[str] = None,
    on_missing: str = "error",
    block_size: int = 65536,
) -> np.ndarray:
    """Cosine similarity for every trial.

    Parameters
    ----------
    embeddings : mapping str -> ndarray (D,) or (n_crops, D), or EmbeddingTable
    trials : Trials or (enroll, test) tuple of str sequences of shape (n_trials,)
    mean : ndarray of shape (D,), optional
        Subtracted from every embedding before length normalisation (e.g. the mean of a training set).
    root : str, optional
        Root prefix stripped from trial keys (see :func:`spk_toolkit.io.trials.resolve_keys`).
    on_missing : {"error", "drop"}, default="error"
        With ``"drop"``, dropped trials score NaN.
    block_size : int, default=65536
        Trials gathered per block (memory ~ 2 * block_size * D * 8 bytes).

    Returns
    -------
    scores : ndarray of float64, shape (n_trials,)
        Cosine similarity in [-1, 1], in trial order.

    Raises
    ------
    MissingKeysError
        A trial key has no embedding (count and examples in the message).
    ValueError
        Inconsistent dimensions, NaN embeddings, zero-norm embeddings.
    """
    return score_trials(embeddings, trials, mean=mean, root=root, on_missing=on_missing, block_size=block_size)


def _check_top_n(top_n) -> None:
    """``top_n`` must be None (S-norm) or an integer >= 1 (no silent truncation of 2.5, no 0 or -1)."""
    if top_n is None:
        return
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise ValueError(f"top_n must be None (S-norm, the whole cohort) or an integer >= 1, got {top_n!r}")


def cohort_stats(
    x: np.ndarray, cohort: np.ndarray, top_n: Optional[int], *, block_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row's top-N cohort scores.

    Parameters
    ----------
    x : ndarray of shape (n, D)
        Length-normalised embeddings.
    cohort : ndarray of shape (n_cohort, D)
        Length-normalised cohort embeddings.
    top_n : int or None
        Number of highest cohort scores kept per row (an integer >= 1); None or >= n_cohort keeps all (S-norm).
    block_size : int, default=4096
        Rows per matrix product (memory ~ block_size * n_cohort * 8 bytes).

    Returns
    -------
    mean, std : ndarray of shape (n,)
        ``std`` is the population standard deviation (ddof=0, as WeSpeaker ``score_norm.py``).

    Raises
    ------
    ValueError
        ``top_n`` is neither None nor an integer >= 1.
    """
    _check_top_n(top_n)
    n_c = cohort.shape[0]
    k = n_c if top_n is None or top_n >= n_c else int(top_n)
    mu = np.empty(x.shape[0])
    sd = np.empty(x.shape[0])
    ct = np.ascontiguousarray(cohort.T)
    dtype = np.result_type(x.dtype, cohort.dtype)
    # one reusable (block, n_cohort) buffer: the product is written into it and partitioned in place, so no
    # block allocates (and page-faults) fresh memory
    buf = np.empty((min(block_size, x.shape[0]), n_c), dtype=dtype)
    for s in range(0, x.shape[0], block_size):
        xb = x[s : s + block_size]
        sc = buf[: xb.shape[0]]
        np.matmul(xb, ct, out=sc)
        if k < n_c:
            sc.partition(n_c - k, axis=1)
            sc = sc[:, n_c - k :]
        sc = sc.astype(np.float64, copy=False)  # statistics in float64 whatever the matrix dtype
        mu[s : s + block_size] = sc.mean(axis=1)
        sd[s : s + block_size] = sc.std(axis=1)
    return mu, sd


def score_trials(
    embeddings: Embeddings,
    trials: TrialsLike,
    *,
    cohort: Optional[Union[Embeddings, np.ndarray]] = None,
    top_n: Optional[int] = 300,
    mean: Optional[np.ndarray] = None,
    root: Optional[str] = None,
    on_missing: str = "error",
    block_size: int = 65536,
    cohort_block_size: int = 4096,
    dtype=np.float64,
    return_raw: bool = False,
    notes: Optional[list] = None,
):
    """Cosine scores, optionally AS-norm / S-norm normalised against a cohort.

    AS-norm (Matějka et al. 2017 [1]): for each side, the mean μ and standard deviation σ of its top-N
    cohort scores; s' = ½ [(s − μ_e)/σ_e + (s − μ_t)/σ_t]. With ``top_n=None`` (whole cohort) this is S-norm.
    Cohort statistics are computed once per unique utterance used by the trials.

    Parameters
    ----------
    embeddings : mapping str -> ndarray (D,) or (n_crops, D), or EmbeddingTable
    trials : Trials or (enroll, test) tuple of shape (n_trials,)
    cohort : mapping or ndarray of shape (n_cohort, D), optional
        Cohort embeddings (utterances or speaker means, e.g. from :func:`speaker_means`). None = plain cosine.
    top_n : int or None, default=300
        AS-norm top-N, an integer >= 1; None = S-norm (0, negative and non-integer values are refused).
    mean : ndarray of shape (D,), optional
        Subtracted from embeddings and cohort before length normalisation.
    root, on_missing : see :func:`spk_toolkit.io.trials.resolve_keys`
    block_size : int, default=65536
        Trials per gather block.
    cohort_block_size : int, default=4096
        Utterances per cohort matrix product.
    dtype : numpy dtype, default=float64
        Matrix dtype; float32 roughly halves the cohort product time, scores then agree with float64 to ~1e-6
        (cohort statistics are always accumulated in float64).
    return_raw : bool, default=False
        Also return the raw cosine scores.
    notes : list, optional
        When given, the key-normalisation report (see :func:`spk_toolkit.io.trials.resolve_keys`) is appended.

    Returns
    -------
    scores : ndarray of float64, shape (n_trials,)
        In trial order; NaN for trials dropped with ``on_missing="drop"``.
    raw : ndarray of shape (n_trials,), only when ``return_raw``

    Raises
    ------
    MissingKeysError, ValueError
        See :func:`cosine_score`; also an empty cohort or a cohort of another dimension, or ``top_n`` neither None
        nor an integer >= 1.
    """
    _check_top_n(top_n)
    trials = _as_trials(trials)
    prep = _Prepared(embeddings, trials, mean, root, on_missing, dtype)
    if notes is not None:
        notes.extend(prep.resolution.notes)
    raw_kept = _gather_dot(prep.matrix, prep.enroll_idx, prep.matrix, prep.test_idx, block_size)
    out_kept = raw_kept
    if cohort is not None:
        if isinstance(cohort, np.ndarray):
            c = np.asarray(cohort, dtype=dtype)
            ckeys = [f"cohort[{i}]" for i in range(c.shape[0])]
        else:
            ct = cohort if isinstance(cohort, EmbeddingTable) else EmbeddingTable(cohort, dtype)
            c, ckeys = ct.matrix.astype(dtype, copy=False), ct.keys
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(f"cohort must be a non-empty (n_cohort, D) matrix, got shape {c.shape}")
        if c.shape[1] != prep.matrix.shape[1]:
            raise ValueError(f"cohort dimension {c.shape[1]} differs from embedding dimension {prep.matrix.shape[1]}")
        c = _normalise_rows(c, ckeys, mean)
        mu, sd = cohort_stats(prep.matrix, c, top_n, block_size=cohort_block_size)
        if (sd == 0).any():
            raise ValueError(f"{int((sd == 0).sum())} utterances have zero cohort score deviation; enlarge top_n")
        ie, it = prep.enroll_idx, prep.test_idx
        out_kept = 0.5 * ((raw_kept - mu[ie]) / sd[ie] + (raw_kept - mu[it]) / sd[it])
    kept = prep.resolution.kept
    if kept.all():
        return (out_kept, raw_kept) if return_raw else out_kept
    out = np.full(len(trials), np.nan)
    out[kept] = out_kept
    if return_raw:
        raw = np.full(len(trials), np.nan)
        raw[kept] = raw_kept
        return out, raw
    return out


def as_norm(embeddings, trials, cohort, *, top_n: Optional[int] = 300, **kwargs) -> np.ndarray:
    """AS-norm scores (S-norm with ``top_n=None``); see :func:`score_trials`."""
    return score_trials(embeddings, trials, cohort=cohort, top_n=top_n, **kwargs)


def average_embeddings(
    embeddings: Embeddings, groups: Mapping[str, Sequence[str]], *, normalize: bool = False
) -> dict:
    """Average groups of utterance embeddings (speaker means; ESPnet's emb-avg enrollment).

    Parameters
    ----------
    embeddings : mapping str -> ndarray (D,) or (n_crops, D)
    groups : mapping group id -> sequence of utterance keys
    normalize : bool, default=False
        Length-normalise each utterance before averaging.

    Returns
    -------
    means : dict group id -> ndarray of float64, shape (D,)

    Raises
    ------
    ValueError
        A group is empty, or utterances are missing (count and examples).
    """
    missing = sorted({u for us in groups.values() for u in us if u not in embeddings})
    if missing:
        raise ValueError(
            f"{len(missing)} utterances listed in the speaker/enrollment map have no embedding, e.g. {missing[:5]}"
        )
    out = {}
    for g, us in groups.items():
        if len(us) == 0:
            raise ValueError(f"group {g!r} lists no utterances")
        rows = [np.asarray(embeddings[u], dtype=np.float64) for u in us]  # each read once (lazy readers)
        m = np.stack([r.reshape(-1, r.shape[-1]).mean(0) for r in rows])
        if normalize:
            m = m / np.linalg.norm(m, axis=1, keepdims=True)
        out[g] = m.mean(axis=0)
    return out


def speaker_means(
    embeddings: Embeddings,
    utt2spk: Optional[Mapping[str, str]] = None,
    spk2utt: Optional[Mapping[str, Sequence[str]]] = None,
    *,
    normalize: bool = False,
) -> dict:
    """Speaker-mean embeddings from ``utt2spk`` or ``spk2utt`` (one of them).

    Returns
    -------
    means : dict speaker id -> ndarray of float64, shape (D,)

    Raises
    ------
    ValueError
        Neither or both maps given; missing utterances.
    """
    if (utt2spk is None) == (spk2utt is None):
        raise ValueError("give exactly one of utt2spk and spk2utt")
    if spk2utt is None:
        spk2utt = {}
        for u, s in utt2spk.items():
            spk2utt.setdefault(s, []).append(u)
    return average_embeddings(embeddings, spk2utt, normalize=normalize)


def _unique_name(name: str, taken: set) -> str:
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def score(
    embeddings: str,
    trials: Sequence[str],
    output_dir: str,
    *,
    trials_format: str = "auto",
    trials_root: Optional[str] = None,
    cohort: Optional[str] = None,
    cohort_utt2spk: Optional[str] = None,
    cohort_spk2utt: Optional[str] = None,
    asnorm_top_n: Optional[int] = 300,
    mean_embeddings: Optional[str] = None,
    enroll_spk2utt: Optional[str] = None,
    p_targets: Sequence[float] = (0.01, 0.05),
    eer_method: str = "interp",
    cllr: bool = False,
    missing: str = "error",
    score_style: str = "kaldi",
    plots: bool = True,
    dtype: str = "float64",
    duplicates: str = "keep",
    log=print,
) -> dict:
    """Score trial lists end to end (the library call behind ``spk_score``).

    Reads embeddings (any format :func:`spk_toolkit.io.readers.load_embeddings` reads; ESPnet
    (n_crops, D) values averaged), scores every trial list (cosine, AS-norm/S-norm when ``cohort`` is
    given), and writes to ``output_dir``: ``<list>.score`` (Kaldi style ``enroll test score [target|nontarget]``
    or ESPnet style), ``<list>_det.png``, ``<list>_hist.png`` and ``metrics.json``.

    Parameters
    ----------
    embeddings : str
        Embedding file or directory.
    trials : sequence of str or Trials
        Trial lists (any format of :func:`spk_toolkit.io.trials.read_trials`), or lists already read (a command
        that reads them before its extraction, so a bad list is refused before any work).
    output_dir : str
    trials_format : str, default="auto"
    trials_root : str, optional
        Root prefix stripped from trial keys.
    cohort : str, optional
        Cohort embeddings; with ``cohort_utt2spk`` / ``cohort_spk2utt`` they are averaged per speaker first.
    asnorm_top_n : int or None, default=300
        AS-norm top-N (an integer >= 1); None or 0 (the CLI's spelling): S-norm over the whole cohort.
    mean_embeddings : str, optional
        Embeddings whose mean is subtracted from everything before length normalisation.
    enroll_spk2utt : str, optional
        ``enroll_id utt1 utt2 ...``: enrollment models as the mean of several utterances (ESPnet emb-avg).
    p_targets : sequence of float, default=(0.01, 0.05)
    eer_method : {"interp", "rocch", "espnet"}
    cllr : bool
        Also report Cllr, minCllr and actDCF (meaningful for LLR-like scores).
    missing : {"error", "drop"}
    score_style : {"kaldi", "espnet"}
    plots : bool, default=True
    dtype : {"float64", "float32"}, default="float64"
        Matrix precision for scoring; float32 is ~2x faster for AS-norm, scores within ~1e-5.
    duplicates : {"keep", "drop"}, default="keep"
        Trials repeating an earlier (enroll, test) pair: reported (count, examples; ``trial_notes`` in
        ``metrics.json``) and kept, or dropped (:func:`spk_toolkit.io.trials.read_trials`).

    Returns
    -------
    metrics : dict
        What is written to ``metrics.json``: per trial list, counts, EER (fraction and ``eer_pct``),
        minDCF per p_target, the normalisation used, key-normalisation notes and output paths.

    Raises
    ------
    MissingKeysError
        Trial keys without embeddings (count and examples), unless ``missing="drop"``.
    ValueError, FileNotFoundError
        Bad inputs.
    """
    import json
    import os

    from spk_toolkit import metrics as M
    from spk_toolkit.io.readers import load_embeddings
    from spk_toolkit.io.trials import read_trials, write_scores

    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    np_dtype = np.dtype(dtype)
    if asnorm_top_n is not None and (isinstance(asnorm_top_n, bool) or not isinstance(asnorm_top_n, (int, np.integer))
                                     or asnorm_top_n < 0):
        raise ValueError(f"asnorm_top_n must be None or 0 (S-norm, the whole cohort) or an integer >= 1 (AS-norm "
                         f"top-N), got {asnorm_top_n!r}")
    top_n = None if not asnorm_top_n else int(asnorm_top_n)
    # every input is read and checked before anything is written or logged (a bad row names file:line; a run
    # refused here leaves no output directory and no run.log behind)
    from spk_toolkit.io.trials import Trials

    lists = [t if isinstance(t, Trials) else read_trials(t, trials_format, duplicates=duplicates) for t in trials]
    emb = load_embeddings(embeddings, average_crops=True)
    ref = EmbeddingTable(load_embeddings(mean_embeddings, average_crops=True)) if mean_embeddings else None
    cemb = load_embeddings(cohort, average_crops=True) if cohort else None
    enroll = read_spk2utt(enroll_spk2utt) if enroll_spk2utt else None
    c_utt2spk = read_utt2spk(cohort_utt2spk) if cohort and cohort_utt2spk else None
    c_spk2utt = read_spk2utt(cohort_spk2utt) if cohort and cohort_spk2utt else None
    if enroll is not None:
        models = average_embeddings(emb, enroll)
    if cemb is not None and (c_utt2spk is not None or c_spk2utt is not None):
        cemb = speaker_means(cemb, utt2spk=c_utt2spk, spk2utt=c_spk2utt)

    os.makedirs(output_dir, exist_ok=True)
    plots_skipped = None
    if plots:
        from spk_toolkit.plot import plotting_unavailable

        plots_skipped = plotting_unavailable()
        if plots_skipped:
            log(f"plots skipped: {plots_skipped}")
            plots = False
    log(f"embeddings: {len(emb)} from {embeddings}")
    if enroll is not None:
        clash = [k for k in models if k in emb]
        emb = dict(emb)
        emb.update(models)
        log(f"enrollment models: {len(models)} averaged from {enroll_spk2utt}"
            + (f" ({len(clash)} replace utterance keys of the same name)" if clash else ""))
    mean = None
    if ref is not None:
        mean = ref.matrix.mean(axis=0)
        log(f"mean subtraction: mean of {len(ref)} embeddings from {mean_embeddings}")
    cohort_mat = None
    norm = "cosine"
    if cemb is not None:
        cohort_mat = EmbeddingTable(cemb, np_dtype)
        norm = "snorm" if top_n is None or top_n >= len(cohort_mat) else f"asnorm(top_n={top_n})"
        log(f"cohort: {len(cohort_mat)} {'speaker means' if (cohort_utt2spk or cohort_spk2utt) else 'embeddings'}"
            f" from {cohort}; normalisation {norm}")
    table = EmbeddingTable(emb, np_dtype)
    result = {"embeddings": str(embeddings), "normalisation": norm, "dtype": dtype, "trials": {}}
    if plots_skipped:
        result["plots_skipped"] = plots_skipped
    taken: set = set()
    for tpath, tr in zip([t.path if isinstance(t, Trials) else t for t in trials], lists):
        name = _unique_name(tr.name, taken)
        for n in tr.notes:
            log(f"[{name}] {n}")
        key_notes: list = []
        s, raw = score_trials(table, tr, cohort=cohort_mat, top_n=top_n, mean=mean, root=trials_root,
                              on_missing=missing, return_raw=True, dtype=np_dtype, notes=key_notes)
        for n in key_notes:
            log(f"[{name}] {n}")
        ok = np.isfinite(s)  # NaN only for trials dropped with missing="drop"
        score_path = os.path.join(output_dir, f"{name}.score")
        # dropped trials (missing="drop") are left out of the score file rather than written as NaN
        write_scores(score_path, tr if ok.all() else tr.subset(ok), s if ok.all() else s[ok], style=score_style)
        entry = {"path": str(tpath), "format": tr.fmt, "n_trials": len(tr), "n_scored": int(ok.sum()),
                 "key_notes": key_notes, "trial_notes": list(tr.notes), "score_file": score_path}
        n_tar = int(np.count_nonzero(tr.labels[ok])) if tr.labels is not None else 0
        labelled = tr.labels is not None and 0 < n_tar < int(ok.sum())
        if tr.labels is not None and not labelled:
            entry["labels_note"] = (f"{n_tar} target and {int(ok.sum()) - n_tar} nontarget trials: EER and minDCF "
                                    "need both")
            log(f"[{name}] {entry['labels_note']}; scores only")
        if not labelled:  # one pair, or a list to score rather than to evaluate: show its scores
            entry["scores_head"] = [[str(e), str(t), float(v)] for e, t, v in
                                    zip(tr.enroll[ok][:SCORES_SHOWN], tr.test[ok][:SCORES_SHOWN], s[ok][:SCORES_SHOWN])]
        if labelled:
            m = M.compute_metrics(s[ok], tr.labels[ok], p_targets, eer_method=eer_method, with_cllr=cllr)
            entry.update(_metrics_json(m))
            if cohort_mat is not None:
                mr = M.compute_metrics(raw[ok], tr.labels[ok], p_targets, eer_method=eer_method)
                entry["cosine"] = _metrics_json(mr)
            if plots:
                from spk_toolkit.plot import plot_det, plot_score_histogram

                p_miss, p_fa, thr = M.det_curve(s[ok], tr.labels[ok])
                curves = {norm: (p_miss, p_fa, m["eer"])}
                if cohort_mat is not None:
                    rm, rf, _ = M.det_curve(raw[ok], tr.labels[ok])
                    curves["cosine"] = (rm, rf, mr["eer"])
                entry["det_png"] = plot_det(curves, os.path.join(output_dir, f"{name}_det.png"), title=f"DET: {name}")
                entry["hist_png"] = plot_score_histogram(
                    s[ok], tr.labels[ok], os.path.join(output_dir, f"{name}_hist.png"), title=f"Scores: {name}",
                    thresholds={"EER": _eer_threshold(p_miss, p_fa, thr),
                                **{f"minDCF {p:g}": t for p, t in m["min_dcf_threshold"].items()}},
                )
        elif plots and int(ok.sum()) >= 10:  # a histogram of a few scores says nothing: they are printed
            from spk_toolkit.plot import plot_score_histogram

            entry["hist_png"] = plot_score_histogram(s[np.isfinite(s)], None,
                                                     os.path.join(output_dir, f"{name}_hist.png"), title=name)
        result["trials"][name] = entry
    mpath = os.path.join(output_dir, "metrics.json")
    from spk_toolkit.io.atomic import atomic_write_text
    from spk_toolkit.io.preflight import naming

    with naming(mpath):
        atomic_write_text(mpath, json.dumps(result, indent=2, allow_nan=False))
    result["metrics_json"] = mpath
    return result


#: trials of an unlabelled (or one-class) list shown by :func:`format_table`; every score is in the score file
SCORES_SHOWN = 20


def _eer_threshold(p_miss: np.ndarray, p_fa: np.ndarray, thresholds: np.ndarray) -> float:
    """The score threshold of the first operating point where P_miss >= P_fa (the EER crossing)."""
    i = int(np.argmax(p_miss <= p_fa)) if np.any(p_miss <= p_fa) else len(thresholds) - 1
    t = float(thresholds[i])
    return t if np.isfinite(t) else float(thresholds[min(i + 1, len(thresholds) - 1)])


def _metrics_json(m: dict) -> dict:
    out = {
        "n_target": m["n_target"],
        "n_nontarget": m["n_nontarget"],
        "eer": m["eer"],
        "eer_pct": 100 * m["eer"],
        "min_dcf": {f"{p:g}": v for p, v in m["min_dcf"].items()},
        # +inf (reject everything is optimal) is written as null: strict JSON has no Infinity
        "min_dcf_threshold": {f"{p:g}": (v if np.isfinite(v) else None) for p, v in m["min_dcf_threshold"].items()},
    }
    for k in ("cllr", "min_cllr"):
        if k in m:
            out[k] = m[k]
    if "act_dcf" in m:
        out["act_dcf"] = {f"{p:g}": v for p, v in m["act_dcf"].items()}
    return out


def format_table(result: dict) -> str:
    """One-screen table of a :func:`score` result (EER in %)."""
    rows = []
    p_keys = None
    listed = []
    for name, e in result["trials"].items():
        if "eer" not in e:
            listed.append((name, e))
            continue
        p_keys = p_keys or list(e["min_dcf"])
        r = [name, str(e["n_target"]), str(e["n_nontarget"]), f"{e['eer_pct']:.3f}"]
        r += [f"{e['min_dcf'][p]:.4f}" for p in p_keys]
        if "cllr" in e:
            r += [f"{e['cllr']:.4f}", f"{e['min_cllr']:.4f}"]
        rows.append(r)
    head = ["trials", "n_target", "n_nontarget", "EER %"] + [f"minDCF {p}" for p in (p_keys or [])]
    if any("cllr" in e for e in result["trials"].values()):
        head += ["Cllr", "minCllr"]
    widths = [max(len(str(x)) for x in col) for col in zip(*([head] + [r + [""] * (len(head) - len(r)) for r in rows]))]
    fmt = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    lines = [f"normalisation: {result['normalisation']}"]
    if rows:
        lines += [fmt(head)] + [fmt(r) for r in rows]
    for name, e in listed:
        head_rows = e.get("scores_head", [])
        why = e.get("labels_note", "unlabelled")
        lines.append(f"{name}: {e['n_trials']} trial(s), {why}; scores"
                     + (f" (first {len(head_rows)}; all in {e['score_file']})" if e["n_trials"] > len(head_rows)
                        else f" (also in {e['score_file']})") + ":")
        if head_rows:
            we = max(len(r[0]) for r in head_rows)
            wt = max(len(r[1]) for r in head_rows)
            lines += [f"  {a:<{we}}  {b:<{wt}}  {v: .4f}" for a, b, v in head_rows]
    return "\n".join(lines)
