"""SpkTrainer.extract_embed (on the engine) and validate_one_epoch on real speech (fillets).

A random-init tiny x-vector (conf/train_xvector.yaml) embeds the 16 held-out fillets utterances of
``bin/prepare_spk_train.sh``'s validation set (120 trials). ESPnet's own validation DataLoader provides crops
(``SpkPreprocessor``, validation mode); a hand-built iterator provides whole zero-padded utterances with lengths
(ESPnet's layout without preprocessor). Issue 14 acceptance tests: (a) torchrun x 2, (b) crop averaging, (c) a
parameter-less module without frontend through validation.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("espnet2")

from spk_toolkit.recipes.espnet_spk import prepare  # noqa: E402
from spk_toolkit.testing import load_npz  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
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


def wav_paths(dump) -> dict:
    return dict(ln.split(maxsplit=1) for ln in (dump / "valid" / "wav.scp").read_text().splitlines())


def valid_loader(backend, dump, **preprocessor_conf):
    """ESPnet's validation DataLoader over trial.scp / trial2.scp / trial_label (SpkPreprocessor crops)."""
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
    args.preprocessor_conf = {**args.preprocessor_conf, **preprocessor_conf}
    return build_valid_iterator(args)


@pytest.fixture(scope="module")
def crop_batches(dump, backend):
    """ESPnet's validation iterator (SpkPreprocessor crops), materialised once."""
    return list(valid_loader(backend, dump))


@pytest.fixture(scope="module")
def whole_batches(dump):
    """Whole utterances, zero-padded, with speech_lengths/speech2_lengths; 7 trials per batch."""
    wav = {k: torch.from_numpy(sf.read(p, dtype="float32")[0]) for k, p in wav_paths(dump).items()}
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
        SpkTrainer.extract_embed(model, batches, sub, None, DistributedOption(distributed=False), str(out), bs,
                                 average)  # fmt: skip
    return load_npz(Path(out) / "embeddings.npz")


def validate(model, batches) -> dict:
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter

    from spk_toolkit.train.spk_trainer import SpkTrainer

    rep = Reporter()
    rep.set_epoch(1)
    with rep.observe("valid") as sub:
        SpkTrainer.validate_one_epoch(model, iter(batches), sub, None, DistributedOption(distributed=False))
    return {k: rep.get_value("valid", k) for k in ("eer", "mindcf", "mindcf_p01", "n_trials", "trg_mean",
                                                    "trg_std", "nontrg_mean", "nontrg_std")}


@pytest.fixture
def no_espnet_decoding(monkeypatch):
    """ESPnet's sound loader must not decode anything (the engine decodes, each rank only its own shards)."""
    from espnet2.train.dataset import AdapterForSoundScpReader

    def refuse(self, key):
        raise AssertionError(f"ESPnet's loader decoded {key!r}")

    monkeypatch.setattr(AdapterForSoundScpReader, "__getitem__", refuse)


# ----------------------------------------------------------------------------------------------------------------
# extract_embed


def test_whole_utterances_equal_engine(backend, dump, whole_batches, tmp_path):
    """A custom iterator of whole utterances: true lengths only, values = the engine on the audio files."""
    from spk_toolkit.backends.espnet import EspnetSpeakerModel
    from spk_toolkit.engine import extract
    from spk_toolkit.train.spk_trainer import SpkTrainer

    emb = run_extract(backend.model, iter(whole_batches), tmp_path / "trainer", bs=3, average=True)
    _, utts = trials_of(dump)
    assert list(emb) == utts  # sorted ids, each once
    info = SpkTrainer.last_extraction
    assert info["source"] == "batches" and info["executor"] == "inprocess" and info["crops"] == 0
    assert info["decoded"] == info["computed"] == info["embedded"] == info["n_utts"] == len(utts)
    extract(dump / "valid", tmp_path / "engine", model=EspnetSpeakerModel.from_model(backend.model),
            progress=False, num_workers=0)  # fmt: skip
    ref = load_npz(tmp_path / "engine" / "embeddings.npz")
    assert sorted(ref) == utts
    for u in utts:
        assert emb[u].shape == ref[u].shape == (backend.embed_dim,) and emb[u].dtype == np.float32
        np.testing.assert_allclose(emb[u], ref[u], rtol=1e-5, atol=1e-6, err_msg=u)
    # not L2-normalised, in every batch (ESPnet normalises only its last partial batch)
    norms = np.array([np.linalg.norm(emb[u]) for u in utts])
    assert np.abs(norms - 1).max() > 0.1


