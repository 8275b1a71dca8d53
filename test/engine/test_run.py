"""Unit tests of the worker-side engine (spk_toolkit.engine.run): batch planning, ESPnet's evaluation crops, chunk
bounds, one batch's outputs, and the shard accumulator. Expected values are worked out by hand or by a brute-force
definition here, never taken from a run of the code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spk_toolkit.backends.base import EmbeddingModel, OutputKind
from spk_toolkit.data import Batch
from spk_toolkit.engine.options import ErrorPolicy, ExtractionError, ExtractOptions
from spk_toolkit.engine.plan import Plan
from spk_toolkit.engine.run import ShardAccumulator, chunk_bounds, compute_batch, eval_crops, plan_batches
from spk_toolkit.engine.shards import read_shard, shard_path
from spk_toolkit.io.datadir import Utterance


# ------------------------------------------------------------------------------------------------------ helpers
def make_plan(durations, shards) -> Plan:
    """A plan over utterances u0.. with the given durations (seconds) and shard membership."""
    utts = [Utterance(f"u{i}", f"/audio/u{i}.wav", duration=d) for i, d in enumerate(durations)]
    return Plan(utts, [list(s) for s in shards], {}, "plan-fp", {"toolkit": "test"})


class SumModel(EmbeddingModel):
    """``[sum(x), x[0], x[-1]]`` of each row's true samples (float64 inside, float32 out); records its forwards."""

    name = "test-run-sum"
    sample_rate = 1000
    embed_dim = 3

    def __init__(self):
        super().__init__()
        self.calls = []  # (B, T) of every forward

    def embed(self, wav, lengths):
        self.calls.append(tuple(wav.shape))
        out = torch.zeros(len(wav), 3, dtype=torch.float64)
        for i in range(len(wav)):
            x = wav[i, : int(lengths[i])].double()
            out[i] = torch.stack([x.sum(), x[0], x[-1]])
        return out.float()


class NaNModel(SumModel):
    """:class:`SumModel`, but a row of true length 7 comes out NaN."""

    name = "test-run-nan"

    def embed(self, wav, lengths):
        out = super().embed(wav, lengths)
        out[lengths == 7] = float("nan")
        return out


def padded(rows, tag=None, errors=()) -> Batch:
    """A Batch of the given 1-D float rows (zero-padded), indices 0..B-1 unless rows is a dict index -> row."""
    items = list(rows.items()) if isinstance(rows, dict) else list(enumerate(rows))
    T = max(len(r) for _, r in items)
    wav = torch.zeros(len(items), T)
    for k, (_, r) in enumerate(items):
        wav[k, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.float32))
    lengths = torch.tensor([len(r) for _, r in items], dtype=torch.int64)
    return Batch(wav, lengths, [i for i, _ in items], list(errors), tag)


# ------------------------------------------------------------------------------------------------- plan_batches
def test_plan_batches_hand_worked_example():
    """Longest first per shard, cut when B * T_max would exceed batch_bins; tags are the shard ids; est_len at sr."""
    # at 100 Hz: 50, 30, 20 | 80, 10, 40 samples
    plan = make_plan([0.5, 0.3, 0.2, 0.8, 0.1, 0.4], [[0, 1, 2], [3, 4, 5]])
    batches, tags, est = plan_batches(plan, [0, 1], 100, batch_bins=100)
    # shard 0: [50,30] (2*50=100 fits), then 20 would give 3*50=150; shard 1: 80 alone (2*80>100), then [40,10]
    assert batches == [[0, 1], [2], [3], [5, 4]]
    assert tags == [0, 0, 1, 1]
    assert est == [50, 30, 20, 80, 10, 40]


def test_plan_batches_only_requested_shards_in_requested_order():
    """Only the shards asked for are batched, in the order asked (a batch never spans two shards)."""
    plan = make_plan([0.5, 0.3, 0.2, 0.8, 0.1, 0.4], [[0, 1, 2], [3, 4, 5]])
    assert plan_batches(plan, [1], 100, 100)[:2] == ([[3], [5, 4]], [1, 1])
    assert plan_batches(plan, [1, 0], 100, 100)[:2] == ([[3], [5, 4], [0, 1], [2]], [1, 1, 0, 0])
    assert plan_batches(plan, [], 100, 100)[:2] == ([], [])


