"""``spk_embed_extract`` (ESPnet's drop-in) leaves a run directory every spk_toolkit reader, resume and
``--overwrite`` understand: its ``<set>_embeddings.npz`` is the run's output, named by ``summary.json``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("espnet2")

import spk_toolkit  # noqa: E402
from spk_toolkit.bin.cli import EXIT_OK  # noqa: E402
from spk_toolkit.recipes.espnet_spk import prepare  # noqa: E402
from spk_toolkit.testing import load_npz  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "train_xvector.yaml"


@pytest.fixture(scope="module")
def experiment(fillets_small, tmp_path_factory):
    """A prepared ESPnet-SPK dump (``valid`` trials) and a random x-vector checkpoint."""
    import yaml

    from spk_toolkit.backends.espnet import build_random_model

    d = tmp_path_factory.mktemp("embed_extract")
    prepare(fillets_small, d / "dump", valid_per_spk=3)
    backend = build_random_model(CONF, seed=0)
    (d / "config.yaml").write_text(yaml.safe_dump(dict(vars(backend.train_args))))
    torch.save(backend.model.state_dict(), d / "model.pth")
    return d


def _run(exp: Path, out: Path, set_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spk_toolkit.bin.spk_embed_extract", "--output_dir", str(out),
           "--spk_train_config", str(exp / "config.yaml"), "--spk_model_file", str(exp / "model.pth"), "--ngpu", "0",
           "--data_path_and_name_and_type", f"{set_dir}/trial.scp,speech,sound",
           "--data_path_and_name_and_type", f"{set_dir}/trial2.scp,speech2,sound",
           "--data_path_and_name_and_type", f"{set_dir}/trial_label,spk_labels,text",
           "--shape_file", f"{set_dir}/speech_shape", "--fold_length", "480000", "--valid_batch_size", "4", "--num_eval", "2",
           "--target_duration", "2", "--num_workers", "0", "--shard_duration", "6", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _unique_utts(set_dir: Path) -> list:
    ids = [ln.split()[0] for ln in (set_dir / "trial_label").read_text().splitlines()]
    return sorted({u for t in ids for u in t.split("*")})


@pytest.mark.slow
def test_set_embeddings_file_is_the_runs_output_read_resumed_and_overwritten(experiment, tmp_path):
    """Issue 22, acceptance 1: after ``spk_embed_extract``, ``load_embeddings(output_dir)`` returns every unique
    utterance from ``valid_embeddings.npz``; a rerun verifies and resumes every shard; ``--overwrite`` with
    another set removes ``valid_embeddings.npz`` (named by the old summary) and leaves only the new set's file."""
    valid = experiment / "dump" / "valid"
    out = tmp_path / "out"
    r = _run(experiment, out, valid)
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    utts = _unique_utts(valid)
    assert sorted(p.name for p in out.glob("*.npz")) == ["valid_embeddings.npz"]  # no embeddings.npz beside it
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["outputs"]["npz"]).name == "valid_embeddings.npz"

    emb = spk_toolkit.load_embeddings(out)  # through the summary, as for any run directory
    assert sorted(emb) == utts
    file = load_npz(out / "valid_embeddings.npz")
    assert {file[u].shape[0] for u in utts} == {2} and {file[u].ndim for u in utts} == {2}  # (num_eval, D) crops
    crops = spk_toolkit.load_embeddings(out, average_crops=False)
    assert all(np.array_equal(crops[u], file[u]) for u in utts)
    np.testing.assert_allclose(emb[utts[0]], file[utts[0]].mean(0), rtol=1e-6)  # load_embeddings' crop mean

    r = _run(experiment, out, valid)  # the same command again: verify, resume, nothing recomputed
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["shards_resumed"] == again["shards"] == summary["shards"] > 1
    assert again["computed_utterances"] == 0
    assert all(np.array_equal(load_npz(out / "valid_embeddings.npz")[u], file[u]) for u in utts)

    other = experiment / "dump" / "other"  # the same trials under another set name
    if not other.exists():
        other.symlink_to(valid, target_is_directory=True)
    r = _run(experiment, out, other, "--overwrite", "true")
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.npz")) == ["other_embeddings.npz"]
    assert sorted(spk_toolkit.load_embeddings(out)) == utts
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == 0
