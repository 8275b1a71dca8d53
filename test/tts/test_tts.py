"""Unit tests of spk_toolkit.tts and the TTS CLIs' helpers (issue 15), and its exports as outputs of the engine run."""
from __future__ import annotations

import os

import numpy as np
import pytest

from spk_toolkit.io.datadir import CorpusError
from spk_toolkit.tts import (TTSCorpus, check_scp_order, check_tag, convert_to_average, load_tts_corpus, pt_path,
                             read_espnet3_xvector_config, resolve_interpolations)


def test_interpolations_resolve_like_omegaconf(monkeypatch):
    monkeypatch.setenv("SPK_X", "/scratch")
    cfg = {"data_dir": "/d", "n": 3, "a": {"b": "${data_dir}/x"},
           "xvector": {"save_path": "${a.b}/y", "k": "${n}", "e": "${oc.env:SPK_X}/z", "f": "${oc.env:NOPE_X,dflt}"}}
    out = resolve_interpolations(cfg)["xvector"]
    assert out == {"save_path": "/d/x/y", "k": 3, "e": "/scratch/z", "f": "dflt"}
    with pytest.raises(ValueError, match=r"\$\{missing\}"):
        resolve_interpolations({"a": "${missing}"})
    with pytest.raises(ValueError, match="cycle"):
        resolve_interpolations({"a": "${b}", "b": "${a}"})


def test_xvector_block_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data_dir: /d\nxvector:\n  save_path: ${data_dir}/xv\n  manifest_paths: {train: /m/t.tsv}\n")
    xc = read_espnet3_xvector_config(p)
    assert (xc.toolkit, xc.spk_embed_tag, xc.splits, xc.save_path) == ("espnet", "xvector", ["train"], "/d/xv")
    assert str(xc.split_dir("train")) == "/d/xv/xvector/train"
    assert str(xc.run_dir("train")) == "/d/xv/spk_toolkit/xvector/train"
    p.write_text("xvector:\n  save_path: /x\n  manifest_paths: {train: t.tsv}\n  splits: [train, dev]\n")
    with pytest.raises(ValueError, match="'dev' has no entry"):
        read_espnet3_xvector_config(p)
    p.write_text("model: {}\n")
    with pytest.raises(ValueError, match="no 'xvector:' block"):
        read_espnet3_xvector_config(p)


def test_pt_path_follows_espnet3_and_refuses_escapes(tmp_path):
    assert pt_path(tmp_path, "spk/utt1") == tmp_path / "spk" / "utt1.pt"
    for bad in ("../x", "/abs", "a//b", "a/./b"):
        with pytest.raises(ValueError, match="cannot be a file name"):
            pt_path(tmp_path, bad)
    for bad in ("", "a/b", "x y", ".hidden"):
        with pytest.raises(ValueError):
            check_tag(bad)


def _data(tmp_path, text=True):
    d = tmp_path / "d"
    d.mkdir(exist_ok=True)
    (d / "wav.scp").write_text("u1 /a/1.wav\nu2 /a/2.wav\nu3 /a/3.wav\n")
    (d / "utt2spk").write_text("u1 s1\nu2 s2\nu3 s1\n")
    (d / "spk2utt").write_text("s2 u2\ns1 u3 u1\n")
    if text:
        (d / "text").write_text("u3 c\nu1 a\n")
    return d


def test_corpus_follows_text_and_spk2utt(tmp_path):
    c = load_tts_corpus(_data(tmp_path))
    assert isinstance(c, TTSCorpus) and c.order_from == "text"
    assert c.keys == ["u3", "u1"] and [u.utt_id for u in c.utts] == ["u3", "u1"]
    assert c.spk2utt == {"s1": ["u3", "u1"]}  # u2 is not in text: not embedded, in no mean
    d = _data(tmp_path)
    (d / "text").write_text("u3 c\nu9 z\n")
    with pytest.raises(CorpusError, match="u9"):
        load_tts_corpus(d)
    (d / "text").write_text("u3 c\nu3 d\n")
    with pytest.raises(CorpusError, match="appears twice"):
        load_tts_corpus(d)
    (d / "text").unlink()
    assert load_tts_corpus(d).keys == ["u1", "u2", "u3"]  # wav.scp order without text
    (d / "spk2utt").write_text("s2 u2 u1\ns1 u3\n")
    with pytest.raises(CorpusError, match="spk2utt puts 'u1' under 's2', utt2spk under 's1'"):
        load_tts_corpus(d)