def test_plan_batches_unknown_duration_counts_as_zero_samples():
    """An utterance of unknown duration is estimated at 0 samples (and still batched exactly once)."""
    plan = make_plan([None, 0.25], [[0, 1]])
    batches, tags, est = plan_batches(plan, [0], 16000, 16000)
    assert est == [0, 4000]
    assert sorted(i for b in batches for i in b) == [0, 1]


def test_plan_batches_over_long_utterance_is_alone():
    """An utterance longer than batch_bins forms a batch of its own; the rest still respect the bound."""
    plan = make_plan([1.5, 0.2, 0.3, 0.4], [[0, 1, 2, 3]])
    batches, _, est = plan_batches(plan, [0], 100, batch_bins=100)
    assert est[0] == 150 > 100
    assert [0] in batches
    for b in batches:
        if b != [0]:
            assert len(b) * max(est[i] for i in b) <= 100


def test_plan_batches_max_batch_size():
    """max_batch_size bounds B even when batch_bins would allow more (10 x 1 sample, size 3 -> 3, 3, 3, 1)."""
    plan = make_plan([0.01] * 10, [list(range(10))])
    batches, _, _ = plan_batches(plan, [0], 100, batch_bins=10 ** 6, max_batch_size=3)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # equal lengths: ties by index


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bins,max_bs", [(1, 0), (500, 0), (2000, 4), (10 ** 7, 0), (10 ** 7, 2)])
def test_plan_batches_properties_random(seed, bins, max_bs):
    """Random plans: each requested utterance exactly once, in a batch tagged with its own shard; B*T <= bins unless
    alone; B <= max_batch_size; deterministic."""
    rng = np.random.default_rng(seed)
    n = 40
    durations = [float(d) for d in np.round(rng.uniform(0.0, 3.0, n), 4)]
    perm = rng.permutation(n)
    cuts = sorted(rng.choice(np.arange(1, n), 4, replace=False))
    shards = [list(map(int, s)) for s in np.split(perm, cuts)]
    plan = make_plan(durations, shards)
    sr = 1000
    want = [0, 2, 4]
    batches, tags, est = plan_batches(plan, want, sr, bins, max_bs)
    assert est == [int(round(d * sr)) for d in durations]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(i for k in want for i in shards[k])  # exactly once, nothing else
    assert len(batches) == len(tags)
    for b, k in zip(batches, tags):
        assert b and set(b) <= set(shards[k])
        if len(b) > 1:
            assert len(b) * max(max(est[i], 1) for i in b) <= bins
        if max_bs:
            assert len(b) <= max_bs
    assert tags == sorted(tags, key=want.index)  # shards in the order asked, each contiguous
    assert plan_batches(plan, want, sr, bins, max_bs) == (batches, tags, est)


# --------------------------------------------------------------------------------------------------- eval_crops
def test_eval_crops_long_input_starts_follow_linspace():
    """T=10, L=4: n=3 -> starts 0,3,6; n=4 -> 0,2,4,6; n=5 -> int(0,1.5,3,4.5,6) = 0,1,3,4,6."""
    x = np.arange(10, dtype=np.float32)
    for n, starts in ((3, [0, 3, 6]), (4, [0, 2, 4, 6]), (5, [0, 1, 3, 4, 6]), (1, [0])):
        c = eval_crops(x, n, 4)
        assert c.shape == (n, 4)
        assert np.array_equal(c, np.array([np.arange(s, s + 4) for s in starts], dtype=np.float32)), n


def test_eval_crops_exact_length_input_is_not_padded():
    """T == L: no wrap, every crop is the whole input."""
    x = np.arange(4, dtype=np.float32) + 1
    assert np.array_equal(eval_crops(x, 3, 4), np.tile(x, (3, 1)))


def test_eval_crops_short_input_is_wrapped_to_length_plus_one():
    """T=3 < L=5: wrapped to L+1=6 samples [a b c a b c]; starts int(linspace(0, 1, 3)) = 0, 0, 1."""
    a, b, c = 1.0, 2.0, 3.0
    x = np.array([a, b, c], dtype=np.float32)
    got = eval_crops(x, 3, 5)
    assert got.shape == (3, 5)
    assert np.array_equal(got, np.array([[a, b, c, a, b], [a, b, c, a, b], [b, c, a, b, c]], dtype=np.float32))


def test_eval_crops_much_shorter_input_wraps_repeatedly():
    """T=2 < L=7: wrapped to 8 samples [p q p q p q p q]; starts int(linspace(0, 1, 2)) = 0, 1."""
    x = np.array([5.0, -5.0], dtype=np.float32)
    got = eval_crops(x, 2, 7)
    p, q = 5.0, -5.0
    assert np.array_equal(got, np.array([[p, q, p, q, p, q, p], [q, p, q, p, q, p, q]], dtype=np.float32))


