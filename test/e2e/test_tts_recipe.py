"""TTS speaker embeddings (issue 15): ESPnet's speaker-embedding stage and ESPnet3's x-vector runner on the engine.

Real speech (fillets, 0.5-10 s, 4 speakers) in an ESPnet TTS data dir whose wav.scp, text, utt2spk and spk2utt list
the utterances in different orders; random-init models saved the way users have them (an ESPnet ``model.pth`` +
``config.yaml``; a SpeechBrain ``EncoderClassifier`` source directory). The CLIs run as users run them.

Acceptance criteria of issue 15: 1 ``test_text_order_batch_invariance_speaker_means_*``, 2
``test_espnet_loaders_read_the_scp_aligned_with_text``, 3 ``test_speechbrain_*``, 4 ``test_rawnet_*``, 5
``test_espnet3_xvector_block_*``, 6 ``test_convert_to_avg_*`` / ``test_check_spk_embed_scp_*``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from espnet_helpers import real_speech
from spk_toolkit.io.audio import read_audio
from spk_toolkit.io.datadir import load_kaldi_dir
from tts_helpers import rawnet_crops_reference, save_espnet_model, save_speechbrain_ecapa, write_tts_dir

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "test")}
TORCHRUN = ROOT / ".venv/bin/torchrun"
COMMON = ["--num_workers", "0", "--progress", "false", "--shard_duration", "30"]

pytestmark = pytest.mark.slow


def cli(*args) -> list:
    return [sys.executable, "-m", "spk_toolkit.bin.extract_spk_embed", *map(str, args)]


def run(cmd, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_scp_keys(path) -> list:
    return [ln.split(maxsplit=1)[0] for ln in Path(path).read_text().splitlines() if ln.strip()]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def speech(fillets_small):
    """Utterances of 0.5-10 s from 4 fillets speakers (real speech)."""
    utts = [u for u in load_kaldi_dir(fillets_small) if 0.5 <= (u.duration or 0) <= 10.0]
    assert len({u.spk_id for u in utts}) >= 4 and len(utts) >= 24
    return utts


@pytest.fixture(scope="module")
def recipe(speech, tmp_path_factory):
    """A recipe directory: data/tr (TTS data dir, shuffled orders) and exp/spk/model.pth (random ECAPA)."""
    r = tmp_path_factory.mktemp("recipe")
    orders = write_tts_dir(speech, r / "data" / "tr", seed=1)
    model = save_espnet_model("ecapa", r / "exp" / "spk", seed=3)
    return r, orders, model


@pytest.fixture(scope="module")
def bs1(recipe, speech):
    """Batch-size-1 reference: each utterance decoded alone and embedded alone with the same backend."""
    from spk_toolkit.backends.espnet import EspnetSpeakerModel

    m = EspnetSpeakerModel(model_file=recipe[2])
    out = {}
    for u in speech:
        x, _ = read_audio(u.path, m.sample_rate)
        out[u.utt_id] = m.embed(torch.from_numpy(x)[None], torch.tensor([len(x)]))[0].numpy()
    return out


@pytest.fixture(scope="module")
def inprocess_run(recipe):
    """The CLI as tts.sh runs it: from the recipe directory, relative folders (ESPnet's scp convention)."""
    r, _, model = recipe
    p = run(cli("--toolkit", "espnet", "--pretrained_model", "exp/spk/model.pth", "--spk_embed_tag", "xvector",
                "--device", "cpu", *COMMON, "data/tr", "dump/xvector/tr"), cwd=r)
    assert p.returncode == 0, p.stderr[-3000:]
    return r / "dump" / "xvector" / "tr", p


@pytest.fixture(scope="module")
def torchrun_run(recipe, tmp_path_factory):
    """torchrun x 2 (gloo), absolute folders."""
    r, _, model = recipe
    out = tmp_path_factory.mktemp("tr2") / "xvector"
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--standalone", "--nproc_per_node=2", "-m",
           "spk_toolkit.bin.extract_spk_embed", "--toolkit", "espnet", "--pretrained_model", str(model),
           "--spk_embed_tag", "xvector", "--device", "cpu", "--batch_bins", "1600000", *COMMON,
           str(r / "data" / "tr"), str(out)]
    p = run(cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


# ------------------------------------------------------------------------------------------------ criterion 1
def _check_run(out: Path, data: Path, orders: dict, bs1: dict, where: Path) -> None:
    """<tag>.scp in text order with values equal to batch-size-1 extraction; spk_<tag>.scp in spk2utt order with
    the plain mean of the speaker's raw utterance embeddings (ESPnet's); both read from ``where`` (another working
    directory): with kaldiio itself when the entries are absolute, with our reader when they are relative."""
    import kaldiio

    from spk_toolkit.io.storage import open_reader

    assert read_scp_keys(out / "xvector.scp") == orders["text"]
    assert read_scp_keys(out / "spk_xvector.scp") == orders["spk2utt"]
    spk2utt = {ln.split()[0]: ln.split()[1:] for ln in (data / "spk2utt").read_text().splitlines()}
    absolute = Path((out / "xvector.scp").read_text().split()[1].rsplit(":", 1)[0]).is_absolute()
    cwd = os.getcwd()
    os.chdir(where)
    try:
        load = (lambda p: kaldiio.load_scp(str(p))) if absolute else open_reader
        utt, spk = load(out / "xvector.scp"), load(out / "spk_xvector.scp")
        got = {k: np.asarray(utt[k]) for k in orders["text"]}
        means = {s: np.asarray(spk[s]) for s in orders["spk2utt"]}
    finally:
        os.chdir(cwd)
    for k, v in got.items():
        assert v.dtype == np.float32 and v.shape == bs1[k].shape
        assert cosine(v, bs1[k]) >= 0.99999, k
    for s, m in means.items():
        ref = np.mean(np.stack([got[u].astype(np.float64) for u in spk2utt[s]]), axis=0)
        assert m.dtype == np.float32
        np.testing.assert_allclose(m, ref, rtol=0, atol=1e-6)


def test_text_order_batch_invariance_speaker_means_in_process(recipe, inprocess_run, bs1, tmp_path):
    r, orders, _ = recipe
    out, p = inprocess_run
    # ESPnet's convention: entries relative to the recipe directory, as the folders were given
    first = (out / "xvector.scp").read_text().split()[1]
    assert first.startswith("dump/xvector/tr/xvector.ark:"), first
    _check_run(out, r / "data/tr", orders, bs1, where=tmp_path)  # our reader resolves them via the scp's parents
    s = json.loads((out / "summary.json").read_text())
    assert s["shards"] > 1 and s["embedded"] == len(orders["text"])
    assert "text order" in p.stdout and "spk_xvector.scp" in p.stdout


def test_text_order_batch_invariance_speaker_means_torchrun(recipe, torchrun_run, bs1, tmp_path):
    r, orders, _ = recipe
    out, p = torchrun_run
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and len(s["workers"]) == 2
    assert Path((out / "xvector.scp").read_text().split()[1].rsplit(":", 1)[0]).is_absolute()
    _check_run(out, r / "data/tr", orders, bs1, where=tmp_path)


def test_rerun_resumes_and_rewrites_the_same_files(recipe, inprocess_run, tmp_path):
    r, orders, _ = recipe
    out = tmp_path / "resume"
    shutil.copytree(inprocess_run[0], out)
    before = (out / "xvector.ark").read_bytes()
    p = run(cli("--toolkit", "espnet", "--pretrained_model", r / "exp/spk/model.pth", "--spk_embed_tag", "xvector",
                "--device", "cpu", *COMMON, r / "data/tr", out))
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_resumed"] == s["shards"] and s.get("computed_utterances", 0) == 0
    assert (out / "xvector.ark").read_bytes() == before
    assert read_scp_keys(out / "xvector.scp") == orders["text"]


def test_an_utterance_of_text_that_fails_is_a_clear_error_and_nothing_stale_remains(recipe, speech, tmp_path):
    from spk_toolkit.tts import TTSExportError, extract_tts_embeddings

    r, _, model = recipe
    d = tmp_path / "data"
    shutil.copytree(r / "data" / "tr", d)
    bad = speech[0].utt_id
    lines = [f"{bad} {tmp_path / 'missing.wav'}" if ln.split()[0] == bad else ln
             for ln in (d / "wav.scp").read_text().splitlines()]
    (d / "wav.scp").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "xvector.scp").write_text("stale 1\n")  # a previous export must not survive a failed run
    with pytest.raises(TTSExportError, match=rf"1 of {len(speech)} utterance\(s\) in text.*{bad}.*file not found"):
        extract_tts_embeddings(d, out, "xvector", toolkit="espnet", model_kwargs={"model_file": str(model)},
                               num_workers=0, progress=False)
    assert not (out / "xvector.scp").exists() and not (out / "spk_xvector.scp").exists()
    # text naming an utterance that wav.scp lacks: refused before any model is loaded
    (d / "text").write_text((d / "text").read_text() + "not_in_wav_scp hello\n")
    from spk_toolkit.io.datadir import CorpusError

    with pytest.raises(CorpusError, match="not_in_wav_scp"):
        extract_tts_embeddings(d, tmp_path / "o2", "xvector", toolkit="espnet", model_kwargs={"model_file": "x"})