def test_espnet_loader_crops_resume_and_model_change(backend, dump, tmp_path, monkeypatch, no_espnet_decoding):
    """ESPnet's DataLoader: corpus from the trial lists (nothing decoded by ESPnet), ESPnet's crops as the engine's
    crops, equal to engine.extract; a rerun recomputes only a removed shard; other weights are refused."""
    from spk_toolkit.backends.espnet import EspnetSpeakerModel, build_random_model
    from spk_toolkit.engine import ExtractionError, extract, shard_path
    from spk_toolkit.train.spk_trainer import SpkTrainer

    monkeypatch.setattr(SpkTrainer, "extract_options", {"shard_duration": 10.0})
    _, utts = trials_of(dump)
    loader = valid_loader(backend, dump)
    out = tmp_path / "crops"
    emb = run_extract(backend.model, loader, out, bs=4)
    info = dict(SpkTrainer.last_extraction)
    assert info["source"] == "espnet_dataset" and info["crops"] == NUM_EVAL and info["n_shards"] > 2
    assert info["decoded"] == info["computed"] == len(utts) and info["shards_resumed"] == 0
    assert list(emb) == utts
    assert all(v.shape == (NUM_EVAL, backend.embed_dim) and v.dtype == np.float32 for v in emb.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedded"] == len(utts) and summary["errors"] == 0

    target = float(backend.train_args.preprocessor_conf["target_duration"])
    monkeypatch.undo()  # the engine's own run below reads audio through soundfile, not ESPnet's loader
    extract(dump / "valid", tmp_path / "engine", model=EspnetSpeakerModel.from_model(backend.model), progress=False,
            num_workers=0, crops=NUM_EVAL, crop_duration=target, average_crops=False)  # fmt: skip
    ref = load_npz(tmp_path / "engine" / "embeddings.npz")
    for u in utts:
        np.testing.assert_allclose(emb[u], ref[u], rtol=1e-5, atol=1e-6, err_msg=u)

    # resume: one shard removed -> only it is recomputed, the output is the same
    monkeypatch.setattr(SpkTrainer, "extract_options", {"shard_duration": 10.0})
    plan = json.loads((out / "plan.json").read_text())
    kept = shard_path(out, 1).stat().st_mtime_ns
    shard_path(out, 0).unlink()
    again = run_extract(backend.model, loader, out, bs=4)
    info = SpkTrainer.last_extraction
    assert info["shards_resumed"] == info["n_shards"] - 1 and info["shards"] == [0]
    assert info["decoded"] == info["computed"] == len(plan["shards"][0])
    assert shard_path(out, 1).stat().st_mtime_ns == kept
    assert all(np.array_equal(again[u], emb[u]) for u in utts)

    # average=True stores the crop mean (another output directory: the option is part of the plan)
    avg = run_extract(backend.model, loader, tmp_path / "avg", bs=16, average=True)
    for u in utts:
        np.testing.assert_allclose(avg[u], emb[u].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6, err_msg=u)

    # other weights into the same directory: refused, never stale shards (in-memory weights are fingerprinted)
    other = build_random_model(CONF, seed=1)
    with pytest.raises(ExtractionError, match="different run"):
        run_extract(other.model, loader, out, bs=4)


def test_crop_average_equals_crops_embedded_one_by_one(backend, dump, tmp_path):
    """Acceptance (b): with ESPnet's crops, average=True stores the mean of the crops, each built with numpy as
    ESPnet's SpkPreprocessor does (wrap, linspace, int) and embedded alone (batch 1) by the model's own forward."""
    target = 3.0  # longer than some utterances: exercises ESPnet's wrap padding
    loader = valid_loader(backend, dump, target_duration=target)
    avg = run_extract(backend.model, loader, tmp_path / "avg", bs=5, average=True)
    crops = run_extract(backend.model, loader, tmp_path / "crops", bs=5, average=False)
    L = int(target * 16000)
    lengths = []
    model = backend.model.eval()
    for u, path in wav_paths(dump).items():
        x, sr = sf.read(path, dtype="float32")
        assert sr == 16000
        lengths.append(len(x))
        if len(x) < L:
            x = np.pad(x, (0, L - len(x) + 1), "wrap")
        starts = np.linspace(0, len(x) - L, num=NUM_EVAL)
        rows = np.stack([x[int(s) : int(s) + L] for s in starts])
        with torch.no_grad():
            one = np.stack([model(torch.from_numpy(r[None].copy()), extract_embd=True)[0].numpy() for r in rows])
        np.testing.assert_allclose(crops[u], one, rtol=1e-5, atol=1e-5, err_msg=u)
        np.testing.assert_allclose(avg[u], one.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5, err_msg=u)
    assert min(lengths) < L < max(lengths)  # both branches of ESPnet's crop rule were checked


def test_custom_bs_and_fixed_options_checked_before_any_work(backend, tmp_path, monkeypatch):
    from spk_toolkit.train.spk_trainer import SpkTrainer

    def never():
        raise AssertionError("iterator must not be read")
        yield  # pragma: no cover

    for bs in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="custom_bs"):
            run_extract(backend.model, never(), tmp_path, bs)
    monkeypatch.setattr(SpkTrainer, "extract_options", {"output_format": ["hdf5"]})
    with pytest.raises(ValueError, match="output_format"):
        run_extract(backend.model, never(), tmp_path, 4)
    assert not (tmp_path / "plan.json").exists()


