"""Tests of the ESPnet backend (spk_toolkit.backends.espnet): padding-invisible batched embeddings.

Models are random-init (seeded, with randomised BatchNorm statistics so BN(0) != 0) built from the small
configs in conf/ and test/espnet_configs/. Signals are synthetic speech-like waveforms of 0.5 s to 20 s.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch

pytest.importorskip(
    "espnet2.tasks.spk",
    reason="OPTIONAL DEPENDENCY MISSING: espnet is not installed (not in install_requires; `make setup` installs "
    "espnet==202611 --no-deps), so NONE of the espnet backend tests ran",
)

import espnet_helpers as H  # noqa: E402
from spk_toolkit.backends.espnet import EspnetSpeakerModel, masked_support  # noqa: E402

ARCHS = ["xvector", "ecapa", "resnet34"]
DURATIONS = [0.5, 0.9, 1.7, 3.1, 5.3, 8.2, 13.0, 20.0]  # seconds
SR = 16000
_MODELS: dict = {}


def model(arch: str) -> EspnetSpeakerModel:
    if arch not in _MODELS:
        _MODELS[arch] = H.build(arch, seed=0)
    return _MODELS[arch]


@pytest.fixture(scope="module")
def wavs():
    return [H.speech_like(d, SR, seed=i) for i, d in enumerate(DURATIONS)]


@pytest.fixture(scope="module")
def singles(wavs):
    """Batch-size-1 embeddings per architecture (the reference)."""
    return {a: H.embed_in_groups(model(a), wavs, [[i] for i in range(len(wavs))]) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_mode_selected(arch):
    m = model(arch)
    assert masked_support(m.model) == (True, "")
    assert m.batch_mode == "masked"
    d = m.describe()
    assert d["toolkit"] == "espnet" and d["batch_mode"] == "masked" and d["embed_dim"] == m.embed_dim
    assert d["sample_rate"] == 16000 and d["model_file"] is None and d["model_sha256"] is None


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_invariance(arch, wavs, singles):
    """Acceptance: one large batch and random groupings give cosine >= 0.99999 with batch size 1.

    The ResNet34's time axis is strided (x8), but lengths are propagated exactly through every convolution
    and all convolutions are anchored at frame 0, so the same bound holds there.
    """
    m = model(arch)
    ref = singles[arch]
    order = np.random.default_rng(1).permutation(len(wavs)).tolist()
    seeds = (2,) if arch == "resnet34" else (2, 3)  # the ResNet is the costly one on 2 CPU cores
    groupings = [[order]] + [H.random_groups(len(wavs), seed) for seed in seeds]
    worst = 1.0
    for groups in groupings:
        got = H.embed_in_groups(m, wavs, groups)
        cos = H.cosine(got, ref)
        worst = min(worst, float(cos.min()))
        assert float(cos.min()) >= 0.99999, (arch, groups, cos.tolist())
    print(f"{arch}: min cosine batch vs single = {worst:.10f} (1 - cos = {1 - worst:.2e})")


@pytest.mark.parametrize("arch", ARCHS)
def test_unmasked_espnet_forward_depends_on_padding(arch, wavs, singles):
    """Regression guard: ESPnet's own batched forward *does* change with padding (so the test above can fail)."""
    m = model(arch)
    wav, lengths = H.pad_batch(wavs)
    unmasked = m.espnet_forward(wav, lengths)
    cos = H.cosine(unmasked, singles[arch])
    print(f"{arch}: ESPnet unmasked forward, min cosine vs single = {float(cos.min()):.6f}")
    # random-init embeddings share a large common component, so cosines stay high; what matters is that the
    # error is far outside the 1e-5 tolerance of the invariance test
    assert float(cos.min()) < 0.9999
    # the longest utterance has no padding in that batch: identical
    assert float(cos[int(lengths.argmax())]) > 0.99999