# ------------------------------------------------------------------------------------------------ criterion 2
def test_espnet_loaders_read_the_scp_aligned_with_text(recipe, inprocess_run):
    """ESPnet's own loaders, from the recipe directory as tts.sh runs them: text + <tag>.scp,spembs,kaldi_ark."""
    from espnet2.train.dataset import ESPnetDataset
    from espnet2.train.iterable_dataset import IterableESPnetDataset

    from spk_toolkit.io.storage import open_reader

    r, orders, _ = recipe
    out = inprocess_run[0]
    spec = [("data/tr/text", "text", "text"), ("dump/xvector/tr/xvector.scp", "spembs", "kaldi_ark")]

    def pre(uid, data):  # tts.sh uses CommonPreprocessor (tokenisation); any text -> array conversion will do here
        return {**data, "text": np.frombuffer(data["text"].encode(), np.uint8).astype(np.int64)}

    ours = open_reader(out / "xvector.scp")
    cwd = os.getcwd()
    os.chdir(r)
    try:
        got = [(uid, d["spembs"]) for uid, d in IterableESPnetDataset(spec, preprocess=pre)]
        ds = ESPnetDataset(spec, preprocess=pre)
        mapped = {k: ds[k][1]["spembs"] for k in orders["text"]}
    finally:
        os.chdir(cwd)
    assert [u for u, _ in got] == orders["text"]
    for uid, v in got:
        np.testing.assert_array_equal(v, ours[uid])
        np.testing.assert_array_equal(mapped[uid], ours[uid])


