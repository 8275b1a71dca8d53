"""End-to-end tests of ``python -m spk_toolkit.bin.spk_score`` on synthetic embeddings."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spk_toolkit import metrics as M
from spk_toolkit.bin.spk_score import main

N_SPK, PER_SPK, D = 12, 6, 24


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((N_SPK, D))
    emb = {}
    for s in range(N_SPK):
        for u in range(PER_SPK):
            emb[f"id{s:05d}/vid/{u:05d}"] = (centres[s] + 0.8 * rng.standard_normal(D)).astype(np.float32)
    keys = sorted(emb)
    np.savez_compressed(d / "emb.npz", **emb)
    # ESPnet-style npz: (n_crops, D) values whose mean is the embedding
    crops = {k: np.stack([v + 0.1, v - 0.1]).astype(np.float32) for k, v in emb.items()}
    np.savez(d / "espnet_emb.npz", **crops)
    # Kaldi ark/scp (WeSpeaker / 3D-Speaker)
    import kaldiio

    with kaldiio.WriteHelper(f"ark,scp:{d}/xvector.ark,{d}/xvector.scp") as w:
        for k in keys:
            w(k, emb[k])
    cohort = {f"c{i}": rng.standard_normal(D).astype(np.float32) for i in range(40)}
    np.savez_compressed(d / "cohort.npz", **cohort)
    pairs = [(keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys)) if (i * 7 + j) % 5 == 0]
    lab = [int(a.split("/")[0] == b.split("/")[0]) for a, b in pairs]
    (d / "veri.txt").write_text("".join(f"{l} {a}.wav {b}.wav\n" for l, (a, b) in zip(lab, pairs)))
    (d / "kaldi_trials").write_text(
        "".join(f"{a} {b} {'target' if l else 'nontarget'}\n" for l, (a, b) in zip(lab, pairs))
    )
    return d, emb, cohort, pairs, np.array(lab)


def _cos(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_cli_outputs_and_metrics(problem, capsys):
    d, emb, _, pairs, lab = problem
    out = d / "out"
    rc = main(["--embeddings", str(d / "emb.npz"), "--trials", str(d / "veri.txt"), "--output_dir", str(out),
               "--cllr"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "EER %" in printed and "minDCF 0.01" in printed and "minDCF 0.05" in printed and "Cllr" in printed
    assert "stripped the audio extension from 72 of 72 unique trial keys" in printed
    ref = np.array([_cos(emb[a], emb[b]) for a, b in pairs])
    rows = [l.split() for l in (out / "veri.score").read_text().splitlines()]
    assert len(rows) == len(pairs)
    assert np.max(np.abs(np.array([float(r[2]) for r in rows]) - ref)) < 1e-6
    assert [r[3] for r in rows] == ["target" if l else "nontarget" for l in lab]
    m = json.loads((out / "metrics.json").read_text())["trials"]["veri"]
    assert m["n_target"] == int(lab.sum()) and m["n_nontarget"] == int((1 - lab).sum())
    assert abs(m["eer"] - M.eer(ref, lab)) < 1e-6 and abs(m["eer_pct"] - 100 * m["eer"]) < 1e-12
    assert abs(m["min_dcf"]["0.05"] - M.min_dcf(ref, lab, 0.05)) < 1e-6
    assert abs(m["cllr"] - M.cllr(ref, lab)) < 1e-6


def test_det_plot_is_a_real_png(problem):
    from PIL import Image

    d, *_ = problem
    out = d / "out_png"
    assert main(["--embeddings", str(d / "emb.npz"), "--trials", str(d / "veri.txt"), "--output_dir", str(out)]) == 0
    for name in ("veri_det.png", "veri_hist.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        im = Image.open(out / name)
        im.load()
        assert im.size[0] > 300 and im.size[1] > 300
        assert np.asarray(im).std() > 10  # not a blank image
    info = Image.open(out / "veri_det.png").text
    m = json.loads((out / "metrics.json").read_text())["trials"]["veri"]
    assert "probit" in info["Description"]
    assert f"cosine={m['eer_pct']:.4f}%" in info["Description"]


@pytest.mark.parametrize("emb_file", ["emb.npz", "espnet_emb.npz", "xvector.scp", "xvector.ark"])
def test_embedding_formats_and_trial_formats_give_identical_scores(problem, emb_file):
    """Self-contained: `problem` writes the embeddings in every format compared here (npz, ESPnet crop npz,
    Kaldi scp/ark) and the trials in two formats; each run is checked against the cosine of the embeddings."""
    d, emb, _, pairs, lab = problem
    ref = np.array([_cos(emb[a], emb[b]) for a, b in pairs])
    words = ["target" if l else "nontarget" for l in lab]
    res = {}
    for tr, fmt, sfx in (("veri.txt", "auto", ".wav"), ("kaldi_trials", "kaldi", "")):
        out = d / f"o_{emb_file}_{fmt}"
        assert main(["--embeddings", str(d / emb_file), "--trials", str(d / tr), "--trials_format", fmt,
                     "--output_dir", str(out), "--no_plots"]) == 0
        name = os.path.splitext(tr)[0]
        rows = [l.split() for l in (out / f"{name}.score").read_text().splitlines()]
        assert [(r[0], r[1]) for r in rows] == [(a + sfx, b + sfx) for a, b in pairs]  # keys as in the list
        assert [r[3] for r in rows] == words
        res[fmt] = [r[2] for r in rows]
    assert res["auto"] == res["kaldi"]  # same score strings, whatever the trial format
    # crop means / ark float32 round trip give the same embeddings up to float32 rounding; 6 decimals in the file
    assert np.max(np.abs(np.array(res["auto"], float) - ref)) <= 2e-6


def test_asnorm_via_config(problem, capsys):
    d, emb, cohort, pairs, lab = problem
    cfg = d / "score.yaml"
    cfg.write_text(
        f"embeddings: {d / 'emb.npz'}\ntrials: [{d / 'veri.txt'}]\ncohort: {d / 'cohort.npz'}\n"
        f"asnorm_top_n: 10\noutput_dir: {d / 'asn'}\n"
    )
    assert main(["--config", str(cfg), "--no_plots"]) == 0
    assert main(["--config", str(cfg), "--no_plots", "--dtype", "float32", "--output_dir", str(d / "asn32")]) == 0
    s32 = np.array([float(l.split()[2]) for l in (d / "asn32" / "veri.score").read_text().splitlines()])
    printed = capsys.readouterr().out
    assert "asnorm(top_n=10)" in printed
    m = json.loads((d / "asn" / "metrics.json").read_text())
    assert m["normalisation"] == "asnorm(top_n=10)" and "cosine" in m["trials"]["veri"]
    # AS-norm from the per-trial definition
    C = np.stack([np.asarray(v, np.float64) for v in cohort.values()])

    def stats(x):
        cs = np.sort([_cos(x, c) for c in C])[::-1][:10]
        return cs.mean(), cs.std()

    ref = []
    for a, b in pairs:
        s = _cos(emb[a], emb[b])
        (me, se), (mt, st) = stats(emb[a]), stats(emb[b])
        ref.append(0.5 * ((s - me) / se + (s - mt) / st))
    got = np.array([float(l.split()[2]) for l in (d / "asn" / "veri.score").read_text().splitlines()])
    assert np.max(np.abs(got - np.array(ref))) < 1e-5  # 6 decimals in the score file
    assert np.max(np.abs(s32 - np.array(ref))) < 1e-4


def test_config_unknown_key_is_an_error(problem, capsys):
    d, *_ = problem
    cfg = d / "bad.yaml"
    cfg.write_text("embeddings: x.npz\nasnorm_topn: 3\n")
    with pytest.raises(SystemExit):
        main(["--config", str(cfg)])
    assert "asnorm_topn" in capsys.readouterr().err


def test_missing_keys_reported(problem, capsys):
    d, emb, *_ = problem
    keys = sorted(emb)
    part = {k: v for k, v in emb.items() if k not in keys[:3]}
    np.savez_compressed(d / "part.npz", **part)
    rc = main(["--embeddings", str(d / "part.npz"), "--trials", str(d / "veri.txt"), "--output_dir", str(d / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 of 72 utterances" in err and keys[0] in err


def test_module_entry_point(problem):
    d, *_ = problem
    r = subprocess.run(
        [sys.executable, "-m", "spk_toolkit.bin.spk_score", "--embeddings", str(d / "emb.npz"),
         "--trials", str(d / "kaldi_trials"), "--output_dir", str(d / "mod"), "--no_plots"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert r.returncode == 0, r.stderr
    assert "kaldi_trials" in r.stdout and (d / "mod" / "metrics.json").exists()


def test_missing_drop_and_espnet_trials(problem, capsys):
    d, emb, _, pairs, lab = problem
    keys = sorted(emb)
    part = {k: v for k, v in emb.items() if k != keys[0]}
    np.savez_compressed(d / "part1.npz", **part)
    esp = d / "esp"
    esp.mkdir(exist_ok=True)
    (esp / "trial.scp").write_text("".join(f"{a}*{b} /w/{a}.wav\n" for a, b in pairs))
    (esp / "trial2.scp").write_text("".join(f"{a}*{b} /w/{b}.wav\n" for a, b in pairs))
    (esp / "trial_label").write_text("".join(f"{a}*{b} {l}\n" for l, (a, b) in zip(lab, pairs)))
    out = d / "drop"
    assert main(["--embeddings", str(d / "part1.npz"), "--trials", str(esp), "--output_dir", str(out),
                 "--missing", "drop", "--score_style", "espnet", "--no_plots"]) == 0
    assert "dropped: 1 of 72 utterances" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())["trials"]["esp"]
    n_drop = sum(1 for a, b in pairs if keys[0] in (a, b))
    assert m["format"] == "espnet" and m["n_scored"] == len(pairs) - n_drop > 0
    keep = np.array([keys[0] not in (a, b) for a, b in pairs])
    assert m["n_target"] + m["n_nontarget"] == keep.sum() and m["n_target"] == lab[keep].sum()
    rows = (out / "esp.score").read_text().splitlines()
    assert len(rows) == keep.sum() and "nan" not in "".join(rows)
    first = pairs[int(np.argmax(keep))]
    assert rows[0].split()[0] == f"{first[0]}*{first[1]}" and rows[0].split()[2] in ("0", "1")
