"""Scoring against naive per-trial loops: cosine, mean subtraction, AS-norm, S-norm, speaker means."""
import numpy as np
import pytest

from spk_toolkit.io.trials import MissingKeysError, Trials, read_trials
from spk_toolkit.scoring import (
    average_embeddings,
    cosine_score,
    read_spk2utt,
    read_utt2spk,
    score_trials,
    speaker_means,
)


def make_problem(seed=0, n_utt=60, d=16, n_trials=400, n_cohort=50, crops=False):
    rng = np.random.default_rng(seed)
    keys = [f"spk{i % 7}/utt{i:03d}" for i in range(n_utt)]
    emb = {k: rng.standard_normal((3, d) if crops and i % 2 else d).astype(np.float32) for i, k in enumerate(keys)}
    e = rng.integers(0, n_utt, n_trials)
    t = rng.integers(0, n_utt, n_trials)
    trials = Trials(np.array(keys)[e], np.array(keys)[t], (e % 7 == t % 7).astype(int))
    cohort = rng.standard_normal((n_cohort, d))
    return emb, trials, cohort


def vec(v):
    v = np.asarray(v, dtype=np.float64)
    return v.mean(0) if v.ndim == 2 else v


def naive_cos(a, b):
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def naive_asnorm(emb, trials, cohort, top_n, mean=None):
    """Per-trial loop of Matějka et al. 2017: each side's top-N cohort cosine mean/std, recomputed per trial."""
    m = 0 if mean is None else mean
    out = []
    for e, t in zip(trials.enroll, trials.test):
        a, b = vec(emb[e]) - m, vec(emb[t]) - m
        s = naive_cos(a, b)
        stats = []
        for x in (a, b):
            cs = sorted((naive_cos(x, c - m) for c in cohort), reverse=True)
            top = cs[: (top_n or len(cs))]
            mu = sum(top) / len(top)
            sd = (sum((v - mu) ** 2 for v in top) / len(top)) ** 0.5
            stats.append((mu, sd))
        out.append(0.5 * ((s - stats[0][0]) / stats[0][1] + (s - stats[1][0]) / stats[1][1]))
    return np.array(out)


def test_cosine_equals_naive_loop_and_crops_averaged():
    emb, trials, _ = make_problem(crops=True)
    got = cosine_score(emb, trials, block_size=37)  # several blocks
    ref = [naive_cos(vec(emb[e]), vec(emb[t])) for e, t in zip(trials.enroll, trials.test)]
    assert np.max(np.abs(got - ref)) < 1e-12


def test_cosine_with_mean_subtraction():
    emb, trials, _ = make_problem()
    mean = np.mean([vec(v) for v in emb.values()], axis=0)
    got = cosine_score(emb, trials, mean=mean)
    ref = [naive_cos(vec(emb[e]) - mean, vec(emb[t]) - mean) for e, t in zip(trials.enroll, trials.test)]
    assert np.max(np.abs(got - ref)) < 1e-12


@pytest.mark.parametrize("top_n", [5, 10, 49, None])
def test_asnorm_equals_naive_loop(top_n):
    emb, trials, cohort = make_problem(1, n_trials=150)
    got = score_trials(emb, trials, cohort=cohort, top_n=top_n, cohort_block_size=7)
    ref = naive_asnorm(emb, trials, cohort, top_n)
    assert np.max(np.abs(got - ref)) < 1e-9


def test_asnorm_with_mean_and_dict_cohort():
    emb, trials, cohort = make_problem(2, n_trials=100)
    mean = np.ones(16) * 0.3
    cdict = {f"c{i}": c for i, c in enumerate(cohort)}
    got = score_trials(emb, trials, cohort=cdict, top_n=20, mean=mean)
    ref = naive_asnorm(emb, trials, cohort, 20, mean=mean)
    assert np.max(np.abs(got - ref)) < 1e-9