# ------------------------------------------------------------------------------------------------ criterion 3
@pytest.fixture(scope="module")
def sb_dir(tmp_path_factory):
    return save_speechbrain_ecapa(tmp_path_factory.mktemp("sb") / "ecapa", seed=5)


def test_speechbrain_batch_invariance_on_unequal_lengths(sb_dir):
    from spk_toolkit.backends.speechbrain import SpeechBrainModel

    m = SpeechBrainModel(source=sb_dir)
    assert m.batch_mode == "masked" and m.sample_rate == 16000 and m.embed_dim == 24
    wavs = real_speech((0.6, 1.5, 3.0, 6.0, 9.5))
    alone = [m.embed(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0] for w in wavs]
    # what ESPnet's extract_spk_embed.py computes for one utterance at 16 kHz: encode_batch on it alone
    for w, a in zip(wavs, alone):
        ref = m.classifier.encode_batch(torch.from_numpy(w)[None]).reshape(-1)
        np.testing.assert_allclose(a.numpy(), ref.numpy(), rtol=0, atol=1e-6)
    T = max(len(w) for w in wavs)
    batch = torch.zeros(len(wavs), T)
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = torch.from_numpy(w)
    lengths = torch.tensor([len(w) for w in wavs])
    together = m.embed(batch, lengths)
    for i, a in enumerate(alone):
        assert cosine(together[i], a) >= 0.99999
        np.testing.assert_allclose(together[i].numpy(), a.numpy(), rtol=0, atol=1e-5)
    # the two batched ways that are not invariant: PR #6227 stacks unequal lengths (fails), and SpeechBrain's own
    # encode_batch with true relative wav_lens moves short utterances
    with pytest.raises(RuntimeError):
        torch.stack([torch.from_numpy(w) for w in wavs])
    padded = m.classifier.encode_batch(batch, lengths.float() / T).reshape(len(wavs), -1)
    assert min(cosine(padded[i], alone[i]) for i in range(len(wavs) - 1)) < 0.9999


