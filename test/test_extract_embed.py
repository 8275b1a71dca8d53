"""SpkTrainer.extract_embed and validate_one_epoch on real speech (fillets), in this process.

A random-init tiny x-vector (conf/train_xvector.yaml) embeds the 16 held-out fillets utterances of
``bin/prepare_spk_train.sh``'s validation set (120 trials). ESPnet's own validation iterator provides crops;
a hand-built iterator provides whole zero-padded utterances with lengths (ESPnet's layout without preprocessor).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("espnet2")

from spk_toolkit.recipes.espnet_spk import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "train_xvector.yaml"
NUM_EVAL = 3


@pytest.fixture(scope="module")
def dump(fillets_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("spk_dump")
    prepare(fillets_small, out, valid_per_spk=4)
    return out


@pytest.fixture(scope="module")
def backend():
    from spk_toolkit.backends.espnet import build_random_model

    return build_random_model(CONF, seed=0)


def trials_of(dump):
    ids = [ln.split()[0] for ln in (dump / "valid" / "trial_label").read_text().splitlines()]
    return ids, sorted({u for t in ids for u in t.split("*")})


@pytest.fixture(scope="module")
def crop_batches(dump, backend):
    """ESPnet's validation iterator (SpkPreprocessor crops), materialised once."""
    from spk_toolkit.train.spk_trainer import build_valid_iterator

    args = argparse.Namespace(**vars(backend.train_args))
    v = dump / "valid"
    args.valid_data_path_and_name_and_type = [
        (str(v / "trial.scp"), "speech", "sound"),
        (str(v / "trial2.scp"), "speech2", "sound"),
        (str(v / "trial_label"), "spk_labels", "text"),
    ]
    args.valid_shape_file = [str(v / "speech_shape")]
    args.num_workers = 0
    return list(build_valid_iterator(args))


@pytest.fixture(scope="module")
def whole_batches(dump):
    """Whole utterances, zero-padded, with speech_lengths/speech2_lengths; 7 trials per batch."""
    wav = {}
    for ln in (dump / "valid" / "wav.scp").read_text().splitlines():
        k, p = ln.split(maxsplit=1)
        wav[k] = torch.from_numpy(sf.read(p, dtype="float32")[0])
    lab = dict(ln.split() for ln in (dump / "valid" / "trial_label").read_text().splitlines())
    ids = list(lab)
    out = []
    for s in range(0, len(ids), 7):
        chunk = ids[s : s + 7]
        b = {}
        for side, key in ((0, "speech"), (1, "speech2")):
            ws = [wav[t.split("*")[side]] for t in chunk]
            b[key] = torch.nn.utils.rnn.pad_sequence(ws, batch_first=True)
            b[f"{key}_lengths"] = torch.tensor([len(w) for w in ws])
        b["spk_labels"] = torch.tensor([[int(lab[t])] for t in chunk])
        out.append((chunk, b))
    return out