def test_crop_batches_of_a_custom_iterator_are_refused(backend, crop_batches, tmp_path):
    """Crops (B, n_crops, T) cannot be mapped back to their utterances: a clear error naming the way out."""
    from spk_toolkit.train.spk_trainer import ValidationError

    with pytest.raises(ValidationError, match="ESPnet's DataLoader.*whole utterances"):
        run_extract(backend.model, iter(crop_batches), tmp_path, 4)
    assert not (tmp_path / "embeddings.npz").exists()


class Stats(torch.nn.Module):
    """A parameter-less module without frontend: (mean, std, max |x|) of each row, ESPnet's contract."""

    def forward(self, speech, speech_lengths=None, spk_labels=None, extract_embd=True, **kwargs):
        return torch.stack([speech.mean(1), speech.std(1), speech.abs().amax(1)], dim=1)


def test_parameterless_module_without_frontend_extracts(dump, whole_batches, tmp_path):
    """Any module with ESPnet's contract: CPU device, grouped forward on true lengths (padding never seen)."""
    from spk_toolkit.backends.espnet import EspnetSpeakerModel

    b = EspnetSpeakerModel.from_model(Stats())
    assert b.device == torch.device("cpu") and b.batch_mode == "grouped" and b.embed_dim == 3
    assert b.describe()["encoder"] is None and b.describe()["weights_sha256"]
    emb = run_extract(Stats(), iter(whole_batches), tmp_path, bs=4)
    _, utts = trials_of(dump)
    assert list(emb) == utts
    for u, path in wav_paths(dump).items():
        x = sf.read(path, dtype="float32")[0].astype(np.float64)
        np.testing.assert_allclose(emb[u], [x.mean(), x.std(ddof=1), np.abs(x).max()], rtol=1e-4, atol=1e-6,
                                   err_msg=u)  # fmt: skip


class TokenEcho(torch.nn.Module):
    """Parameter-less: (mean of the row, its task token); insists on ESPnet's task_tokens (B, 1)."""

    def forward(self, speech, speech_lengths=None, spk_labels=None, task_tokens=None, extract_embd=True, **kwargs):
        assert task_tokens is not None and tuple(task_tokens.shape) == (speech.shape[0], 1)
        return torch.cat([speech.mean(1, keepdim=True), task_tokens.to(speech.dtype)], dim=1)