def test_speechbrain_resamples_from_22k_like_resampling_first(sb_dir, speech, tmp_path):
    """A 22.05 kHz data dir through the CLI (local model dir, no network) equals resampling to 16 kHz first."""
    import soundfile as sf
    import soxr

    from spk_toolkit.backends.speechbrain import SpeechBrainModel

    d = tmp_path / "data"
    d.mkdir()
    chosen = speech[:6]
    for u in chosen:
        x, sr = read_audio(u.path)
        sf.write(tmp_path / f"{u.utt_id.replace('/', '_')}.wav", soxr.resample(x, sr, 22050), 22050, subtype="FLOAT")
    (d / "wav.scp").write_text("".join(f"{u.utt_id} {tmp_path / (u.utt_id.replace('/', '_') + '.wav')}\n"
                                       for u in chosen))
    (d / "text").write_text("".join(f"{u.utt_id} x\n" for u in reversed(chosen)))
    (d / "utt2spk").write_text("".join(f"{u.utt_id} {u.spk_id}\n" for u in chosen))
    out = tmp_path / "out"
    p = run(cli("--toolkit", "speechbrain", "--pretrained_model", sb_dir, "--spk_embed_tag", "xvector",
                "--device", "cpu", *COMMON, d, out))
    assert p.returncode == 0, p.stderr[-3000:]
    from spk_toolkit.io.storage import open_reader

    got = open_reader(out / "xvector.scp")
    assert list(got) == [u.utt_id for u in reversed(chosen)]
    m = SpeechBrainModel(source=sb_dir)
    for u in chosen:
        f = tmp_path / f"{u.utt_id.replace('/', '_')}.wav"
        x, sr = sf.read(f, dtype="float32")
        assert sr == 22050
        first = soxr.resample(x, 22050, 16000, quality="HQ").astype(np.float32)
        ref = m.embed(torch.from_numpy(first)[None], torch.tensor([len(first)]))[0].numpy()
        np.testing.assert_allclose(got[u.utt_id], ref, rtol=0, atol=1e-5)
        # and not what taking the 22.05 kHz samples for 16 kHz would give
        wrong = m.embed(torch.from_numpy(x)[None], torch.tensor([len(x)]))[0].numpy()
        assert cosine(got[u.utt_id], wrong) < 0.999