# ------------------------------------------------------------------------------------------------- chunk_bounds
def test_chunk_bounds_hand_examples():
    """n=10, max 4 -> [0,3,6,10]; n=8, max 4 -> [0,4,8]; n=1 -> [0,1]; n=5, max 1 -> [0..5]; n <= max -> [0,n]."""
    assert chunk_bounds(10, 4).tolist() == [0, 3, 6, 10]
    assert chunk_bounds(8, 4).tolist() == [0, 4, 8]
    assert chunk_bounds(1, 5).tolist() == [0, 1]
    assert chunk_bounds(5, 1).tolist() == [0, 1, 2, 3, 4, 5]
    assert chunk_bounds(7, 100).tolist() == [0, 7]
    assert chunk_bounds(10, 4).dtype == np.int64


def test_chunk_bounds_properties_brute_force():
    """For every n <= 80, max_len <= 25: ceil(n/max) chunks, 0 = b0 < ... < bk = n, lengths <= max, within 1."""
    for n in range(1, 81):
        for m in range(1, 26):
            b = chunk_bounds(n, m)
            k = (n + m - 1) // m
            assert len(b) == k + 1 and b[0] == 0 and b[-1] == n, (n, m)
            d = np.diff(b)
            assert (d >= 1).all() and (d <= m).all() and d.max() - d.min() <= 1, (n, m)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 0), (-1, 3)])
def test_chunk_bounds_rejects_non_positive(n, m):
    """n or max_len < 1 is a ValueError."""
    with pytest.raises(ValueError, match="must be >= 1"):
        chunk_bounds(n, m)


# ------------------------------------------------------------------------------------------------ compute_batch
def test_compute_batch_equals_per_utterance_values():
    """Whole utterances: row i of each output is the model's value on row i's true samples (padding invisible)."""
    m = SumModel()
    rows = [np.arange(1, 6), np.array([7.0, -2.0]), np.array([0.5, 0.25, 0.125])]
    out = compute_batch(m, m.output_kinds(), padded(rows), ExtractOptions(num_workers=0))
    assert list(out) == ["embedding"] and len(out["embedding"]) == 3
    want = [[15, 1, 5], [5, 7, -2], [0.875, 0.5, 0.125]]  # [sum, first, last] by hand
    for got, w in zip(out["embedding"], want):
        assert got.dtype == np.float32 and got.shape == (3,)
        assert np.array_equal(got, np.array(w, dtype=np.float32))
    assert m.calls == [(3, 5)]  # one forward of the padded batch


def test_compute_batch_crops_mean_by_hand():
    """crops=3, L=4: the stored vector is the mean over ESPnet's crops, per utterance (hand-computed)."""
    m = SumModel()  # 1000 Hz: crop_duration 0.004 s = 4 samples
    a = np.arange(10)  # crops [0..3] [3..6] [6..9]: sums 6, 18, 30; firsts 0, 3, 6; lasts 3, 6, 9
    b = 100 + np.arange(7)  # starts int(linspace(0, 3, 3)) = 0, 1, 3: sums 406, 410, 418; firsts 100, 101, 103
    opts = ExtractOptions(num_workers=0, crops=3, crop_duration=0.004, batch_bins=8)
    out = compute_batch(m, m.output_kinds(), padded([a, b]), opts)["embedding"]
    assert np.array_equal(out[0], np.array([18, 3, 6], dtype=np.float32))
    assert np.array_equal(out[1], np.array([1234 / 3, 304 / 3, 313 / 3], dtype=np.float32))
    assert out[0].dtype == np.float32
    # 6 crops of 4 samples in forwards of at most batch_bins = 8 samples: 3 forwards of 2 crops, no padding
    assert m.calls == [(2, 4), (2, 4), (2, 4)]


def test_compute_batch_crops_not_averaged():
    """average_crops=False: every crop's vector, (n_crops, D) per utterance, in crop order."""
    m = SumModel()
    opts = ExtractOptions(num_workers=0, crops=3, crop_duration=0.004, average_crops=False)
    out = compute_batch(m, m.output_kinds(), padded([np.arange(10), 100 + np.arange(7)]), opts)["embedding"]
    assert out[0].shape == (3, 3)
    assert np.array_equal(out[0], np.array([[6, 0, 3], [18, 3, 6], [30, 6, 9]], dtype=np.float32))
    assert np.array_equal(out[1], np.array([[406, 100, 103], [410, 101, 104], [418, 103, 106]], dtype=np.float32))


