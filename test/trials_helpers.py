"""Four trials in every trial-list format the reader accepts (shared by test/io/test_trials.py and
test/test_scoring.py)."""


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
