"""Unit tests of the worker-side engine (spk_toolkit.engine.run): batch planning and the shard accumulator (the
batch computation itself: test/backends/test_batch.py). Expected values are worked out by hand or by a brute-force
definition here, never taken from a run of the code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batch_helpers import NaNModel, padded
from spk_toolkit.backends.base import OutputKind
from spk_toolkit.backends.batch import compute_batch
from spk_toolkit.data import Batch
from spk_toolkit.engine.options import ErrorPolicy, ExtractionError, ExtractOptions
from spk_toolkit.engine.plan import Plan
from spk_toolkit.engine.run import ShardAccumulator, plan_batches
from spk_toolkit.engine.shards import read_shard, shard_path
from spk_toolkit.io.datadir import Utterance


# ------------------------------------------------------------------------------------------------------ helpers
def make_plan(durations, shards) -> Plan:
    """A plan over utterances u0.. with the given durations (seconds) and shard membership."""
    utts = [Utterance(f"u{i}", f"/audio/u{i}.wav", duration=d) for i, d in enumerate(durations)]
    return Plan(utts, [list(s) for s in shards], {}, "plan-fp", {"toolkit": "test"})


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
