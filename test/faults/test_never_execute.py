"""Contract 1 of docs/bad_input.md, never execute: no input of any command runs a program.

A Kaldi scp entry that Kaldi or kaldiio would run through a shell (``cmd |``, ``| cmd``, ``cmd |:12`` whose ark part
ends in ``|``) or read from standard input (``-``) is refused by the one scp reader (:mod:`spk_toolkit.io.scp`) with
``file:line``, for every reader and every command that takes an scp of arrays; the command itself never runs (it
would create a marker file). Model packages never write outside their directory; configs are loaded safely.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from faults_helpers import cli_in_process as _cli

from spk_toolkit.bin.cli import EXIT_USAGE

FORMS = {
    "pipe": "touch {m} |",
    "pipe_no_space": "touch {m}|",
    "output_pipe": "| touch {m}",
    "pipe_then_offset": "touch {m} |:12",
    "pipe_then_range": "touch {m} |:12[0:1]",
    "stdin": "-",
}




def _scp_with(tmp_path: Path, form: str, name: str = "emb.scp") -> tuple:
    """A good kaldi_ark scp of 3 embeddings (keys u1..u3, speakers s1, s1, s2) whose line 2 is a command entry."""
    import kaldiio

    marker = tmp_path / "RAN"
    ark = tmp_path / "emb.ark"
    rng = np.random.default_rng(0)
    with kaldiio.WriteHelper(f"ark,scp:{ark},{tmp_path / 'good.scp'}") as w:
        for u in ("u1", "u2", "u3"):
            w(u, rng.standard_normal(8).astype(np.float32))
    lines = (tmp_path / "good.scp").read_text().splitlines()
    lines[1] = "u2 " + FORMS[form].format(m=marker)
    scp = tmp_path / name
    scp.write_text("\n".join(lines) + "\n")
    return scp, marker


def _assert_refused(msg: str, scp: Path, marker: Path) -> None:
    assert not marker.exists(), "the command in the scp was run"
    assert f"{scp.name}:2" in msg and "'u2'" in msg, msg


# ----------------------------------------------------------------------------------------- the readers (API)
def _read_scp_entries(scp, tmp_path):
    from spk_toolkit.io.scp import read_scp_entries
    read_scp_entries(scp)


def _load_embeddings(scp, tmp_path):
    import spk_toolkit
    spk_toolkit.load_embeddings(scp)


def _open_reader(scp, tmp_path):
    from spk_toolkit.io.storage import open_reader
    with open_reader(scp) as r:
        [r[k] for k in r]


def _check_scp_order(scp, tmp_path):
    from spk_toolkit.tts import check_scp_order
    (tmp_path / "text").write_text("u1 a\nu2 b\nu3 c\n")
    check_scp_order(scp, tmp_path / "text", fix=True)


def _convert_to_average(scp, tmp_path):
    from spk_toolkit.tts import convert_to_average
    (tmp_path / "utt2spk").write_text("u1 s1\nu2 s1\nu3 s2\n")
    convert_to_average(tmp_path / "good.scp", scp, utt2spk=tmp_path / "utt2spk")


def _prepare_from_cache(scp, tmp_path):
    from spk_toolkit.recipes.espnet_spk import prepare_from_cache
    scp.rename(tmp_path / "fbank.scp")
    try:
        prepare_from_cache(tmp_path / "dump", tmp_path, name="fbank")
    finally:
        (tmp_path / "fbank.scp").rename(scp)


READERS = {f.__name__[1:]: f for f in (_read_scp_entries, _load_embeddings, _open_reader, _check_scp_order,
                                       _convert_to_average, _prepare_from_cache)}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_scp_reader_refuses_a_command_entry_and_never_runs_it(tmp_path, reader, form):
    from spk_toolkit.io.datadir import CorpusError

    scp, marker = _scp_with(tmp_path, form)
    with pytest.raises(CorpusError) as e:
        READERS[reader](scp, tmp_path)
    _assert_refused(str(e.value), scp if reader != "prepare_from_cache" else tmp_path / "fbank.scp", marker)
    assert "never run as a command" in str(e.value)


def test_load_scp_array_never_reaches_a_shell(tmp_path):
    """The loader itself refuses a command value (a caller that skipped the reader still cannot run one)."""
    from spk_toolkit.io.datadir import CorpusError
    from spk_toolkit.io.scp import load_scp_array

    marker = tmp_path / "RAN"
    for form in FORMS.values():
        with pytest.raises(CorpusError, match="never run as a command"):
            load_scp_array(form.format(m=marker))
    assert not marker.exists()


def test_file_entries_still_read_with_offsets_ranges_and_relative_arks(tmp_path):
    """What the reader accepts is every file form kaldiio reads: ``ark:offset``, ``[rows,cols]`` inclusive ranges,
    a relative ark resolved against the scp's directory (and its parents)."""
    import kaldiio

    from spk_toolkit.io.storage import open_reader

    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    (tmp_path / "d").mkdir()
    with kaldiio.WriteHelper(f"ark,scp:{tmp_path / 'd' / 'f.ark'},{tmp_path / 'd' / 'f.scp'}") as w:
        w("m", m)
    value = (tmp_path / "d" / "f.scp").read_text().split(maxsplit=1)[1].strip()
    offset = value.rsplit(":", 1)[1]
    (tmp_path / "d" / "r.scp").write_text(f"whole d/f.ark:{offset}\nrows d/f.ark:{offset}[1:2]\n"
                                          f"cols d/f.ark:{offset}[,0:1]\nboth d/f.ark:{offset}[2:3,2:2]\n")
    with open_reader(tmp_path / "d" / "r.scp") as r:
        np.testing.assert_array_equal(r["whole"], m)
        np.testing.assert_array_equal(r["rows"], m[1:3])
        np.testing.assert_array_equal(r["cols"], m[:, 0:2])
        np.testing.assert_array_equal(r["both"], m[2:4, 2:3])
        assert r["rows"].flags.writeable