def test_speaker_means_equal_per_speaker_mean(tmp_path):
    emb, _, _ = make_problem(3, crops=True)
    utt2spk = {k: k.split("/")[0] for k in emb}
    (tmp_path / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in sorted(utt2spk.items())))
    spk2utt = {}
    for u, s in sorted(utt2spk.items()):
        spk2utt.setdefault(s, []).append(u)
    (tmp_path / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in spk2utt.items()))
    a = speaker_means(emb, utt2spk=read_utt2spk(str(tmp_path / "utt2spk")))
    b = speaker_means(emb, spk2utt=read_spk2utt(str(tmp_path / "spk2utt")))
    assert sorted(a) == sorted(b) == [f"spk{i}" for i in range(7)]
    for s in a:
        members = [vec(v) for k, v in emb.items() if k.startswith(s + "/")]
        ref = sum(members) / len(members)
        assert np.max(np.abs(a[s] - ref)) < 1e-12 and np.max(np.abs(b[s] - ref)) < 1e-12
    with pytest.raises(ValueError, match="exactly one"):
        speaker_means(emb)
    with pytest.raises(ValueError, match="1 utterances listed .* e.g. \\['nope'\\]"):
        average_embeddings(emb, {"x": ["nope", "spk0/utt000"]})


def test_enrollment_by_averaging():
    emb, _, _ = make_problem(4)
    models = average_embeddings(emb, {"enrA": ["spk0/utt000", "spk0/utt007"]})
    both = dict(emb, **models)
    got = cosine_score(both, Trials(["enrA"], ["spk1/utt001"]))
    ref = naive_cos((vec(emb["spk0/utt000"]) + vec(emb["spk0/utt007"])) / 2, vec(emb["spk1/utt001"]))
    assert abs(got[0] - ref) < 1e-12


def test_missing_and_drop():
    emb, trials, cohort = make_problem(5)
    gone = sorted(set(trials.enroll.tolist()))[:3]
    part = {k: v for k, v in emb.items() if k not in gone}
    with pytest.raises(MissingKeysError, match=r"^3 of \d+ utterances"):
        cosine_score(part, trials)
    s = score_trials(part, trials, cohort=cohort, on_missing="drop")
    dropped = np.isin(trials.enroll, gone) | np.isin(trials.test, gone)
    assert np.isnan(s[dropped]).all() and np.isfinite(s[~dropped]).all()
    full = score_trials(emb, trials, cohort=cohort)
    assert np.max(np.abs(full[~dropped] - s[~dropped])) < 1e-12


def test_scores_identical_across_trial_formats(tmp_path):
    from trials_helpers import ENR, TST, write_all_formats

    rng = np.random.default_rng(0)
    emb = {k: rng.standard_normal(8) for k in set(ENR + TST)}
    files = write_all_formats(tmp_path / "t")
    cohort = rng.standard_normal((20, 8))
    ref = None
    for name, path in files.items():
        t = read_trials(str(path))
        s = score_trials(emb, t, cohort=cohort, top_n=5)
        if ref is None:
            ref = s
        assert np.array_equal(s, ref), name


def test_errors():
    emb, trials, cohort = make_problem(6)
    bad = dict(emb)
    bad["spk0/utt000"] = np.zeros(16)
    with pytest.raises(ValueError, match="zero norm"):
        cosine_score(bad, trials)
    bad["spk0/utt000"] = np.full(16, np.nan)
    with pytest.raises(ValueError, match="NaN/inf"):
        cosine_score(bad, trials)
    bad["spk0/utt000"] = np.ones(8)
    with pytest.raises(ValueError, match="different dimensions"):
        cosine_score(bad, trials)
    with pytest.raises(ValueError, match="cohort dimension 4 differs"):
        score_trials(emb, trials, cohort=cohort[:, :4])


def test_float32_matrices_close_to_float64():
    emb, trials, cohort = make_problem(7, n_trials=200)
    a = score_trials(emb, trials, cohort=cohort, top_n=10)
    b = score_trials(emb, trials, cohort=cohort, top_n=10, dtype=np.float32)
    assert b.dtype == np.float64 and np.max(np.abs(a - b)) < 1e-4


def test_trials_as_tuple_or_rows():
    emb, trials, _ = make_problem(8, n_trials=20)
    ref = cosine_score(emb, trials)
    rows = list(zip(trials.enroll.tolist(), trials.test.tolist()))
    assert np.array_equal(cosine_score(emb, (trials.enroll.tolist(), trials.test.tolist())), ref)
    assert np.array_equal(cosine_score(emb, rows), ref)
    with pytest.raises(TypeError, match="trials must be"):
        cosine_score(emb, "trials.txt")