@pytest.mark.parametrize("arch", ARCHS)
def test_single_utterance_equals_espnet_forward(arch, wavs):
    """Without padding our masked forward equals ESPnet's `model(speech, extract_embd=True)` within 1e-5."""
    m = model(arch)
    for w in (wavs[0], wavs[3], wavs[5]):
        x = torch.from_numpy(w)[None]
        ours = m.embed(x, torch.tensor([x.shape[1]]))
        with torch.inference_mode():
            theirs = m.model(x.clone().to(m.device), extract_embd=True).float().cpu()
        scale = max(1.0, float(theirs.abs().max()))
        torch.testing.assert_close(ours, theirs, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_contract(arch, wavs):
    m = model(arch)
    wav, lengths = H.pad_batch(wavs[:3])
    e = m.embed(wav, lengths)
    assert e.shape == (3, m.embed_dim) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.isfinite(e).all()
    assert not torch.allclose(e.norm(dim=-1), torch.ones(3))  # not L2-normalised
    assert m.embed(wav[:0], lengths[:0]).shape == (0, m.embed_dim)


def test_fallback_rawnet3_is_batch_invariant(caplog):
    """An encoder without a masked forward (RawNet3) falls back to equal-length grouping, with a warning."""
    with caplog.at_level(logging.WARNING, logger="spk_toolkit.backends.espnet"):
        m = H.build("rawnet3", seed=0)
    assert m.batch_mode == "grouped"
    assert any("RawNet3Encoder" in r.getMessage() and "grouped" in r.getMessage() for r in caplog.records)
    assert m.describe()["batch_mode"] == "grouped"
    w = [H.speech_like(d, SR, seed=10 + i) for i, d in enumerate([0.5, 1.2, 1.2, 2.5])]
    ref = H.embed_in_groups(m, w, [[0], [1], [2], [3]])
    got = H.embed_in_groups(m, w, [[3, 1, 0, 2]])
    assert float(H.cosine(got, ref).min()) >= 0.99999
    # and the unmasked ESPnet forward would not have been
    wav, lengths = H.pad_batch(w)
    assert float(H.cosine(m.espnet_forward(wav, lengths), ref).min()) < 0.999
    with pytest.raises(ValueError, match="RawNet3Encoder"):
        H.build("rawnet3", seed=0, batch_mode="masked")


def test_fallback_unknown_encoder_monkeypatched(caplog, monkeypatch, wavs):
    """A monkeypatched unknown encoder type is detected; 'single' and 'grouped' equal batch size 1."""
    import spk_toolkit.backends.espnet.model as E  # where EspnetSpeakerModel looks masked_support up

    monkeypatch.setattr(E, "masked_support", lambda model: (False, "encoder Mystery has no masked forward"))
    with caplog.at_level(logging.WARNING, logger="spk_toolkit.backends.espnet"):
        m = H.build("xvector", seed=0)
    assert m.batch_mode == "grouped"
    assert any("Mystery" in r.getMessage() for r in caplog.records)
    w = wavs[:4]
    ref = H.embed_in_groups(m, w, [[i] for i in range(4)])
    assert float(H.cosine(H.embed_in_groups(m, w, [[2, 0, 3, 1]]), ref).min()) >= 0.99999
    s = H.build("xvector", seed=0, batch_mode="single")
    assert s.batch_mode == "single"
    assert float(H.cosine(H.embed_in_groups(s, w, [[2, 0, 3, 1]]), ref).min()) >= 0.99999


def test_model_file_roundtrip_and_describe(tmp_path, wavs):
    """A saved checkpoint loads through SpeakerTask.build_model_from_file; describe() carries its sha256."""
    m = model("xvector")
    path = tmp_path / "model.pth"
    torch.save(m.model.state_dict(), path)
    loaded = EspnetSpeakerModel(train_config=H.CONFIGS["xvector"], model_file=path)
    d = loaded.describe()
    assert d["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d["model_file"] == str(path.resolve()) and d["train_config"] == str(H.CONFIGS["xvector"].resolve())
    wav, lengths = H.pad_batch(wavs[:2])
    torch.testing.assert_close(loaded.embed(wav, lengths), m.embed(wav, lengths))


def test_checkpoint_must_cover_the_embedding_path(tmp_path, wavs, caplog):
    """ESPnet loads checkpoints with strict=False: one lacking an encoder weight would leave it random. We refuse
    it (naming file and key), in the backend and in the trainer's SpeakerTask; a checkpoint without the
    training loss head (unused for embeddings) loads and embeds exactly as the full one."""
    import yaml

    from spk_toolkit.backends.espnet import _complete_config, checkpoint_coverage
    from spk_toolkit.tasks.spk import SpeakerTask

    m = model("xvector")
    sd = m.model.state_dict()
    enc_key = next(k for k in sd if k.startswith("encoder.") and k.endswith(".weight"))
    torch.save({k: v for k, v in sd.items() if k != enc_key}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth.*lacks " + enc_key.replace(".", r"\.")):
        EspnetSpeakerModel(train_config=H.CONFIGS["xvector"], model_file=tmp_path / "bad.pth")
    full_config = tmp_path / "config.yaml"  # an experiment's config.yaml, as validate_checkpoint reads it
    full_config.write_text(yaml.safe_dump(_complete_config(H.CONFIGS["xvector"])[0]))
    with pytest.raises(ValueError, match="lacks " + enc_key.replace(".", r"\.")):
        SpeakerTask.build_model_from_file(str(full_config), str(tmp_path / "bad.pth"))

    assert any(k.startswith("loss.") for k in sd), "the x-vector config should carry a loss with weights"
    no_loss = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    no_loss["something.else"] = torch.zeros(1)
    torch.save(no_loss, tmp_path / "no_loss.pth")
    assert checkpoint_coverage(m.model, no_loss) == ([], ["something.else"])
    with caplog.at_level(logging.INFO, logger="spk_toolkit.backends.espnet"):
        loaded = EspnetSpeakerModel(train_config=H.CONFIGS["xvector"], model_file=tmp_path / "no_loss.pth")
    assert "something.else" in caplog.text
    wav, lengths = H.pad_batch(wavs[:3])
    torch.testing.assert_close(loaded.embed(wav, lengths), m.embed(wav, lengths))


def test_training_config_loads_checkpoint_of_any_speaker_count(tmp_path, wavs):
    """A training config without spk_num (ESPnet recipes pass it on the command line) + a checkpoint trained on
    10 speakers: ESPnet alone fails on the loss head's shape; we load every weight but the head (which
    embeddings do not use). A shape mismatch on the embedding path is refused, naming file and key."""
    import yaml

    from espnet2.tasks.spk import SpeakerTask as EspnetSpeakerTask

    from spk_toolkit.backends.espnet import _complete_config

    conf = _complete_config(H.CONFIGS["xvector"])[0]
    assert "spk_num" not in yaml.safe_load(H.CONFIGS["xvector"].read_text())
    conf["spk_num"] = 10
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(conf))
    torch.manual_seed(3)
    trained, _ = EspnetSpeakerTask.build_model_from_file(str(tmp_path / "config.yaml"), None, "cpu")
    trained.eval()
    sd = trained.state_dict()
    assert sd["loss.weight"].shape[0] == 10
    torch.save(sd, tmp_path / "trained.pth")
    (tmp_path / "filled.yaml").write_text(yaml.safe_dump({**conf, "spk_num": 2}))  # the filled training config
    with pytest.raises(RuntimeError, match="size mismatch for loss"):  # what ESPnet's own loading does with it
        EspnetSpeakerTask.build_model_from_file(str(tmp_path / "filled.yaml"), str(tmp_path / "trained.pth"), "cpu")
    from_training_config = EspnetSpeakerModel(train_config=H.CONFIGS["xvector"], model_file=tmp_path / "trained.pth")
    from_experiment = EspnetSpeakerModel(train_config=tmp_path / "config.yaml", model_file=tmp_path / "trained.pth")
    wav, lengths = H.pad_batch(wavs[:3])
    torch.testing.assert_close(from_training_config.embed(wav, lengths), from_experiment.embed(wav, lengths))
    k = next(k for k in sd if k.startswith("encoder.") and k.endswith(".weight") and sd[k].ndim >= 2)
    sd[k] = sd[k][:-1]
    torch.save(sd, tmp_path / "wrong_shape.pth")
    with pytest.raises(ValueError, match="(?s)wrong_shape.pth.*does not fit.*" + k.replace(".", r"\.")):
        EspnetSpeakerModel(train_config=H.CONFIGS["xvector"], model_file=tmp_path / "wrong_shape.pth")


def test_registry_and_errors(tmp_path):
    from spk_toolkit.backends.base import BACKENDS

    assert BACKENDS["espnet"] is EspnetSpeakerModel
    m = model("xvector")
    with pytest.raises(ValueError, match="batch_mode"):
        EspnetSpeakerModel(train_config=H.CONFIGS["xvector"], batch_mode="bogus")
    with pytest.raises(ValueError, match="needs train_config"):
        EspnetSpeakerModel()
    with pytest.raises(FileNotFoundError):
        EspnetSpeakerModel(train_config=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="padded length"):
        m.embed(torch.zeros(1, 1000), torch.tensor([2000]))
    with pytest.raises(ValueError, match="shorter"):
        m.embed(torch.zeros(1, 1000), torch.tensor([m.min_samples - 1]))
    import sys
    from unittest import mock

    # checked whether or not espnet_model_zoo is installed: None in sys.modules makes its import fail
    with mock.patch.dict(sys.modules, {"espnet_model_zoo": None}):
        with pytest.raises(ImportError, match=r"needs espnet_model_zoo: `pip install --no-deps espnet_model_zoo`"):
            EspnetSpeakerModel(model_tag="espnet/some_model")


@pytest.mark.slow
def test_ecapa512_benchmark_config(wavs):
    """conf/model_ecapa.yaml (C=512, the benchmark model) builds and is batch invariant."""
    m = H.build("ecapa512", seed=0)
    assert m.batch_mode == "masked" and m.embed_dim == 192
    w = [wavs[0], wavs[2], wavs[5]]
    ref = H.embed_in_groups(m, w, [[0], [1], [2]])
    got = H.embed_in_groups(m, w, [[2, 0, 1]])
    assert float(H.cosine(got, ref).min()) >= 0.99999


@pytest.fixture(scope="module")
def real_wavs():
    try:
        w = H.real_speech()
    except FileNotFoundError as e:  # missing data set: a failure in CI, never a silent skip
        pytest.fail(f"real-speech data unavailable: {e}", pytrace=False)
    assert len(w) == 6 and all(x.ndim == 1 and x.size > 0.3 * 16000 for x in w)
    return w


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_invariance_real_speech(arch, real_wavs):
    """Same acceptance criterion on real speech (0.9-19 s) from data/fillets (fails when absent)."""
    w = real_wavs
    m = model(arch)
    ref = H.embed_in_groups(m, w, [[i] for i in range(len(w))])
    got = H.embed_in_groups(m, w, [list(range(len(w)))[::-1]])
    cos = H.cosine(got, ref)
    print(f"{arch}: real speech, min cosine batch vs single = {float(cos.min()):.10f}")
    assert float(cos.min()) >= 0.99999


def test_from_model_wraps_in_memory_model(wavs):
    """from_model (used by the trainer) shares the masked forward and gives the same embeddings."""
    m = model("ecapa")
    w = EspnetSpeakerModel.from_model(m.model)
    assert w.batch_mode == "masked" and w.embed_dim == m.embed_dim and w.sample_rate == m.sample_rate
    wav, lengths = H.pad_batch(wavs[:3])
    torch.testing.assert_close(w.embed(wav, lengths), m.embed(wav, lengths))


VARIANTS = {
    # mean pooling on the x-vector encoder
    "xvector_mean": ("xvector", {"pooling": "mean", "projector_conf": {"output_size": 32}}),
    # Bottleneck ResNet (resnet50 layout) with attentive statistics pooling on the strided time axis
    "resnet50_chn_attn": ("resnet34", {"encoder_conf": {"resnet_type": "resnet50", "m_channels": 2},
                                       "pooling": "chn_attn_stat"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_covered_combinations(variant, tmp_path, wavs):
    """Other covered layer combinations: invariant in batches and equal to ESPnet's forward alone."""
    import yaml

    from spk_toolkit.backends.espnet import build_random_model

    base, over = VARIANTS[variant]
    conf = yaml.safe_load(H.CONFIGS[base].read_text())
    conf.update(over)
    path = tmp_path / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(conf))
    m = build_random_model(path, seed=0)
    assert m.batch_mode == "masked"
    w = [wavs[0], wavs[2], wavs[4]]
    ref = H.embed_in_groups(m, w, [[0], [1], [2]])
    assert float(H.cosine(H.embed_in_groups(m, w, [[2, 0, 1]]), ref).min()) >= 0.99999
    x = torch.from_numpy(w[1])[None]
    with torch.inference_mode():
        theirs = m.model(x.clone(), extract_embd=True).float()
    torch.testing.assert_close(ref[1:2], theirs, atol=1e-5 * max(1.0, float(theirs.abs().max())), rtol=1e-5)