# ---------------------------------------------------------------------------------------------- the commands
def _spk_score_args(tmp_path, scp, option):
    good = tmp_path / "good.scp"
    (tmp_path / "trials").write_text("1 u1 u2\n0 u1 u3\n")
    emb = {"--embeddings": scp, "--cohort": good, "--mean_embeddings": good}
    emb[option] = scp
    argv = ["--trials", tmp_path / "trials", "--output_dir", tmp_path / "scores"]
    for opt, path in emb.items():
        if opt == "--embeddings" or opt == option:
            argv += [opt, path]
    return argv


COMMANDS = ["spk_score --embeddings", "spk_score --cohort", "spk_score --mean_embeddings",
            "check_spk_embed_scp", "convert_to_avg_spk_embed --utt-embed-path",
            "convert_to_avg_spk_embed --spk-embed-path"]


@pytest.mark.parametrize("form", ["pipe", "pipe_then_offset", "stdin"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_command_entry_exit_2_one_line(tmp_path, command, form):
    from spk_toolkit.bin import check_spk_embed_scp, convert_to_avg_spk_embed, spk_score

    scp, marker = _scp_with(tmp_path, form)
    good = tmp_path / "good.scp"
    prog, _, option = command.partition(" ")
    if prog == "spk_score":
        argv = _spk_score_args(tmp_path, scp, option)
        if option != "--embeddings":
            argv[argv.index("--embeddings") + 1] = good
        if option == "--cohort":
            argv += ["--asnorm_top_n", "2"]
        rc, err = _cli(spk_score.main, argv)
    elif prog == "check_spk_embed_scp":
        (tmp_path / "text").write_text("u1 a\nu2 b\nu3 c\n")
        rc, err = _cli(check_spk_embed_scp.main, [scp, "xvector", "--text", tmp_path / "text", "--fix"])
    else:
        (tmp_path / "utt2spk").write_text("u1 s1\nu2 s1\nu3 s2\n")
        utt, spk = (scp, good) if option == "--utt-embed-path" else (good, scp)
        rc, err = _cli(convert_to_avg_spk_embed.main,
                       ["--utt-embed-path", utt, "--spk-embed-path", spk, "--utt2spk", tmp_path / "utt2spk"])
    assert rc == EXIT_USAGE, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    _assert_refused(lines[0], scp, marker)
    assert not (tmp_path / "scores").exists(), "a refused run left its output directory (run.log) behind"
    assert not (tmp_path / "emb.scp.orig").exists()


# ------------------------------------------------------------------------------------------- model packages
def _zip_with(path: Path, name: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/config.yaml", "a: 1\n")
        z.writestr(name, "x")
    return path


def _tar_with(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as t:
        data = b"a: 1\n"
        info = tarfile.TarInfo("model/config.yaml")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        t.addfile(member, io.BytesIO(b"x") if member.isfile() else None)
    return path


def _tar_member(name, kind="file", target=""):
    m = tarfile.TarInfo(name)
    if kind == "file":
        m.size = 1
    else:
        m.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
        m.linkname = target
    return m


PACKAGES = {
    "zip_dotdot": lambda p: _zip_with(p / "m.zip", "../../outside.txt"),
    "zip_absolute": lambda p: _zip_with(p / "m.zip", "/tmp/outside.txt"),
    "tar_dotdot": lambda p: _tar_with(p / "m.tar.gz", _tar_member("../outside.txt")),
    "tar_absolute": lambda p: _tar_with(p / "m.tar.gz", _tar_member("/tmp/outside.txt")),
    "tar_symlink_out": lambda p: _tar_with(p / "m.tar.gz", _tar_member("model/link", "symlink", "/etc/passwd")),
    "tar_hardlink_out": lambda p: _tar_with(p / "m.tar.gz", _tar_member("model/link", "hardlink", "/etc/passwd")),
    "tar_fifo": lambda p: _tar_with(p / "m.tar.gz", _tar_member("model/fifo", "fifo")),
}


@pytest.mark.parametrize("case", sorted(PACKAGES))
def test_a_model_package_never_writes_outside_its_directory(tmp_path, monkeypatch, case):
    from spk_toolkit.models import cache_dir, unpack_model

    monkeypatch.setenv("SPK_TOOLKIT_CACHE", str(tmp_path / "cache"))
    archive = PACKAGES[case](tmp_path)
    with pytest.raises(ValueError, match=archive.name):
        unpack_model(archive)
    assert not (tmp_path / "outside.txt").exists() and not Path("/tmp/outside.txt").exists()
    assert not list(Path(cache_dir()).glob("m-*")), "a partial model directory was left"


def test_configs_are_loaded_safely_a_python_tag_is_refused(tmp_path):
    """A YAML ``!!python/object/apply`` tag (code execution under ``yaml.load``) is an error, never run."""
    from spk_toolkit.bin import spk_inference

    marker = tmp_path / "RAN"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"batch_size: !!python/object/apply:os.system ['touch {marker}']\n")
    rc, err = _cli(spk_inference.main, ["--config", cfg, "--data_dir", tmp_path, "--output_dir", tmp_path / "o"])
    assert rc == EXIT_USAGE, err
    assert not marker.exists()
    assert "c.yaml" in err and "Traceback" not in err, err