def test_task_token_reaches_every_forward(dump, whole_batches, tmp_path):
    """ESPnet passes the iterator's task token to every forward as task_tokens (B, 1): so does extract_embed."""
    from spk_toolkit.train.spk_trainer import SpkTrainer, ValidationError

    def with_tokens(tok):
        return [(ids, {**b, "task_tokens": torch.full((len(ids), 1), tok(i))}) for i, (ids, b) in
                enumerate(whole_batches)]  # fmt: skip

    emb = run_extract(TokenEcho(), iter(with_tokens(lambda i: 7)), tmp_path / "tok", bs=4)
    assert SpkTrainer.last_extraction["task_token"] == 7
    for u, path in wav_paths(dump).items():
        x = sf.read(path, dtype="float32")[0].astype(np.float64)
        np.testing.assert_allclose(emb[u], [x.mean(), 7.0], rtol=1e-4, atol=1e-6, err_msg=u)
    with pytest.raises(ValidationError, match="different task tokens"):
        run_extract(TokenEcho(), iter(with_tokens(lambda i: i % 2)), tmp_path / "mixed", bs=4)


def test_corpus_agreement_across_ranks(monkeypatch):
    """corpus_on_every_rank with a simulated second rank: union of sharded ESPnet corpora, conflicts, the other
    rank's error and this rank's own error (raised after the exchange, so no rank waits for a failed one)."""
    from spk_toolkit.io.datadir import Utterance
    from spk_toolkit.train import trial_corpus as st

    def corpus(*items, source="espnet_dataset"):
        return st.TrialCorpus([Utterance(u, p) for u, p in items], NUM_EVAL, 1.0, None, source)

    def second_rank(other, first_error=None):
        calls = []

        def gather(obj, world):
            assert world == 2
            calls.append(obj)
            if len(calls) == 1:
                return [obj, (first_error, None) if first_error else (None, other.digest())]
            return [obj, (other.options(), {u.utt_id: u.path for u in other.utts})]

        monkeypatch.setattr(st, "_gather_objects", gather)
        return calls

    mine = corpus(("b", "/w/b.wav"), ("a", "/w/a.wav"))
    second_rank(corpus(("c", "/w/c.wav"), ("b", "/w/b.wav")))
    got = st.corpus_on_every_rank(lambda: mine, 2)
    assert [(u.utt_id, u.path) for u in got.utts] == [("a", "/w/a.wav"), ("b", "/w/b.wav"), ("c", "/w/c.wav")]
    assert got.options() == mine.options()
    calls = second_rank(mine)
    assert st.corpus_on_every_rank(lambda: mine, 2) is mine and len(calls) == 1  # agreement: one small exchange
    second_rank(corpus(("b", "/elsewhere/b.wav")))
    with pytest.raises(st.ValidationError, match="'b': rank 1 has audio /elsewhere/b.wav"):
        st.corpus_on_every_rank(lambda: mine, 2)
    second_rank(st.TrialCorpus(mine.utts, 5, 1.0, None, "espnet_dataset"))
    with pytest.raises(st.ValidationError, match="different corpora"):
        st.corpus_on_every_rank(lambda: mine, 2)
    batches = corpus(("a", st.IN_MEMORY_PATH), source="batches")
    second_rank(corpus(("b", st.IN_MEMORY_PATH), source="batches"))
    with pytest.raises(st.ValidationError, match="same whole-utterance trials"):
        st.corpus_on_every_rank(lambda: batches, 2)
    second_rank(mine, first_error="ValidationError: trial 'x' is not '<enroll>*<test>'")
    with pytest.raises(st.ValidationError, match="rank 1: ValidationError: trial 'x'"):
        st.corpus_on_every_rank(lambda: mine, 2)

    def broken():
        raise st.ValidationError("this rank's own error")

    calls = second_rank(mine)
    with pytest.raises(st.ValidationError, match="this rank's own error"):
        st.corpus_on_every_rank(broken, 2)
    assert calls and calls[0][0].startswith("ValidationError: this rank's own error")  # the others were told