def test_speechbrain_on_dask_workers_equals_in_process(sb_dir, recipe, tmp_path):
    """The same data dir on a Dask LocalCluster x 2 (each worker builds the model from the local directory)."""
    from spk_toolkit.io.storage import open_reader

    r, orders, _ = recipe
    outs = {}
    for name, extra in (("inproc", []), ("dask", ["--parallel", tmp_path / "parallel.yaml"])):
        (tmp_path / "parallel.yaml").write_text("env: local\nn_workers: 2\n")
        p = run(cli("--toolkit", "speechbrain", "--pretrained_model", sb_dir, "--spk_embed_tag", "xvector",
                    "--device", "cpu", *COMMON, *extra, r / "data/tr", tmp_path / name))
        assert p.returncode == 0, p.stderr[-3000:]
        outs[name] = open_reader(tmp_path / name / "xvector.scp")
    assert json.loads((tmp_path / "dask" / "summary.json").read_text())["executor"] == "dask"
    assert list(outs["dask"]) == list(outs["inproc"]) == orders["text"]
    for k in orders["text"]:
        np.testing.assert_allclose(outs["dask"][k], outs["inproc"][k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ criterion 4
def test_rawnet_equals_espnet_crop_convention_one_utterance_at_a_time(speech, tmp_path):
    from spk_toolkit.backends.rawnet import RawNetModel
    from spk_toolkit.io.storage import open_reader
    from spk_toolkit.tts import extract_tts_embeddings

    pth = save_espnet_model("rawnet3", tmp_path / "rawnet", seed=7)
    m = RawNetModel(model_file=pth)
    assert m.name == "rawnet" and m.batch_mode == "grouped" and m.default_options == {"crops": 10, "crop_duration": 3.0}
    chosen = sorted(speech, key=lambda u: u.duration)[:: max(1, len(speech) // 10)][:10]  # 0.5 s .. long ones
    assert min(u.duration for u in chosen) < 3.0 < max(u.duration for u in chosen)  # wrapped and cropped both
    write_tts_dir(chosen, tmp_path / "data", seed=2)
    forwards = []
    h = m.model.register_forward_hook(lambda mod, a, o: forwards.append(a[0].shape[0]))
    try:
        s = extract_tts_embeddings(tmp_path / "data", tmp_path / "out", "xvector", model=m, num_workers=0,
                                   progress=False)
    finally:
        h.remove()
    assert s["model"]["toolkit"] == "rawnet"
    # every crop of many utterances in one batched forward (ESPnet and PR #6227: one forward per utterance)
    assert len(forwards) < len(chosen) and sum(forwards) == 10 * len(chosen), forwards
    got = open_reader(tmp_path / "out" / "xvector.scp")
    for u in chosen:
        x, _ = read_audio(u.path, 16000)
        ref = rawnet_crops_reference(m, x)
        assert cosine(got[u.utt_id], ref) >= 0.99999
        np.testing.assert_allclose(got[u.utt_id], ref, rtol=1e-4, atol=1e-5)


def test_rawnet_cli_defaults_and_tts_sh_placeholder():
    from spk_toolkit.bin.extract_spk_embed import model_arguments

    assert model_arguments("rawnet", "RawNet", "cpu") == {"device": "cpu"}  # tts.sh's placeholder: the default
    assert model_arguments("espnet", "espnet/voxcelebs12_ecapa", "cpu")["model_tag"] == "espnet/voxcelebs12_ecapa"
    with pytest.raises(ValueError, match="needs --pretrained_model"):
        model_arguments("espnet", None, "cpu")


# ------------------------------------------------------------------------------------------------ criterion 5
def test_espnet3_xvector_block_runs_unchanged_and_pt_layout_loads(sb_dir, speech, tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "manifest").mkdir(parents=True)
    splits = {"train": speech[:12], "valid": speech[12:18], "test": speech[18:24]}
    for name, us in splits.items():
        (data_dir / "manifest" / f"{name}.tsv").write_text(
            "".join(f"{u.utt_id}\t{u.path}\tsome text\t{u.spk_id}\n" for u in us))
    cfg = tmp_path / "training_config.yaml"
    cfg.write_text(f"""\
data_dir: {data_dir}
model:
  _target_: espnet2.gan_tts.vits.VITS   # the rest of a training config is ignored
optim:
  lr: 0.0002
xvector:
  toolkit: speechbrain
  pretrained_model: {sb_dir}
  device: cuda:0
  spk_embed_tag: spkrec-ecapa-voxceleb
  save_path: ${{data_dir}}/x_vectors
  batch_size: 20
  manifest_paths:
    train: ${{data_dir}}/manifest/train.tsv
    valid: ${{data_dir}}/manifest/valid.tsv
    test:  ${{data_dir}}/manifest/test.tsv
  splits:
    - train
    - valid
    - test
""")
    p = run(cli("--config", cfg, "--espnet3_layout", "true", *COMMON))
    assert p.returncode == 0, p.stderr[-3000:]
    from spk_toolkit.io.storage import open_reader

    for name, us in splits.items():
        pt_dir = data_dir / "x_vectors" / "spkrec-ecapa-voxceleb" / name
        ours = open_reader(data_dir / "x_vectors" / "spk_toolkit" / "spkrec-ecapa-voxceleb" / name
                           / "spkrec-ecapa-voxceleb.scp")
        assert list(ours) == [u.utt_id for u in us]
        for u in us:
            t = torch.load(pt_dir / f"{u.utt_id}.pt", weights_only=True)  # ESPnet3's path expression
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (24,)
            np.testing.assert_array_equal(t.numpy(), ours[u.utt_id])
    assert "split test" in p.stdout and "pt layout" in p.stdout


# ------------------------------------------------------------------------------------------------ criterion 6
def test_convert_to_avg_spk_embed_with_utt2spk_and_spk_id(recipe, inprocess_run, tmp_path):
    import kaldiio

    r, orders, _ = recipe
    out = tmp_path / "x"
    shutil.copytree(inprocess_run[0], out)
    for f in ("xvector.scp", "spk_xvector.scp"):  # absolute entries, readable from here
        (out / f).write_text((out / f).read_text().replace("dump/xvector/tr/", f"{out}/"))
    orig = (out / "xvector.scp").read_text()
    conv = [sys.executable, "-m", "spk_toolkit.bin.convert_to_avg_spk_embed"]
    p = run(conv + ["--utt-embed-path", out / "xvector.scp", "--spk-embed-path", out / "spk_xvector.scp",
                    "--utt2spk", r / "data/tr/utt2spk"])
    assert p.returncode == 0, p.stderr
    assert (out / "xvector.scp.bak").read_text() == orig  # <dir>/<name>.bak, not "os.path.filename(...).bak"
    u2s = dict(ln.split() for ln in (r / "data/tr/utt2spk").read_text().splitlines())
    utt, spk = kaldiio.load_scp(str(out / "xvector.scp")), kaldiio.load_scp(str(out / "spk_xvector.scp"))
    assert list(utt) == orders["text"]
    for k in orders["text"]:
        np.testing.assert_array_equal(utt[k], spk[u2s[k]])
    one = orders["spk2utt"][0]
    p = run(conv + ["--utt-embed-path", out / "xvector.scp", "--spk-embed-path", out / "spk_xvector.scp",
                    "--spk-id", one])
    assert p.returncode == 0, p.stderr
    utt = kaldiio.load_scp(str(out / "xvector.scp"))
    assert all(np.array_equal(utt[k], spk[one]) for k in orders["text"])
    p = run(conv + ["--utt-embed-path", out / "xvector.scp", "--spk-embed-path", out / "spk_xvector.scp",
                    "--spk-id", "nobody"])
    assert p.returncode == 2 and "'nobody'" in p.stderr and "Traceback" not in p.stderr


def test_check_spk_embed_scp_reports_a_shuffled_scp_and_fix_repairs_it(recipe, inprocess_run, tmp_path):
    r, orders, _ = recipe
    dump = tmp_path / "dump"
    (dump / "raw" / "tr").mkdir(parents=True)
    shutil.copy(r / "data/tr/text", dump / "raw" / "tr" / "text")
    scp_dir = dump / "xvector" / "tr"
    scp_dir.mkdir(parents=True)
    lines = (inprocess_run[0] / "xvector.scp").read_text().splitlines()
    shuffled = sorted(lines, key=lambda ln: ln[::-1]) + ["extra_utt dump/xvector/tr/xvector.ark:9"]
    (scp_dir / "xvector.scp").write_text("\n".join(shuffled) + "\n")
    check = [sys.executable, "-m", "spk_toolkit.bin.check_spk_embed_scp", dump, "xvector"]
    p = run(check)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "extra   1" in p.stdout and "'extra_utt'" in p.stdout and "out of order" in p.stdout
    assert (scp_dir / "xvector.scp").read_text().splitlines() == shuffled  # a report changes nothing
    p = run(check + ["--fix"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "fixed" in p.stdout
    assert (scp_dir / "xvector.scp").read_text().splitlines() == lines  # text order, values untouched
    assert (scp_dir / "xvector.scp.orig").read_text().splitlines() == shuffled
    assert run(check).returncode == 0
    # a missing utterance cannot be fixed here: reported, exit 1
    (scp_dir / "xvector.scp").write_text("\n".join(lines[1:]) + "\n")
    p = run(check + ["--fix"])
    assert p.returncode == 1 and "missing 1" in p.stdout and orders["text"][0] in p.stdout
