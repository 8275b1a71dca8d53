"""Engine outputs, bad input and resume, on real speech."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from spk_toolkit.bin.cli import EXIT_FAILED
from spk_toolkit import load_embeddings
from spk_toolkit.engine import ExtractionError, extract
from spk_toolkit.io.datadir import load_kaldi_dir


def test_outputs_match_wav_scp(small_run, fillets_small):
    out, summary = small_run
    utts = load_kaldi_dir(fillets_small)
    with np.load(out / "embeddings.npz", allow_pickle=False) as z:
        assert list(z.files) == [u.utt_id for u in utts]  # every utterance, in wav.scp order
        npz = {k: z[k] for k in z.files}
    assert all(v.dtype == np.float32 and v.shape == (256,) and np.isfinite(v).all() for v in npz.values())
    import kaldiio

    with kaldiio.ReadHelper(f"scp:{out / 'embeddings.scp'}") as r:
        ark = dict(r)
    assert list(ark) == list(npz)
    for k in npz:
        np.testing.assert_array_equal(ark[k], npz[k])
    # speaker means = plain mean of the speaker's utterance embeddings (not normalised)
    spk = load_embeddings(out / "spk_embeddings.npz")
    for s in {u.spk_id for u in utts}:
        mean = np.mean([npz[u.utt_id] for u in utts if u.spk_id == s], axis=0)
        np.testing.assert_allclose(spk[s], mean, atol=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert s["utterances"] == s["embedded"] == len(utts) and s["errors"] == 0 and s["speakers"] == 4
    assert s["embedding_dim"] == 256 and s["audio_hours"] > 0 and s["model"]["toolkit"] == "resemblyzer"
    assert (out / "errors.tsv").read_text().splitlines() == ["utt_id\tpath\treason"]


def test_bad_input_skip(bad_dir, tmp_path):
    data, good = bad_dir
    s = extract(data, tmp_path, progress=False)
    assert s["embedded"] == 3 and s["errors"] == 5
    rows = [l.split("\t") for l in (tmp_path / "errors.tsv").read_text().splitlines()[1:]]
    reasons = {r[0]: (r[1], r[2]) for r in rows}
    assert set(reasons) == {"bad_missing", "bad_empty", "bad_corrupt", "bad_nan", "bad_short"}
    assert "file not found" in reasons["bad_missing"][1]
    assert "empty" in reasons["bad_empty"][1]
    assert "unreadable" in reasons["bad_corrupt"][1]
    assert "non-finite" in reasons["bad_nan"][1]
    assert "too short" in reasons["bad_short"][1]
    assert all(reasons[k][0].endswith(".wav") for k in reasons)  # the path is recorded
    emb = load_embeddings(tmp_path / "embeddings.npz")
    assert sorted(emb) == sorted(good) and all(np.isfinite(v).all() for v in emb.values())


@pytest.mark.slow
def test_bad_input_raise_cli(bad_dir, tmp_path):
    data, _ = bad_dir
    r = subprocess.run([sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--data_dir", str(data),
                        "--output_dir", str(tmp_path), "--on_error", "raise", "--progress", "false"],
                       capture_output=True, text=True)
    assert r.returncode == EXIT_FAILED, r.stderr  # the exit-code table (spk_toolkit.bin.cli.EXIT_CODES)
    assert "utterance 'bad_" in r.stderr and ".wav" in r.stderr, r.stderr
    assert not (tmp_path / "embeddings.npz").exists()


@pytest.mark.slow
def test_resume_skips_finished_shards_and_refuses_changed_corpus(fillets_small, tmp_path):
    out = tmp_path / "o"
    s1 = extract(fillets_small, out, progress=False, shard_duration=30)
    assert s1["shards"] >= 3
    ref = load_embeddings(out / "embeddings.npz")
    shard_files = sorted((out / "shards").glob("shard-*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files}
    shard_files[1].unlink()
    s2 = extract(fillets_small, out, progress=False, shard_duration=30)
    assert s2["shards_resumed"] == s1["shards"] - 1
    for p in shard_files:
        if p != shard_files[1]:
            assert p.stat().st_mtime_ns == mtimes[p]  # not recomputed
    again = load_embeddings(out / "embeddings.npz")
    assert list(again) == list(ref) and all(np.array_equal(again[k], ref[k]) for k in ref)
    changed = tmp_path / "changed"
    shutil.copytree(fillets_small, changed)
    lines = (changed / "wav.scp").read_text().splitlines()[1:]
    (changed / "wav.scp").write_text("\n".join(lines) + "\n")
    with pytest.raises(ExtractionError, match="different run"):
        extract(changed, out, progress=False, shard_duration=30)