# ----------------------------------------------------------------------------------------------------------------
# validate_one_epoch


def test_validation_counts_and_metrics(backend, dump, crop_batches, tmp_path):
    """One validation embeds each unique utterance of the rank once; metrics = scoring of extract_embed output."""
    from spk_toolkit.metrics import compute_metrics
    from spk_toolkit.scoring import cosine_score
    from spk_toolkit.train.spk_trainer import SpkTrainer

    model = backend.model
    rows = []
    hook = model.projector.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        ids, utts = trials_of(dump)
        rows.clear()
        stats = validate(model, crop_batches)
        assert sum(rows) == len(utts) * NUM_EVAL  # crop rows through the model: each utterance once
        assert SpkTrainer.last_validation["n_unique_utts"] == len(utts)
        assert SpkTrainer.last_validation["n_forward"] == len(rows) <= -(-len(utts) // 8) + 1
        # the share of one rank of 2 (ESPnet splits each batch rank::2): its own unique utterances only
        for r in (0, 1):
            part = [([t for t in b[0]][r::2], {k: v[r::2] for k, v in b[1].items()}) for b in crop_batches]
            local = {u for b in part for t in b[0] for u in t.split("*")}
            rows.clear()
            validate(model, part)
            assert sum(rows) == len(local) * NUM_EVAL == SpkTrainer.last_validation["n_unique_utts"] * NUM_EVAL
    finally:
        hook.remove()

    emb = run_extract(model, valid_loader(backend, dump), tmp_path / "x", bs=8, average=True)
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


class Identity(torch.nn.Module):
    """Parameter-less, no frontend: returns its input (fixed-length "speech" (B, D) -> embeddings (B, D))."""

    def forward(self, speech, speech_lengths=None, spk_labels=None, extract_embd=True, **kwargs):
        return speech


def eer_by_definition(scores: np.ndarray, labels: np.ndarray) -> float:
    """REFERENCE.md: P_miss(t) = #{tar: s < t}/N_tar, P_fa(t) = #{non: s >= t}/N_non at every distinct score
    (and +inf); EER by linear interpolation between the two consecutive points where P_miss - P_fa changes sign."""
    tar, non = scores[labels == 1], scores[labels == 0]
    thr = np.concatenate([[np.inf], np.unique(scores)[::-1]])  # accept nothing ... accept all
    pm = np.array([np.sum(tar < t) / tar.size for t in thr])
    pf = np.array([np.sum(non >= t) / non.size for t in thr])
    d = pm - pf  # 1 at +inf, -1 at the lowest score
    k = int(np.argmax(d <= 0))
    if d[k] == 0:
        return float(pm[k])
    a = d[k - 1] / (d[k - 1] - d[k])
    e_fa, e_miss = pf[k - 1] + a * (pf[k] - pf[k - 1]), pm[k - 1] + a * (pm[k] - pm[k - 1])
    assert e_fa == pytest.approx(e_miss, abs=1e-12)
    return float(e_fa)


def test_parameterless_identity_module_validates(caplog):
    """Acceptance (c): a parameter-less module without frontend returning its input validates; the registered EER
    is the definition's on its cosine scores (computed here with numpy), the fallback is logged once."""
    rng = np.random.default_rng(3)
    D, n_spk, per = 16, 4, 4
    centres = rng.normal(size=(n_spk, D))
    vec = {f"s{s}_u{i}": (centres[s] + 0.9 * rng.normal(size=D)).astype(np.float32)
           for s in range(n_spk) for i in range(per)}  # fmt: skip
    keys = sorted(vec)
    trials = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    lab = np.array([int(a.split("_")[0] == b.split("_")[0]) for a, b in trials])
    batches = []
    for s in range(0, len(trials), 7):  # ESPnet's whole-utterance layout: speech (B, T) with T = D here
        chunk = trials[s : s + 7]
        batches.append(([f"{a}*{b}" for a, b in chunk], {
            "speech": torch.from_numpy(np.stack([vec[a] for a, _ in chunk])),
            "speech2": torch.from_numpy(np.stack([vec[b] for _, b in chunk])),
            "speech_lengths": torch.full((len(chunk),), D), "speech2_lengths": torch.full((len(chunk),), D),
            "spk_labels": torch.from_numpy(lab[s : s + 7].reshape(-1, 1)),
        }))  # fmt: skip
    e = np.stack([vec[a] for a, _ in trials]).astype(np.float64)
    t = np.stack([vec[b] for _, b in trials]).astype(np.float64)
    cos = np.sum(e * t, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(t, axis=1))
    ref = eer_by_definition(cos, lab)
    assert 0.02 < ref < 0.5  # a non-trivial operating point

    caplog.set_level("INFO")
    stats = validate(Identity(), batches)
    assert stats["n_trials"] == len(trials)
    assert stats["eer"] == pytest.approx(100 * ref, abs=1e-9)
    assert stats["trg_mean"] == pytest.approx(cos[lab == 1].mean(), abs=1e-9)
    assert stats["nontrg_std"] == pytest.approx(cos[lab == 0].std(), abs=1e-9)
    caplog.clear()
    validate(Identity(), batches)  # the grouped fallback is not announced again
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "falling back" in r.getMessage()]