def test_compute_batch_max_chunk_duration_length_weighted_mean():
    """max_chunk_duration 4 samples on 10 samples: chunks [0,3) [3,6) [6,10), outputs weighted by 3, 3, 4."""
    m = SumModel()
    opts = ExtractOptions(num_workers=0, max_chunk_duration=0.004)
    x = np.arange(10)
    out = compute_batch(m, m.output_kinds(), padded([x, np.array([1.0, 2.0])]), opts)["embedding"]
    # sums 3, 12, 30; firsts 0, 3, 6; lasts 2, 5, 9
    want = [(3 * 3 + 12 * 3 + 30 * 4) / 10, (0 * 3 + 3 * 3 + 6 * 4) / 10, (2 * 3 + 5 * 3 + 9 * 4) / 10]
    assert np.allclose(out[0], want, rtol=0, atol=1e-5)
    assert np.array_equal(out[1], np.array([3, 1, 2], dtype=np.float32))  # short row: one chunk, the whole row


def test_compute_batch_passes_non_finite_rows_through():
    """compute_batch does not judge values: a NaN row comes back NaN, the other rows are unchanged."""
    m = NaNModel()
    out = compute_batch(m, m.output_kinds(), padded([np.arange(1, 8), np.arange(1, 4)]), ExtractOptions())
    assert np.isnan(out["embedding"][0]).all()
    assert np.array_equal(out["embedding"][1], np.array([6, 1, 3], dtype=np.float32))


def test_compute_batch_wrong_batch_size_is_an_error():
    """A model returning a different number of rows than the batch raises ValueError."""
    class Short(SumModel):
        name = "test-run-short"

        def embed(self, wav, lengths):
            return super().embed(wav, lengths)[:1]

    m = Short()
    with pytest.raises(ValueError, match="1 rows for a batch of 2"):
        compute_batch(m, m.output_kinds(), padded([np.ones(3), np.ones(2)]), ExtractOptions())


# ---------------------------------------------------------------------------------------------- ShardAccumulator
KINDS = {"embedding": OutputKind("vector", "float32", (2,))}


def vec_out(*rows):
    """Outputs of one batch: one (2,) float32 row per utterance."""
    return {"embedding": [np.array(r, dtype=np.float32) for r in rows]}


def test_accumulator_commits_shard_exactly_at_its_last_batch(tmp_path):
    """The shard file appears only when the shard's last batch is consumed, with rows in consumption order."""
    plan = make_plan([1.0, 2.0, 3.0, 4.0], [[2, 0, 1], [3]])
    acc = ShardAccumulator(plan, tmp_path, KINDS, {0: 2, 1: 1}, ErrorPolicy(), "tester")
    p0, p1 = shard_path(tmp_path, 0), shard_path(tmp_path, 1)
    assert acc.consume(padded({2: [1.0], 0: [1.0]}, tag=0), vec_out([1, 2], [3, 4])) is None
    assert not p0.exists() and not p1.exists()
    rep1 = acc.consume(padded({3: [1.0]}, tag=1), vec_out([7, 8]))  # another shard interleaved
    assert p1.is_file() and not p0.exists()
    assert (rep1.shard, rep1.embedded, rep1.errors, rep1.audio_seconds) == (1, 1, [], 4.0)
    rep0 = acc.consume(padded({1: [1.0]}, tag=0), vec_out([5, 6]))
    assert p0.is_file()
    assert (rep0.shard, rep0.embedded, rep0.decoded, rep0.worker) == (0, 3, 3, "tester")
    assert rep0.audio_seconds == 6.0
    sd = read_shard(p0, 0, plan.shard_keys(0), plan.shard_fingerprint(0))
    assert sd.keys == ["u2", "u0", "u1"] and sd.errors == [] and sd.worker == "tester"
    assert np.array_equal(np.stack(sd.outputs["embedding"]), np.array([[1, 2], [3, 4], [5, 6]], np.float32))
    assert read_shard(p1, 1).keys == ["u3"]