def test_check_scp_order_reports_and_fixes(tmp_path):
    text = tmp_path / "text"
    text.write_text("a x\nb y\nc z\n")
    scp = tmp_path / "e.scp"
    scp.write_text("b e.ark:2\nz e.ark:9\na e.ark:1\nc e.ark:3\n")
    rep = check_scp_order(scp, text)
    assert not rep.ok and rep.extra == ["z"] and rep.missing == [] and rep.out_of_order == 2
    assert rep.first_mismatch == (1, "a", "b")
    rep = check_scp_order(scp, text, fix=True)
    assert rep.fixed and scp.read_text() == "a e.ark:1\nb e.ark:2\nc e.ark:3\n"
    assert check_scp_order(scp, text).ok


def test_convert_to_average_errors_name_what_is_missing(tmp_path):
    utt, spk, u2s = tmp_path / "x.scp", tmp_path / "spk_x.scp", tmp_path / "utt2spk"
    utt.write_text("u1 x.ark:1\nu2 x.ark:2\n")
    spk.write_text("s1 spk_x.ark:1\n")
    u2s.write_text("u1 s1\nu2 s2\n")
    with pytest.raises(ValueError, match="1 speaker.*'s2'"):
        convert_to_average(utt, spk, utt2spk=u2s)
    assert utt.read_text() == "u1 x.ark:1\nu2 x.ark:2\n"  # untouched
    with pytest.raises(ValueError, match="exactly one"):
        convert_to_average(utt, spk)
    bak, n = convert_to_average(utt, spk, spk_id="s1")
    assert n == 2 and bak == tmp_path / "x.scp.bak" and utt.read_text() == "u1 spk_x.ark:1\nu2 spk_x.ark:1\n"


def test_device_rule_and_model_arguments(monkeypatch, tmp_path):
    import torch

    from spk_toolkit.bin.extract_spk_embed import model_arguments, resolve_device, take_espnet3_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("cuda:1") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    pth = tmp_path / "m.pth"
    pth.write_bytes(b"")
    assert model_arguments("espnet", str(pth), "cpu") == {"device": "cpu", "model_file": str(pth),
                                                           "train_config": None}
    assert model_arguments("speechbrain", "speechbrain/spkrec-ecapa-voxceleb", "cpu")["source"].startswith("speech")
    with pytest.raises(ValueError, match="shipped weights"):
        model_arguments("resemblyzer", "x", "cpu")
    cfg = tmp_path / "training_config.yaml"
    cfg.write_text("xvector: {save_path: /x, manifest_paths: {a: b}}\n")
    assert take_espnet3_config(["--config", str(cfg), "-v"]) == (str(cfg), ["-v"])
    other = tmp_path / "o.yaml"
    other.write_text("batch_bins: 3\n")
    assert take_espnet3_config([f"--config={other}"]) == (None, [f"--config={other}"])


def test_relative_scp_entries_resolve_against_the_scp_and_its_parents(tmp_path, monkeypatch):
    from spk_toolkit.io.storage import KaldiArkWriter, open_reader

    recipe = tmp_path / "recipe"
    out = recipe / "dump" / "xvector" / "tr"
    with KaldiArkWriter(out, "xvector") as w:
        w.write("u1", np.arange(3, dtype=np.float32))
    scp = out / "xvector.scp"
    off = scp.read_text().split()[1].rsplit(":", 1)[1]
    scp.write_text(f"u1 dump/xvector/tr/xvector.ark:{off}\n")  # as ESPnet writes it from the recipe directory
    monkeypatch.chdir(tmp_path)  # not the recipe directory
    np.testing.assert_array_equal(open_reader(scp)["u1"], np.arange(3, dtype=np.float32))
    scp.write_text(f"u1 xvector.ark:{off}\n")  # relative to the scp itself
    np.testing.assert_array_equal(open_reader(os.path.relpath(scp))["u1"], np.arange(3, dtype=np.float32))


def test_text_keys_read_through_the_one_input_reader(tmp_path):
    """A BOM and CRLF in ``text`` (Windows editors) do not become part of the first utterance id."""
    from spk_toolkit.tts import read_keys

    p = tmp_path / "text"
    p.write_bytes("\ufeffu1 hello\r\n\r\nu2 world\r\n".encode("utf-8"))
    assert read_keys(p) == ["u1", "u2"]