def test_validation_with_ddp_wrapped_model_single_process(backend, crop_batches, tmp_path):
    """A DistributedDataParallel wrapper (gloo, world size 1) is unwrapped: same EER as the bare model."""
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

    # no test leaves a process group behind (test/conftest.py checks after every test), so this one always runs
    assert not dist.is_initialized()
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


# ----------------------------------------------------------------------------------------------------------------
# torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_spk_embed_extract_torchrun_two_processes(backend, dump, tmp_path):
    """Acceptance (a): the CLI under torchrun (2 gloo ranks) decodes every utterance exactly once over both ranks
    and writes what engine.extract computes in one process from the same checkpoint (within 1e-6)."""
    import yaml

    from spk_toolkit.backends.espnet import EspnetSpeakerModel
    from spk_toolkit.engine import extract

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(dict(vars(backend.train_args))))
    pth = tmp_path / "model.pth"
    torch.save(backend.model.state_dict(), pth)
    v = dump / "valid"
    pre = backend.train_args.preprocessor_conf
    out = tmp_path / "two"
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    cmd = [
        str(torchrun if torchrun.exists() else Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2",
        f"--master_port={_free_port()}", "-m", "spk_toolkit.bin.spk_embed_extract", "--dist_backend", "gloo",
        "--output_dir", str(out), "--spk_train_config", str(cfg), "--spk_model_file", str(pth), "--ngpu", "0",
        "--data_path_and_name_and_type", f"{v}/trial.scp,speech,sound",
        "--data_path_and_name_and_type", f"{v}/trial2.scp,speech2,sound",
        "--data_path_and_name_and_type", f"{v}/trial_label,spk_labels,text",
        "--shape_file", f"{v}/speech_shape", "--fold_length", "480000", "--valid_batch_size", "4",
        "--num_eval", str(pre["num_eval"]), "--target_duration", str(pre["target_duration"]), "--num_workers", "0",
        "--shard_duration", "8",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("unique utterances ->") == 1  # rank 0 only
    _, utts = trials_of(dump)

    summary = json.loads((out / "summary.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert summary["executor"] == "torchrun" and summary["world_size"] == 2 and summary["embedded"] == len(utts)
    workers = [summary["workers"][w] for w in sorted(summary["workers"])]
    assert [w.split()[:2] for w in sorted(summary["workers"])] == [["rank", "0"], ["rank", "1"]]
    assert all(w["decoded"] > 0 for w in workers)  # both ranks worked ...
    assert sum(w["decoded"] for w in workers) == len(utts)  # ... and every utterance was decoded exactly once
    shards = [set(w["shards"]) for w in workers]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(plan["shards"])))
    for w in workers:
        assert w["decoded"] == sum(len(plan["shards"][k]) for k in w["shards"])

    ref_model = EspnetSpeakerModel(train_config=cfg, model_file=pth)
    extract(v, tmp_path / "ref", model=ref_model, progress=False, num_workers=0, crops=int(pre["num_eval"]),
            crop_duration=float(pre["target_duration"]), average_crops=False)  # fmt: skip
    ref = load_npz(tmp_path / "ref" / "embeddings.npz")
    got = load_npz(out / "valid_embeddings.npz")
    assert list(got) == utts and not (out / "embeddings.npz").exists()  # renamed to <set>_embeddings.npz
    for u in utts:
        assert got[u].shape == (NUM_EVAL, backend.embed_dim)
        np.testing.assert_allclose(got[u], ref[u], rtol=0, atol=1e-6, err_msg=u)


# ----------------------------------------------------------------------------------------------------------------
# one batch path (issue 22, criterion 2): the API, the trainer and spk_inference


def _cli_embeddings(backend, dump, tmp_path, name, *flags):
    """spk_inference (in this process) over the validation utterances with the same random model; its embeddings
    and its run directory."""
    from spk_toolkit.bin import spk_inference
    from spk_toolkit.io.readers import load_embeddings

    ckpt = tmp_path / "model.pth"
    if not ckpt.exists():
        torch.save(backend.model.state_dict(), ckpt)
    out = tmp_path / name
    rc = spk_inference.main(["--data_dir", str(dump / "valid"), "--output_dir", str(out), "--toolkit", "espnet",
                             "--train_config", str(CONF), "--model_file", str(ckpt), "--min_duration", "0",
                             "--progress", "false", *flags])
    return rc, (load_embeddings(out) if rc == 0 else None), out


def _api_utterances(dump):
    from spk_toolkit.io.datadir import Utterance

    return [Utterance(u, p) for u, p in sorted(wav_paths(dump).items())]


def _validation_embeddings(model, batches, monkeypatch) -> dict:
    """The embeddings SpkTrainer.validate_one_epoch computed (its UniqueEmbedder, recorded)."""
    from spk_toolkit.train import validation

    seen = []

    class Recording(validation.UniqueEmbedder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(validation, "UniqueEmbedder", Recording)
    validate(model, batches)
    (emb,) = seen
    return emb.embeddings


@pytest.mark.slow
def test_api_trainer_and_spk_inference_give_equal_embeddings_with_crops_and_chunks(backend, dump, whole_batches,
                                                                                     tmp_path, monkeypatch):
    """The same utterances, the same random x-vector: ESPnet's evaluation crops (3 x 3 s, wrap-padded when shorter)
    through the in-memory API, SpkTrainer.extract_embed (ESPnet's validation loader), SpkTrainer's validation and
    spk_inference --crops; then --max_chunk_duration 1 s through the API, extract_embed (extract_options) and
    spk_inference. Equal to float32 rounding (the same batch computation, batched differently)."""
    from spk_toolkit.train.spk_trainer import SpkTrainer

    utts = _api_utterances(dump)
    loader = valid_loader(backend, dump, target_duration=3.0)
    api = backend.embed_utterances(utts, min_duration=0.0, crops=NUM_EVAL, crop_duration=3.0)
    trainer = run_extract(backend.model, loader, tmp_path / "x", bs=5, average=True)
    valid = _validation_embeddings(backend.model, list(loader), monkeypatch)
    rc, cli, _ = _cli_embeddings(backend, dump, tmp_path, "cli_crops", "--crops", str(NUM_EVAL),
                                 "--crop_duration", "3")
    assert rc == 0
    assert sorted(trainer) == sorted(valid) == sorted(cli) == [u.utt_id for u in utts]
    for i, u in enumerate(utts):
        for name, got in (("extract_embed", trainer), ("validation", valid), ("spk_inference", cli)):
            np.testing.assert_allclose(got[u.utt_id], api[i], rtol=1e-5, atol=1e-5, err_msg=f"{name} {u.utt_id}")

    # max_chunk_duration: utterances longer than 1 s are length-weighted means of <= 1 s chunks
    lengths = [sf.info(u.path).frames for u in utts]
    assert sum(n > 16000 for n in lengths) >= 3
    api = backend.embed_utterances(utts, min_duration=0.0, max_chunk_duration=1.0)
    whole = backend.embed_utterances(utts, min_duration=0.0)
    monkeypatch.setattr(SpkTrainer, "extract_options", {"max_chunk_duration": 1.0})
    trainer = run_extract(backend.model, whole_batches, tmp_path / "xc", bs=4)  # whole utterances, in memory
    rc, cli, _ = _cli_embeddings(backend, dump, tmp_path, "cli_chunks", "--max_chunk_duration", "1")
    assert rc == 0
    for i, u in enumerate(utts):
        np.testing.assert_allclose(trainer[u.utt_id], api[i], rtol=1e-5, atol=1e-5, err_msg=u.utt_id)
        np.testing.assert_allclose(cli[u.utt_id], api[i], rtol=1e-5, atol=1e-5, err_msg=u.utt_id)
        if lengths[i] > 16000:  # chunking changed these (a random model is not chunk-invariant)
            assert not np.allclose(api[i], whole[i], rtol=1e-4, atol=1e-4), u.utt_id
        else:
            np.testing.assert_array_equal(api[i], whole[i])


@pytest.mark.slow
def test_one_non_finite_policy_api_trainer_and_spk_inference(backend, dump, whole_batches, tmp_path, monkeypatch,
                                                             capsys):
    """A backend that returns NaN for one utterance (the one of a length no other has) gives the same reason
    everywhere: an errors.tsv row from spk_inference --on_error skip, and an UtteranceError naming that utterance
    with that reason from the API, spk_inference --on_error raise, extract_embed and the trainer's validation."""
    from spk_toolkit.backends.espnet import EspnetSpeakerModel
    from spk_toolkit.errors import UtteranceError
    from spk_toolkit.io.rundir import RunDir
    from spk_toolkit.train.spk_trainer import SpkTrainer

    utts = _api_utterances(dump)
    lengths = {u.utt_id: sf.info(u.path).frames for u in utts}
    bad = next(u for u in utts if list(lengths.values()).count(lengths[u.utt_id]) == 1)
    reason = "model produced a non-finite embedding"
    embed = EspnetSpeakerModel.embed

    def nan_for_bad(self, wav, lengths_):
        out = embed(self, wav, lengths_).clone()
        out[lengths_.to(out.device) == lengths[bad.utt_id]] = float("nan")
        return out

    monkeypatch.setattr(EspnetSpeakerModel, "embed", nan_for_bad)
    expected = f"utterance {bad.utt_id!r} ({bad.path}): {reason}"

    with pytest.raises(UtteranceError) as e:
        backend.embed_utterances(utts, min_duration=0.0)
    assert str(e.value) == expected

    rc, emb, out = _cli_embeddings(backend, dump, tmp_path, "skip", "--on_error", "skip")
    assert rc == 0 and sorted(emb) == sorted(u.utt_id for u in utts if u is not bad)
    assert RunDir(out).read_errors() == [(bad.utt_id, bad.path, reason)]
    from spk_toolkit.bin.cli import EXIT_FAILED

    capsys.readouterr()
    rc, _, _ = _cli_embeddings(backend, dump, tmp_path, "raise", "--on_error", "raise")
    assert rc == EXIT_FAILED and expected in capsys.readouterr().err

    monkeypatch.setattr(SpkTrainer, "extract_options", {})
    with pytest.raises(UtteranceError) as e:
        run_extract(backend.model, whole_batches, tmp_path / "x", bs=4)
    assert (e.value.utt_id, e.value.reason) == (bad.utt_id, reason)
    with pytest.raises(UtteranceError) as e:
        validate(backend.model, whole_batches)
    assert (e.value.utt_id, e.value.reason) == (bad.utt_id, reason)
