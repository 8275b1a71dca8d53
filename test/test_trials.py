"""Trial list parsing, format detection, key normalisation and missing-key reports."""
import numpy as np
import pytest

from spk_toolkit.io.trials import MissingKeysError, Trials, detect_format, read_trials, resolve_keys, write_scores

ENR = ["id10270/x6uYqmx31kE/00001", "id10270/x6uYqmx31kE/00001", "id10300/abc/00002", "id10300/abc/00003"]
TST = ["id10270/8jEAjG6SegY/00008", "id10300/abc/00002", "id10300/abc/00003", "id10270/8jEAjG6SegY/00008"]
LAB = [1, 0, 1, 0]


def write_all_formats(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "vox.txt").write_text("".join(f"{l} {e}.wav {t}.wav\n" for l, e, t in zip(LAB, ENR, TST)))
    (d / "kaldi.txt").write_text(
        "".join(f"{e} {t} {'target' if l else 'nontarget'}\n" for l, e, t in zip(LAB, ENR, TST))
    )
    (d / "kaldi01.txt").write_text("".join(f"{e} {t} {l}\n" for l, e, t in zip(LAB, ENR, TST)))
    (d / "pairs.txt").write_text("".join(f"{e} {t}\n" for e, t in zip(ENR, TST)))
    esp = d / "espnet"
    esp.mkdir()
    (esp / "trial.scp").write_text("".join(f"{e}*{t} /wav/{e}.wav\n" for e, t in zip(ENR, TST)))
    (esp / "trial2.scp").write_text("".join(f"{e}*{t} /wav/{t}.wav\n" for e, t in zip(ENR, TST)))
    (esp / "trial_label").write_text("".join(f"{e}*{t} {l}\n" for l, e, t in zip(LAB, ENR, TST)))
    return {
        "voxceleb": d / "vox.txt",
        "kaldi": d / "kaldi.txt",
        "kaldi01": d / "kaldi01.txt",
        "unlabelled": d / "pairs.txt",
        "espnet": esp,
    }


@pytest.fixture
def files(tmp_path):
    return write_all_formats(tmp_path / "t")


@pytest.mark.parametrize("name", ["voxceleb", "kaldi", "kaldi01", "espnet", "unlabelled"])
def test_each_format_parses(files, name):
    t = read_trials(str(files[name]))
    assert t.fmt == ("kaldi" if name == "kaldi01" else name)
    keys = [ENR, TST]
    if name == "voxceleb":
        keys = [[k + ".wav" for k in ENR], [k + ".wav" for k in TST]]
    assert t.enroll.tolist() == keys[0] and t.test.tolist() == keys[1]
    if name == "unlabelled":
        assert t.labels is None
    else:
        assert t.labels.tolist() == LAB


def test_espnet_from_any_of_its_files(files):
    for f in ("trial.scp", "trial2.scp", "trial_label"):
        t = read_trials(str(files["espnet"] / f))
        assert t.fmt == "espnet" and t.labels.tolist() == LAB and t.enroll.tolist() == ENR


def test_override_format(tmp_path):
    # keys that are themselves "0"/"1" make detection ambiguous; the override decides
    p = tmp_path / "amb.txt"
    p.write_text("1 0 1\n0 1 0\n")
    with pytest.raises(ValueError, match="pass fmt / --trials_format explicitly"):
        read_trials(str(p))
    v = read_trials(str(p), fmt="voxceleb")
    k = read_trials(str(p), fmt="kaldi")
    assert v.labels.tolist() == [1, 0] and v.enroll.tolist() == ["0", "1"]
    assert k.labels.tolist() == [1, 0] and k.enroll.tolist() == ["1", "0"]


def test_wrong_override_fails_with_line(files):
    with pytest.raises(ValueError, match=r"row 1: label 'id10270/8jEAjG6SegY/00008.wav' is not one of"):
        read_trials(str(files["voxceleb"]), fmt="kaldi")
    with pytest.raises(ValueError, match=r"expects 2 columns, got 3"):
        read_trials(str(files["kaldi"]), fmt="unlabelled")
    with pytest.raises(ValueError, match="fmt must be"):
        read_trials(str(files["kaldi"]), fmt="nist")


def test_detect_format_errors(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("a b c d\n")
    with pytest.raises(ValueError, match=r"\[4\] columns"):
        detect_format(str(p))
    p.write_text("a b c\n")
    with pytest.raises(ValueError, match="neither the first column"):
        detect_format(str(p))
    with pytest.raises(FileNotFoundError):
        read_trials(str(tmp_path / "nope.txt"))


def test_key_normalisation_extension_and_root(tmp_path):
    avail = sorted(set(ENR + TST))
    (tmp_path / "r.txt").write_text(
        "".join(f"{l} /data/vox1/wav/{e}.wav /data/vox1/wav/{t}.wav\n" for l, e, t in zip(LAB, ENR, TST))
    )
    t = read_trials(str(tmp_path / "r.txt"))
    res = resolve_keys(t, avail)
    assert [avail[i] for i in res.enroll_idx] == ENR and [avail[i] for i in res.test_idx] == TST
    assert any("'/data/vox1/wav/' (inferred)" in n for n in res.notes)
    res2 = resolve_keys(t, avail, root="/data/vox1/wav/")
    assert (res2.enroll_idx == res.enroll_idx).all() and any("(given)" in n for n in res2.notes)


def test_missing_keys_count_and_examples(files):
    avail = sorted(set(ENR + TST))
    t = read_trials(str(files["kaldi"]))
    # drop 3 utterances from the embedding keys
    gone = ["id10270/8jEAjG6SegY/00008", "id10300/abc/00002", "id10300/abc/00003"]
    with pytest.raises(MissingKeysError, match=r"^3 of 4 utterances .* have no embedding \(4 of 4 trials affected\), e\.g\. \['id10270/8jEAjG6SegY/00008', 'id10300/abc/00002', 'id10300/abc/00003'\]") as ei:
        resolve_keys(t, [k for k in avail if k not in gone])
    assert ei.value.missing == gone
    assert isinstance(ei.value, ValueError) and not isinstance(ei.value, KeyError)
    res = resolve_keys(t, [k for k in avail if k != "id10300/abc/00003"], on_missing="drop")
    assert res.kept.tolist() == [True, True, False, False]
    assert any("1 of 4 utterances" in n for n in res.notes)


def test_write_scores_round_trip(tmp_path, files):
    t = read_trials(str(files["kaldi"]))
    s = np.array([0.5, -0.25, 0.125, 1.0])
    write_scores(str(tmp_path / "k.score"), t, s)
    rows = [l.split() for l in (tmp_path / "k.score").read_text().splitlines()]
    assert rows[0] == [ENR[0], TST[0], "0.500000", "target"]
    back = read_trials(str(tmp_path / "k.score").replace(".score", ".score"), fmt="unlabelled") if False else None
    write_scores(str(tmp_path / "e.score"), t, s, style="espnet")
    assert (tmp_path / "e.score").read_text().splitlines()[1] == f"{ENR[1]}*{TST[1]} -0.250000 0"
    with pytest.raises(ValueError, match="does not match 4 trials"):
        write_scores(str(tmp_path / "x"), t, s[:3])


def test_trials_validation():
    with pytest.raises(ValueError, match="equal length"):
        Trials(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="labels length 1 differs"):
        Trials(["a", "b"], ["b", "c"], [1])
