"""The shard plan (spk_toolkit.engine.plan): duration-balanced shards, the plan file, its reuse and refusal."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spk_toolkit.engine import ExtractionError, ExtractOptions, make_shards, prepare_run, remove_run, shard_path
from spk_toolkit.testing import make_subset

SHARD_S = 4.5


@pytest.fixture(scope="module")
def subset(fillets_small, tmp_path_factory):
    return make_subset(fillets_small, tmp_path_factory.mktemp("sub") / "data")


def test_make_shards_balanced_and_deterministic():
    rng = np.random.default_rng(1)
    d = rng.uniform(0.5, 20, size=1000).tolist()
    s1 = make_shards(d, 600)
    assert s1 == make_shards(d, 600)
    assert sorted(i for s in s1 for i in s) == list(range(1000))
    totals = [sum(d[i] for i in s) for s in s1]
    assert len(s1) == int(np.ceil(sum(d) / 600))
    assert max(totals) - min(totals) <= 2 * max(d)  # cumulative cuts: each boundary within one utterance


def test_plan_reused_changed_input_refused_overwrite_starts_fresh(subset, tmp_path):
    info = {"toolkit": "fake", "embed_dim": 4}
    opts = ExtractOptions(shard_duration=SHARD_S, progress=False)
    p1 = prepare_run(subset, tmp_path, info, opts)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["shards"] == p1.shards and saved["fingerprint"] == p1.fingerprint
    # each shard holds about SHARD_S of audio; every utterance exactly once
    assert sorted(i for s in p1.shards for i in s) == list(range(len(p1.utts)))
    assert max(p1.shard_duration(k) for k in range(len(p1.shards))) < 2 * SHARD_S + 1
    assert prepare_run(subset, tmp_path, info, opts).shards == p1.shards  # reloaded
    with pytest.raises(ExtractionError, match="different run.*--overwrite"):
        prepare_run(subset, tmp_path, {**info, "embed_dim": 8}, opts)  # model changed
    changed = tmp_path / "changed"
    changed.mkdir()
    lines = (subset / "wav.scp").read_text().splitlines()
    (changed / "wav.scp").write_text("\n".join(lines[:-1]) + "\n")  # corpus changed
    with pytest.raises(ExtractionError, match="corpus, model or options changed"):
        prepare_run(changed, tmp_path, info, opts)
    with pytest.raises(ExtractionError):
        prepare_run(subset, tmp_path, info, ExtractOptions(shard_duration=60, progress=False))  # options changed
    # --overwrite: old shards are discarded, a new plan is written
    shard_path(tmp_path, 0).parent.mkdir(exist_ok=True)
    shard_path(tmp_path, 0).write_bytes(b"stale")
    assert "shards/" in remove_run(tmp_path) and not (tmp_path / "plan.json").exists()  # what --overwrite does first
    p2 = prepare_run(changed, tmp_path, info, ExtractOptions(shard_duration=SHARD_S, progress=False))
    assert len(p2.utts) == len(lines) - 1 and not shard_path(tmp_path, 0).exists()
    assert json.loads((tmp_path / "plan.json").read_text())["fingerprint"] == p2.fingerprint