def test_accumulator_records_batch_errors_in_report_and_policy(tmp_path):
    """Decoding errors of a batch go into the shard's report and file and are counted by the policy."""
    plan = make_plan([1.0, 2.0, 3.0], [[0, 1, 2]])
    seen = []
    policy = ErrorPolicy("skip", -1, warn=seen.append)
    acc = ShardAccumulator(plan, tmp_path, KINDS, {0: 1}, policy, "w")
    batch = padded({1: [1.0]}, tag=0, errors=[(0, "too short"), (2, "silent audio")])
    rep = acc.consume(batch, vec_out([1, 1]))
    want = [("u0", "/audio/u0.wav", "too short"), ("u2", "/audio/u2.wav", "silent audio")]
    assert rep.errors == want and rep.embedded == 1 and rep.decoded == 3
    assert rep.audio_seconds == 2.0  # only the stored utterance's audio
    assert policy.count == 2 and policy.first == want[0] and seen == want
    sd = read_shard(shard_path(tmp_path, 0), 0, plan.shard_keys(0))
    assert sd.keys == ["u1"] and sd.errors == [list(e) for e in want]


def test_accumulator_non_finite_output_is_an_error_not_a_row(tmp_path):
    """A NaN / inf output row becomes an error record ("non-finite embedding") and is never stored."""
    plan = make_plan([1.0, 2.0, 3.0], [[0, 1, 2]])
    policy = ErrorPolicy()
    acc = ShardAccumulator(plan, tmp_path, KINDS, {0: 1}, policy, "w")
    rep = acc.consume(padded([[1.0], [1.0], [1.0]], tag=0), vec_out([1, np.nan], [2, 3], [np.inf, 0]))
    assert rep.embedded == 1
    assert rep.errors == [("u0", "/audio/u0.wav", "model produced a non-finite embedding"),
                          ("u2", "/audio/u2.wav", "model produced a non-finite embedding")]
    assert policy.count == 2
    sd = read_shard(shard_path(tmp_path, 0), 0, plan.shard_keys(0))
    assert sd.keys == ["u1"] and np.array_equal(sd.outputs["embedding"][0], np.array([2, 3], np.float32))


def test_accumulator_nan_model_through_compute_batch(tmp_path):
    """compute_batch + consume: the NaN model's bad row is an error and its other row is stored exactly."""
    plan = make_plan([0.007, 0.003], [[0, 1]])
    m = NaNModel()
    batch = padded([np.arange(1, 8), np.arange(1, 4)], tag=0)
    out = compute_batch(m, m.output_kinds(), batch, ExtractOptions())
    acc = ShardAccumulator(plan, tmp_path, m.output_kinds(), {0: 1}, ErrorPolicy(), "w")
    rep = acc.consume(batch, out)
    assert rep.errors == [("u0", "/audio/u0.wav", "model produced a non-finite embedding")]
    sd = read_shard(shard_path(tmp_path, 0), 0, plan.shard_keys(0))
    assert sd.keys == ["u1"] and np.array_equal(sd.outputs["embedding"][0], np.array([6, 1, 3], np.float32))


def test_accumulator_raise_policy_keeps_committed_shards(tmp_path):
    """on_error="raise": consume raises naming the utterance, path and reason; shards committed before remain."""
    plan = make_plan([1.0, 2.0, 3.0], [[0, 1], [2]])
    acc = ShardAccumulator(plan, tmp_path, KINDS, {0: 1, 1: 1}, ErrorPolicy("raise"), "w")
    acc.consume(padded({2: [1.0]}, tag=1), vec_out([1, 1]))
    with pytest.raises(ExtractionError, match=r"utterance 'u1' \(/audio/u1\.wav\): unreadable"):
        acc.consume(padded({0: [1.0]}, tag=0, errors=[(1, "unreadable")]), vec_out([2, 2]))
    assert shard_path(tmp_path, 1).is_file() and not shard_path(tmp_path, 0).exists()


def test_accumulator_empty_batch_without_outputs(tmp_path):
    """A batch whose utterances all failed (outputs None) still counts towards its shard's commit."""
    plan = make_plan([1.0, 2.0], [[0, 1]])
    acc = ShardAccumulator(plan, tmp_path, KINDS, {0: 1}, ErrorPolicy(), "w")
    empty = Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64), [], [(0, "bad"), (1, "worse")], 0)
    rep = acc.consume(empty, None)
    assert rep.embedded == 0 and rep.decoded == 2 and len(rep.errors) == 2
    sd = read_shard(shard_path(tmp_path, 0), 0, plan.shard_keys(0))
    assert sd.keys == [] and sd.outputs["embedding"] == []