def test_scp_entries_one_reader_bom_crlf_and_duplicates(tmp_path):
    from spk_toolkit.io.datadir import CorpusError
    from spk_toolkit.tts import read_scp_entries

    p = tmp_path / "x.scp"
    p.write_bytes("\ufeffa /d/x.ark:12\r\nb /d/x.ark:40\r\n".encode("utf-8"))
    assert read_scp_entries(p) == [("a", "/d/x.ark:12"), ("b", "/d/x.ark:40")]
    p.write_text("a /d/x.ark:12\na /d/x.ark:40\n")
    with pytest.raises(CorpusError, match=r"x.scp:2: key 'a' appears twice"):
        read_scp_entries(p)


# -------------------------------------------------------------------------- the exports are the run's outputs
def _tts_run_dir(tmp_path):
    """A TTS data dir of 6 synthetic utterances (3 speakers) and a stand-in backend (mean, std, seconds)."""
    import torch

    from spk_toolkit.backends.base import EmbeddingModel
    from spk_toolkit.io.datadir import Utterance
    from spk_toolkit.testing import speechlike, write_wav
    from tts_helpers import write_tts_dir

    class Stats(EmbeddingModel):
        name = "test-tts-stats"
        sample_rate = 16000
        embed_dim = 3

        def embed(self, wav, lengths):
            out = torch.zeros(len(wav), 3, dtype=torch.float64)
            for i in range(len(wav)):
                x = wav[i, : int(lengths[i])].double()
                out[i] = torch.stack([x.mean(), x.std(), torch.tensor(len(x) / 16000.0, dtype=torch.float64)])
            return out.float()

    (tmp_path / "wav").mkdir(exist_ok=True)
    utts = [Utterance(f"u{k}", str(write_wav(tmp_path / "wav" / f"u{k}.wav", speechlike(0.4 + 0.1 * k, seed=k))),
                      spk_id=f"s{k % 3}") for k in range(6)]
    order = write_tts_dir(utts, tmp_path / "data")
    return tmp_path / "data", Stats(), order


def test_tts_exports_are_named_in_the_summary_written_under_the_one_lock(tmp_path, monkeypatch):
    """extract_tts_embeddings: the engine's driver takes the output directory's lock once and writes the four
    ESPnet files under it; summary.json names them (readable through open_reader), a rerun resumes and rewrites
    them identically, and --overwrite with another tag removes the previous tag's files."""
    import json

    import spk_toolkit.engine.driver as driver
    import spk_toolkit.io.lock as lock_module
    from spk_toolkit.io.storage import open_reader
    from spk_toolkit.tts import extract_tts_embeddings

    data, model, order = _tts_run_dir(tmp_path)
    locks = []
    real_lock = lock_module.output_dir_lock
    counting = lambda *a, **k: locks.append(a[0]) or real_lock(*a, **k)  # noqa: E731
    for module in (driver, lock_module):  # whoever takes the lock, the driver or a tool
        monkeypatch.setattr(module, "output_dir_lock", counting)
    out = tmp_path / "xv"
    s = extract_tts_embeddings(data, out, "xv", toolkit=model.name, model=model, progress=False)
    assert len(locks) == 1
    outputs = json.loads((out / "summary.json").read_text())["outputs"]
    assert {k: os.path.basename(v) for k, v in outputs.items() if k.startswith("tts_")} == {
        "tts_utt_scp": "xv.scp", "tts_utt_ark": "xv.ark", "tts_spk_scp": "spk_xv.scp", "tts_spk_ark": "spk_xv.ark"}
    assert s["tts"]["utt_scp"] == outputs["tts_utt_scp"]
    with open_reader(out / "embeddings.npz") as emb, open_reader(outputs["tts_utt_scp"]) as scp:
        assert list(scp) == order["text"]
        for k in scp:
            np.testing.assert_array_equal(scp[k], emb[k])
    with open_reader(outputs["tts_spk_scp"]) as spk:
        assert list(spk) == order["spk2utt"]
    before = (out / "xv.ark").read_bytes()
    s2 = extract_tts_embeddings(data, out, "xv", toolkit=model.name, model=model, progress=False)
    assert len(locks) == 2 and s2["shards_resumed"] == s2["shards"] and (out / "xv.ark").read_bytes() == before
    extract_tts_embeddings(data, out, "other", toolkit=model.name, model=model, progress=False, overwrite=True)
    assert not any((out / n).exists() for n in ("xv.scp", "xv.ark", "spk_xv.scp", "spk_xv.ark"))
    assert (out / "other.scp").is_file() and (out / "spk_other.scp").is_file()
