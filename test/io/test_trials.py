"""Trial list parsing, format detection, key normalisation and missing-key reports."""
import numpy as np
import pytest

from spk_toolkit.io.trials import MissingKeysError, Trials, detect_format, read_trials, resolve_keys, write_scores

from trials_helpers import ENR, LAB, TST, write_all_formats  # noqa: F401


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
    with pytest.raises(ValueError, match=r"row 1 \(.*x.txt:1\) fits no trial format.*expects 3 columns, got 4"):
        detect_format(str(p))
    p.write_text("a b c\n")
    with pytest.raises(ValueError, match=r"row 1 .*fits no trial format.*label 'a' is not one of"):
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


def write_trial_list(trials, path, fmt, kaldi_labels="word"):
    """Write ``trials`` as a trial list of format ``fmt`` (``path``: a file, or a directory for espnet)."""
    e, t, lab = trials.enroll.tolist(), trials.test.tolist(), trials.labels
    if fmt == "voxceleb":
        path.write_text("".join(f"{int(l)} {a} {b}\n" for l, a, b in zip(lab, e, t)))
    elif fmt == "kaldi":
        word = {1: "target", 0: "nontarget"} if kaldi_labels == "word" else {1: "1", 0: "0"}
        path.write_text("".join(f"{a} {b} {word[int(l)]}\n" for l, a, b in zip(lab, e, t)))
    elif fmt == "espnet":
        path.mkdir(parents=True)
        (path / "trial.scp").write_text("".join(f"{a}*{b} /wav/{a}.wav\n" for a, b in zip(e, t)))
        (path / "trial2.scp").write_text("".join(f"{a}*{b} /wav/{b}.wav\n" for a, b in zip(e, t)))
        (path / "trial_label").write_text("".join(f"{a}*{b} {int(l)}\n" for l, a, b in zip(lab, e, t)))
    elif fmt == "unlabelled":
        path.write_text("".join(f"{a} {b}\n" for a, b in zip(e, t)))
    else:
        raise AssertionError(fmt)


def read_score_file(path, style):
    """Parse a score file written by write_scores: (enroll, test, scores, labels or None)."""
    rows = [l.split() for l in path.read_text().splitlines()]
    if style == "kaldi":
        enroll, test, scores = [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]
        lab = [r[3] for r in rows if len(r) == 4]
        assert set(lab) <= {"target", "nontarget"} and len(lab) in (0, len(rows))
        labels = [int(x == "target") for x in lab] if lab else None
    else:
        assert all(r[0].count("*") == 1 for r in rows)
        enroll, test = [r[0].split("*")[0] for r in rows], [r[0].split("*")[1] for r in rows]
        scores = [float(r[1]) for r in rows]
        lab = [r[2] for r in rows if len(r) == 3]
        assert set(lab) <= {"0", "1"} and len(lab) in (0, len(rows))
        labels = [int(x) for x in lab] if lab else None
    return enroll, test, np.array(scores), labels


# labelled trials whose enroll and test keys differ, with both label values and keys used on both sides
RT_ENR = ENR + ["spk_b/u2", "spk_a/u1"]
RT_TST = TST + ["spk_a/u1", "spk_b/u2"]
RT_LAB = [1, 0, 1, 0, 0, 1]


@pytest.mark.parametrize(
    "fmt,kaldi_labels",
    [("voxceleb", None), ("kaldi", "word"), ("kaldi", "01"), ("espnet", None), ("unlabelled", None)],
)
def test_trial_list_round_trip(tmp_path, fmt, kaldi_labels):
    src = Trials(RT_ENR, RT_TST, RT_LAB)
    path = tmp_path / ("esp" if fmt == "espnet" else f"{fmt}.txt")
    write_trial_list(src, path, fmt, kaldi_labels)
    # auto-detected and explicit format read back the same keys and labels; espnet from any of its files
    paths = [path] + ([path / f for f in ("trial.scp", "trial2.scp", "trial_label")] if fmt == "espnet" else [])
    for p in paths:
        for how in ("auto", fmt):
            back = read_trials(str(p), fmt=how)
            assert back.fmt == fmt, (p, how)
            assert back.enroll.tolist() == RT_ENR and back.test.tolist() == RT_TST, (p, how)
            if fmt == "unlabelled":
                assert back.labels is None
            else:
                assert back.labels.dtype == np.int8 and back.labels.tolist() == RT_LAB, (p, how)
            assert len(back) == len(RT_ENR) and back.path == str(p)


@pytest.mark.parametrize("style", ["kaldi", "espnet"])
@pytest.mark.parametrize("labelled", [True, False])
def test_write_scores_round_trip(tmp_path, style, labelled):
    t = Trials(RT_ENR, RT_TST, RT_LAB if labelled else None)
    s = np.array([0.5, -0.25, 0.125, 1.0, 1.0 / 3, -12.345678])
    write_scores(str(tmp_path / "x.score"), t, s, style=style)
    assert not (tmp_path / "x.score.tmp").exists()
    enroll, test, scores, labels = read_score_file(tmp_path / "x.score", style)
    assert enroll == RT_ENR and test == RT_TST
    assert labels == (RT_LAB if labelled else None)
    assert np.max(np.abs(scores - s)) <= 5e-7  # 6 decimals
    first = (tmp_path / "x.score").read_text().splitlines()[0]
    if style == "kaldi":
        assert first == f"{ENR[0]} {TST[0]} 0.500000" + (" target" if labelled else "")
    else:
        assert first == f"{ENR[0]}*{TST[0]} 0.500000" + (" 1" if labelled else "")
    if style == "kaldi" and labelled:
        # the kaldi score file minus its score column is a kaldi trial list that read_trials reads back
        rows = [l.split() for l in (tmp_path / "x.score").read_text().splitlines()]
        (tmp_path / "k.txt").write_text("".join(f"{r[0]} {r[1]} {r[3]}\n" for r in rows))
        back = read_trials(str(tmp_path / "k.txt"))
        assert back.fmt == "kaldi" and back.enroll.tolist() == RT_ENR and back.labels.tolist() == RT_LAB
    with pytest.raises(ValueError, match="does not match 6 trials"):
        write_scores(str(tmp_path / "y"), t, s[:3])
    with pytest.raises(ValueError, match="style must be"):
        write_scores(str(tmp_path / "y"), t, s, style="nist")


def test_trials_validation():
    with pytest.raises(ValueError, match="equal length"):
        Trials(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="labels length 1 differs"):
        Trials(["a", "b"], ["b", "c"], [1])