def run_extract(model, batches, out, bs, average=False):
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter

    from spk_toolkit.train.spk_trainer import SpkTrainer

    rep = Reporter()
    rep.set_epoch(1)
    with rep.observe("valid") as sub:
        SpkTrainer.extract_embed(model, iter(batches), sub, None, DistributedOption(distributed=False), str(out), bs,
                                 average)  # fmt: skip
    with np.load(Path(out) / "embeddings.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_whole_utterances_equal_engine(backend, dump, whole_batches, tmp_path):
    from spk_toolkit.backends.espnet import EspnetSpeakerModel
    from spk_toolkit.engine import extract

    emb = run_extract(backend.model, whole_batches, tmp_path / "trainer", bs=3, average=True)
    _, utts = trials_of(dump)
    assert sorted(emb) == utts
    extract(dump / "valid", tmp_path / "engine", model=EspnetSpeakerModel.from_model(backend.model),
            progress=False, num_workers=0)  # fmt: skip
    with np.load(tmp_path / "engine" / "embeddings.npz") as z:
        ref = {k: z[k] for k in z.files}
    assert sorted(ref) == utts
    for u in utts:
        assert emb[u].shape == ref[u].shape == (backend.embed_dim,)
        np.testing.assert_allclose(emb[u], ref[u], rtol=1e-5, atol=1e-5, err_msg=u)
    # not L2-normalised, in every batch (ESPnet normalises only its last partial batch)
    norms = np.array([np.linalg.norm(emb[u]) for u in utts])
    assert np.abs(norms - 1).max() > 0.1


def test_crops_world2_merge_and_resume(backend, dump, crop_batches, tmp_path):
    from spk_toolkit.train import spk_trainer as st

    _, utts = trials_of(dump)
    one = run_extract(backend.model, crop_batches, tmp_path / "w1", bs=4)
    assert sorted(one) == utts
    assert all(v.shape == (NUM_EVAL, backend.embed_dim) and v.dtype == np.float32 for v in one.values())

    out = tmp_path / "w2"
    infos = [st.extract_part(backend.model, crop_batches, out, 5, False, r, 2) for r in (0, 1)]
    assert sum(i["n_utts"] for i in infos) == len(utts) and all(i["n_utts"] > 0 for i in infos)
    assert all(not i["skipped"] for i in infos)
    # simulate a crash of rank 1 after rank 0 finished: only part 1 is recomputed
    saved0 = (out / "embeddings0.npz").stat().st_mtime_ns
    (out / "embeddings1.npz").unlink()
    with pytest.raises(FileNotFoundError, match="embeddings1.npz"):
        st.merge_parts(out, 2)
    again = [st.extract_part(backend.model, crop_batches, out, 5, False, r, 2) for r in (0, 1)]
    assert again[0]["skipped"] and again[0]["n_forward"] == 0
    assert not again[1]["skipped"] and again[1]["n_utts"] == infos[1]["n_utts"] and again[1]["n_forward"] > 0
    assert (out / "embeddings0.npz").stat().st_mtime_ns == saved0
    merged = st.merge_parts(out, 2)
    assert not (out / "embeddings0.npz").exists() and not (out / "embeddings1.npz").exists()
    with np.load(merged) as z:
        two = {k: z[k] for k in z.files}
    assert sorted(two) == utts
    for u in utts:
        np.testing.assert_allclose(two[u], one[u], rtol=1e-5, atol=1e-6, err_msg=u)
    # average=True stores the crop mean
    avg = run_extract(backend.model, crop_batches, tmp_path / "avg", bs=16, average=True)
    for u in utts:
        np.testing.assert_allclose(avg[u], one[u].mean(0), rtol=1e-5, atol=1e-6)


def test_custom_bs_below_one_is_an_error(backend, tmp_path):
    def never():
        raise AssertionError("iterator must not be read")
        yield  # pragma: no cover

    for bs in (0, -2):
        with pytest.raises(ValueError, match="custom_bs"):
            run_extract(backend.model, never(), tmp_path, bs)


def test_merge_detects_duplicates(backend, crop_batches, tmp_path):
    from spk_toolkit.train import spk_trainer as st

    for r in (0, 1):
        st.extract_part(backend.model, crop_batches, tmp_path, 8, True, r, 2)
    with np.load(tmp_path / "embeddings0.npz") as z:
        d = {k: z[k] for k in z.files}
    with np.load(tmp_path / "embeddings1.npz") as z:
        d.update({k: z[k] for k in z.files})
    np.savez_compressed(tmp_path / "embeddings1.npz", **d)  # part 1 now also holds part 0's utterances
    with pytest.raises(RuntimeError, match="duplicated"):
        st.merge_parts(tmp_path, 2)


def test_validation_counts_and_metrics(backend, dump, crop_batches, tmp_path):
    """One validation embeds each unique utterance of the rank once; metrics = scoring of extract_embed output."""
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter

    from spk_toolkit.metrics import compute_metrics
    from spk_toolkit.scoring import cosine_score
    from spk_toolkit.train.spk_trainer import SpkTrainer

    model = backend.model
    rows = []
    hook = model.projector.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        def validate(batches):
            rows.clear()
            rep = Reporter()
            rep.set_epoch(1)
            with rep.observe("valid") as sub:
                SpkTrainer.validate_one_epoch(model, iter(batches), sub, None, DistributedOption(distributed=False))
            return {k: rep.get_value("valid", k) for k in ("eer", "mindcf", "mindcf_p01", "n_trials", "trg_mean",
                                                            "trg_std", "nontrg_mean", "nontrg_std")}

        ids, utts = trials_of(dump)
        stats = validate(crop_batches)
        assert sum(rows) == len(utts) * NUM_EVAL  # crop rows through the model: each utterance once
        assert SpkTrainer.last_validation["n_unique_utts"] == len(utts)
        assert SpkTrainer.last_validation["n_forward"] == len(rows) <= -(-len(utts) // 8) + 1
        # the share of one rank of 2 (ESPnet splits each batch rank::2): its own unique utterances only
        for r in (0, 1):
            part = [([t for t in b[0]][r::2], {k: v[r::2] for k, v in b[1].items()}) for b in crop_batches]
            local = {u for b in part for t in b[0] for u in t.split("*")}
            validate(part)
            assert sum(rows) == len(local) * NUM_EVAL == SpkTrainer.last_validation["n_unique_utts"] * NUM_EVAL
    finally:
        hook.remove()

    emb = run_extract(model, crop_batches, tmp_path / "x", bs=8, average=True)
    labels = dict(ln.split() for ln in (dump / "valid" / "trial_label").read_text().splitlines())
    enr, tst = zip(*(t.split("*") for t in ids))
    scores = cosine_score(emb, (list(enr), list(tst)))
    lab = np.array([int(labels[t]) for t in ids])
    m = compute_metrics(scores, lab, p_targets=(0.01, 0.05))
    assert stats["n_trials"] == len(ids) == 120
    assert stats["eer"] == pytest.approx(100 * m["eer"], abs=1e-6)
    assert stats["mindcf"] == pytest.approx(m["min_dcf"][0.05], abs=1e-6)
    assert stats["mindcf_p01"] == pytest.approx(m["min_dcf"][0.01], abs=1e-6)
    assert stats["trg_mean"] == pytest.approx(scores[lab == 1].mean(), abs=1e-6)
    assert stats["trg_std"] == pytest.approx(scores[lab == 1].std(), abs=1e-6)
    assert stats["nontrg_mean"] == pytest.approx(scores[lab == 0].mean(), abs=1e-6)
    assert stats["nontrg_std"] == pytest.approx(scores[lab == 0].std(), abs=1e-6)
    assert stats["nontrg_std"] != pytest.approx(stats["nontrg_mean"])  # ESPnet reported np.std as the mean


def test_validation_with_ddp_wrapped_model_single_process(backend, crop_batches, tmp_path):
    """A DistributedDataParallel wrapper (gloo, world size 1) is unwrapped: same EER as the bare model."""
    import os

    import torch.distributed as dist
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter

    from spk_toolkit.train.spk_trainer import SpkTrainer

    def eer(model, dopt):
        rep = Reporter()
        rep.set_epoch(1)
        with rep.observe("valid") as sub:
            SpkTrainer.validate_one_epoch(model, iter(crop_batches), sub, None, dopt)
        return rep.get_value("valid", "eer")

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this session")
    bare = eer(backend.model, DistributedOption(distributed=False))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(backend.model)
        wrapped = eer(ddp, DistributedOption(distributed=True))
    finally:
        dist.destroy_process_group()
    backend.model.eval()
    assert wrapped == pytest.approx(bare, abs=1e-9)


@pytest.mark.slow
def test_spk_embed_extract_torchrun_two_processes(backend, dump, crop_batches, tmp_path):
    """The CLI under torchrun (2 gloo processes) writes the same embeddings as extract_embed in one process."""
    import os

    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(dict(vars(backend.train_args))))
    pth = tmp_path / "model.pth"
    torch.save(backend.model.state_dict(), pth)
    v = dump / "valid"
    pre = backend.train_args.preprocessor_conf
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--master_port=29641",
        "-m", "spk_toolkit.bin.spk_embed_extract", "--dist_backend", "gloo", "--output_dir", str(tmp_path / "two"),
        "--spk_train_config", str(cfg), "--spk_model_file", str(pth), "--ngpu", "0",
        "--data_path_and_name_and_type", f"{v}/trial.scp,speech,sound",
        "--data_path_and_name_and_type", f"{v}/trial2.scp,speech2,sound",
        "--data_path_and_name_and_type", f"{v}/trial_label,spk_labels,text",
        "--shape_file", f"{v}/speech_shape", "--fold_length", "480000", "--valid_batch_size", "4",
        "--num_eval", str(pre["num_eval"]), "--target_duration", str(pre["target_duration"]), "--num_workers", "0",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_extract(backend.model, crop_batches, tmp_path / "one", bs=8)
    _, utts = trials_of(dump)
    with np.load(tmp_path / "two" / "valid_embeddings.npz", allow_pickle=False) as b:
        assert sorted(b.files) == utts
        for u in utts:
            assert b[u].shape == (NUM_EVAL, backend.embed_dim)
            np.testing.assert_allclose(b[u], one[u], rtol=1e-5, atol=1e-6, err_msg=u)
    assert not list((tmp_path / "two").glob("embeddings*"))  # parts merged and removed
    shutil.rmtree(tmp_path / "two")
