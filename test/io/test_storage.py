"""Storage registry (spk_toolkit.io.storage) and atomic commits (spk_toolkit.io.atomic)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spk_toolkit.io import atomic
from spk_toolkit.io.readers import load_embeddings
from spk_toolkit.io.storage import (
    FORMAT_ALIASES, READERS, WRITERS, Hdf5Reader, KaldiArkReader, NpyDirReader, NpzReader, NpzWriter, Reader,
    Writer, get_reader, get_writer, npz_member_name, open_reader, parse_formats, register_storage, storage_names,
)

FORMATS = ["npz", "kaldi_ark", "hdf5", "npy_dir"]
#: the storage libraries' own keyword names, which must be plain keys here
KEYWORDS = ["file", "allow_pickle", "name", "mode", "data", "shape", "dtype", "compression", "fix_imports",
            "kwds", "args", "track_order", "chunks", "index.txt", "arr_0"]
TRICKY = ["/x", "x/", "/", "//", "x//y", "a/b", "a/b/", ".", "..", "./a", "../b", "é", "日本語/話者", "%2F", "%",
          "a%2Fb", "x.npy", "y/.npy", "-", "~", "\x01", "ünï/cödé", "a:1", "a[1]", "|x|",
          "A", "a", "é" * 50, "日" * 33, "%" * 100]  # the last three: quoted names over 255 bytes (npy_dir)


def _leftovers(d: Path) -> list:
    return [p.name for p in Path(d).rglob("*") if atomic.is_temporary(p.name)]


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _assert_same(got: np.ndarray, want: np.ndarray, key: str = "") -> None:
    assert isinstance(got, np.ndarray), (key, type(got))
    assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape, want.dtype, want.shape)
    assert _bits(got) == _bits(want), key  # bit-exact (NaN payloads, -0.0)


def _write_all(fmt, out, items, stem="embeddings", **kw):
    with get_writer(fmt)(out, stem, fsync=False, **kw) as w:
        for k, v in items:
            w.write(k, v)
    return w


def _roundtrip(fmt, out, items, **kw):
    w = _write_all(fmt, out, items, **kw)
    assert w.n_written == len(items)
    with open_reader(w.path) as r:
        assert type(r) is READERS[fmt]
        assert list(r) == [k for k, _ in items] and len(r) == len(items)
        for k, v in items:
            assert k in r
            _assert_same(r[k], v, k)
    assert not _leftovers(out)
    return w


# ------------------------------------------------------------------------------------------------ property
_id_char = st.characters(codec="utf-8").filter(lambda c: not c.isspace() and c != "\0")
_segment = st.text(_id_char, min_size=0, max_size=6)
_ids = st.one_of(
    st.text(_id_char, min_size=1, max_size=12),
    st.lists(_segment, min_size=1, max_size=4).map("/".join).filter(bool),  # '/', leading/trailing '/', '//'
    st.sampled_from(KEYWORDS + TRICKY),
).filter(lambda k: len(k.encode("utf-8")) <= 100)
_dtypes = st.sampled_from([np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int32)])
_shapes = st.one_of(st.tuples(st.integers(0, 6)), st.tuples(st.integers(0, 4), st.integers(1, 3)))
_value = st.tuples(_dtypes, _shapes).flatmap(lambda ds: hnp.arrays(ds[0], ds[1]))
_items = st.lists(st.tuples(_ids, _value), max_size=8, unique_by=lambda kv: kv[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(items=_items)
def test_every_format_roundtrips_keys_order_values_and_dtypes(items):
    with tempfile.TemporaryDirectory() as d:
        for fmt in FORMATS:
            _roundtrip(fmt, Path(d) / fmt, items)
        # ESPnet reads our npz with plain np.load: same keys, same order, same arrays
        keys = {k for k, _ in items}
        with np.load(Path(d) / "npz" / "embeddings.npz", allow_pickle=False) as z:
            assert z.files == [k for k, _ in items]
            for k, v in items:
                shadowed = k.endswith(".npy") and k[:-4].endswith((".npy", "/")) and k[:-4] in keys
                if not shadowed:  # the one np.load ambiguity, see npz_member_name
                    _assert_same(z[k], v, k)


# ------------------------------------------------------------------------------------------------- targeted
@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_and_ranks_stored_as_given(fmt, tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for dt in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_,
               np.complex64, np.dtype(">f4"), np.dtype(">i8")):
        dt = np.dtype(dt)
        for shape in ((7,), (5, 3), (0,), (0, 4), (), (2, 3, 2)):
            v = (rng.standard_normal(shape) * 50).astype(dt)
            items.append((f"{dt.str}/{'x'.join(map(str, shape)) or 'scalar'}", v))
    items.append(("fortran", np.asfortranarray(rng.standard_normal((4, 3)).astype(np.float32))))
    items.append(("strided", rng.standard_normal(10)[::3]))
    _roundtrip(fmt, tmp_path, items)


def test_kaldi_ark_float_vectors_and_matrices_are_kaldi_binary(tmp_path):
    import kaldiio

    items = [("v", np.arange(4, dtype=np.float32)), ("m", np.ones((2, 3), np.float64)), ("h", np.ones(3, np.float16))]
    w = _write_all("kaldi_ark", tmp_path, items)
    ark = (tmp_path / "embeddings.ark").read_bytes()
    assert b"v \x00BFV " in ark and b"m \x00BDM " in ark and b"h NPY" in ark  # numpy-in-ark only for float16
    lines = w.path.read_text().splitlines()
    assert [l.split(" ", 1)[1].rsplit(":", 1)[0] for l in lines] == [str((tmp_path / "embeddings.ark").resolve())] * 3
    d = kaldiio.load_scp(str(w.path))  # peers (ESPnet spembs, WeSpeaker) read the scp directly
    for k, v in items:
        _assert_same(np.asarray(d[k]), v, k)
    with open_reader(tmp_path / "embeddings.ark") as r:  # a bare ark: indexed by one scan
        assert list(r) == ["v", "m", "h"]
        _assert_same(r["h"], items[2][1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_key_is_an_error_naming_it(fmt, tmp_path):
    with get_writer(fmt)(tmp_path, fsync=False) as w:
        w.write("spk1/utt1", np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="duplicate key 'spk1/utt1'"):
            w.write("spk1/utt1", np.ones(3, np.float32))
        w.write("spk1/utt2", np.ones(3, np.float32))  # the writer stays usable
    with open_reader(w.path) as r:
        assert list(r) == ["spk1/utt1", "spk1/utt2"] and not r["spk1/utt1"].any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["a b", " a", "a\t", "a\nb", "a\rb", "a\u3000b", "a\xa0b", "a\x1fb", "a\u2028b"])
def test_whitespace_in_a_key_is_an_error_naming_it(fmt, key, tmp_path):
    with get_writer(fmt)(tmp_path, fsync=False) as w:
        with pytest.raises(ValueError, match="whitespace") as e:
            w.write(key, np.zeros(2))
        assert repr(key) in str(e.value)
        with pytest.raises(ValueError, match="NUL"):
            w.write("a\0b", np.zeros(2))
        with pytest.raises(ValueError, match="empty key"):
            w.write("", np.zeros(2))
        with pytest.raises(TypeError, match="key must be str"):
            w.write(b"bytes", np.zeros(2))
        with pytest.raises(TypeError, match="dtype object cannot be stored"):
            w.write("obj", np.array([{}], dtype=object))
    assert len(open_reader(w.path)) == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_abort_leaves_no_file_and_no_temporary(fmt, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with get_writer(fmt)(tmp_path) as w:
            w.write("a", np.zeros((3, 2), np.float16))
            assert _leftovers(tmp_path)  # work in progress lives under temporary names only
            assert not any(p.exists() for p in w.paths)
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == []
    w2 = get_writer(fmt)(tmp_path)
    w2.write("a", np.zeros(2))
    w2.abort()
    w2.abort()  # idempotent
    with pytest.raises(ValueError, match="aborted"):
        w2.write("b", np.zeros(2))
    with pytest.raises(ValueError, match="close after abort"):
        w2.close()
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_rewrite_replaces_the_previous_output_whole(fmt, tmp_path):
    _write_all(fmt, tmp_path, [("old1", np.zeros(2)), ("old2", np.zeros(2))])
    _roundtrip(fmt, tmp_path, [("new", np.ones(3, np.int16))])


def _concurrent_writer(fmt, out, tag, barrier):
    w = get_writer(fmt)(out, "same", fsync=False)
    for i in range(30):
        w.write(f"{tag}/{i}", np.full((i % 4 + 1, 2), ord(tag), np.float32))
    barrier.wait(timeout=300)  # both have their temporaries in place, then commit at the same moment
    w.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_writers_of_one_stem_at_once(fmt, tmp_path):
    # one process: distinct temporary names, the last commit wins whole
    w1, w2 = get_writer(fmt)(tmp_path, "s", fsync=False), get_writer(fmt)(tmp_path, "s", fsync=False)
    w1.write("k1", np.zeros(1))
    w2.write("k2", np.ones(1))
    tmps = _leftovers(tmp_path)
    assert len(tmps) == len(set(tmps)) == 2 * len(w1.paths)
    w1.close()
    w2.close()
    assert list(open_reader(w2.path)) == ["k2"]
    # two processes committing the same stem simultaneously: one complete output, no temporaries
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_writer, args=(fmt, tmp_path, tag, barrier)) for tag in "AB"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [p.name for p in get_writer(fmt).output_paths(tmp_path, "same")] == \
        {"npz": ["same.npz"], "kaldi_ark": ["same.ark", "same.scp"], "hdf5": ["same.h5"], "npy_dir": ["same"]}[fmt]
    with open_reader(get_writer(fmt).output_path(tmp_path, "same")) as r:
        keys = list(r)
        tag = keys[0].split("/")[0]
        assert keys == [f"{tag}/{i}" for i in range(30)]
        for i, k in enumerate(keys):
            _assert_same(r[k], np.full((i % 4 + 1, 2), ord(tag), np.float32), k)
    assert not _leftovers(tmp_path)


def test_np_load_reads_our_npz_with_the_right_keys(tmp_path):
    keys = KEYWORDS + TRICKY + ["spk/utt.wav", "x"]
    items = [(k, np.full(3, i, np.float32)) for i, k in enumerate(keys)]
    w = _write_all("npz", tmp_path, items, compress=False)
    with np.load(w.path, allow_pickle=False) as z:
        assert z.files == keys
        for k, v in items:
            _assert_same(z[k], v, k)
    import zipfile

    with zipfile.ZipFile(w.path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert [i.filename for i in zf.infolist()] == [npz_member_name(k) for k in keys]
    assert all(i.compress_type == zipfile.ZIP_DEFLATED
               for i in zipfile.ZipFile(_write_all("npz", tmp_path, items, stem="c").path).infolist())
    # the one ambiguity np.load itself has (it matches member names first), documented in npz_member_name:
    for a in ("x.npy", "x/"):
        amb = [(a, np.zeros(1)), (a + ".npy", np.ones(1))]
        w = _write_all("npz", tmp_path, amb, stem="amb")
        with np.load(w.path) as z:
            assert z.files == [a, a + ".npy"] and z[a + ".npy"][0] == 0  # np.load: the array of `a`
        with open_reader(w.path) as r:
            assert r[a + ".npy"][0] == 1 and r[a][0] == 0  # our reader: exact


def test_peer_npz_and_legacy_layouts_still_read(tmp_path):
    crops = {"file": np.ones((2, 4), np.float32), "spk/u": np.stack([np.zeros(4), np.full(4, 2.0)])}
    np.savez(tmp_path / "espnet.npz", **{k: v for k, v in crops.items() if k != "file"})
    emb = load_embeddings(tmp_path / "espnet.npz")
    assert list(emb) == ["spk/u"] and emb["spk/u"].dtype == np.float32 and (emb["spk/u"] == 1).all()
    import h5py

    with h5py.File(tmp_path / "old.h5", "w") as f:  # the former hdf5 writer: '/' made groups
        f.create_dataset("spk/u1", data=np.ones(3, np.float32))
        f.create_dataset("top", data=np.zeros(3, np.float32))
    with open_reader(tmp_path / "old.h5") as r:
        assert sorted(r) == ["spk/u1", "top"] and r["spk/u1"].sum() == 3
    old = tmp_path / "npydir"  # the former npy_dir writer: quoted names, no index
    old.mkdir()
    np.save(old / "spk%2Fu.npy", np.arange(3))
    with open_reader(old) as r:
        assert type(r) is NpyDirReader and list(r) == ["spk/u"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_works_in_forked_dataloader_workers(fmt, tmp_path):
    torch = pytest.importorskip("torch")
    items = [(f"spk{i % 3}/utt{i}", np.full((i + 1, 2), i, np.float16)) for i in range(12)]
    w = _write_all(fmt, tmp_path, items)
    reader = open_reader(w.path)
    _assert_same(reader[items[0][0]], items[0][1])  # handle opened in the parent before the fork
    keys = [k for k, _ in items]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(keys)

        def __getitem__(self, i):
            return os.getpid(), keys[i], reader[keys[i]].astype(np.float32).sum()

    dl = torch.utils.data.DataLoader(DS(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = list(dl)
    assert {pid for pid, _, _ in got} - {os.getpid()}  # really read in the workers
    assert sorted((k, float(s)) for _, k, s in got) == sorted((k, float(v.astype(np.float32).sum())) for k, v in items)
    _assert_same(reader[keys[-1]], items[-1][1])  # the parent's handle is still good
    reader.close()


def _child_reads(reader, keys, q):
    q.put([float(reader[k].sum()) for k in keys])


def test_hdf5_reader_in_a_forked_child(tmp_path):
    items = [(f"u/{i}", np.full((50, 4), i, np.float32)) for i in range(8)]
    w = _write_all("hdf5", tmp_path, items, compression="lzf", min_compress_size=16)
    r = open_reader(w.path)
    assert r["u/0"].sum() == 0  # open in the parent
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(r, [k for k, _ in items], q))
    p.start()
    assert q.get(timeout=300) == [200.0 * i for i in range(8)]
    p.join(30)
    assert p.exitcode == 0
    import h5py

    with h5py.File(w.path) as f:  # big arrays chunked by rows and compressed; keys are flat dataset names
        ds = f["u%2F3"]
        assert ds.compression == "lzf" and ds.chunks[1:] == (4,)
        assert not any(isinstance(v, h5py.Group) for v in f.values())
    r.close()


@pytest.mark.parametrize("fmt", ["npz", "kaldi_ark", "npy_dir", "hdf5"])
def test_writers_stream_to_disk(fmt, tmp_path):
    big = np.random.default_rng(0).standard_normal((2000, 250)).astype(np.float32)  # 2 MB
    kw = {"npz": {"compress": False}, "hdf5": {"compression": None}}.get(fmt, {})
    w = get_writer(fmt)(tmp_path, fsync=False, **kw)
    for i in range(3):
        w.write(f"u{i}", big)
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    if fmt == "hdf5":
        w._f.flush()  # h5py may keep a write-back cache of about one chunk; data are not held by the writer
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk >= 2 * big.nbytes  # written as they come, not held for close()
    w.close()


def test_open_reader_chooses_by_summary_content_and_suffix(tmp_path):
    items = [("a/1", np.ones(3, np.float32)), ("b/2", np.zeros(3, np.float32))]
    for fmt in ("hdf5", "npy_dir"):
        _write_all(fmt, tmp_path, items)
    (tmp_path / "summary.json").write_text(json.dumps({
        "output_formats": ["hdf5", "npy_dir"],
        "outputs": {"hdf5": "/elsewhere/moved/embeddings.h5", "npy_dir": "/x/embeddings", "spk_npz": "s.npz"}}))
    assert type(open_reader(tmp_path)) is Hdf5Reader  # the first output format of the run
    assert type(open_reader(tmp_path, "npy")) is NpyDirReader
    (tmp_path / "summary.json").unlink()
    assert type(open_reader(tmp_path)) is Hdf5Reader  # by content: first registered format present
    assert type(open_reader(tmp_path / "embeddings")) is NpyDirReader
    assert type(open_reader(tmp_path / "embeddings.h5", name="h5")) is Hdf5Reader
    with pytest.raises(FileNotFoundError, match="not found"):
        open_reader(tmp_path / "missing.npz")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="unknown storage format"):
        open_reader(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no readable output"):
        open_reader(tmp_path / "empty")
    (tmp_path / "summary.json").write_text(json.dumps({"output_formats": ["npz"], "outputs": {"npz": "e.npz"}}))
    with pytest.raises(FileNotFoundError, match="none of which exists"):
        open_reader(tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_embeddings_and_scoring_on_every_output_format(fmt, tmp_path):
    from spk_toolkit.scoring import score

    rng = np.random.default_rng(1)
    c = rng.standard_normal((4, 16))
    emb = {f"id{s}/v/{u}": (c[s] + 0.3 * rng.standard_normal(16)).astype(np.float32)
           for s in range(4) for u in range(4)}
    w = _write_all(fmt, tmp_path, list(emb.items()))
    (tmp_path / "summary.json").write_text(json.dumps({"output_formats": [fmt], "outputs": {fmt: str(w.path)}}))
    got = load_embeddings(tmp_path)
    assert list(got) == list(emb) and all(_bits(got[k]) == _bits(v) for k, v in emb.items())
    keys = list(emb)
    trials = tmp_path / "veri.txt"
    trials.write_text("".join(f"{int(a.split('/')[0] == b.split('/')[0])} {a}.wav {b}.wav\n"
                              for i, a in enumerate(keys) for b in keys[i + 1:]))
    res = score(str(tmp_path), [str(trials)], str(tmp_path / "scores"), plots=False, log=lambda *a: None)
    (entry,) = res["trials"].values()
    assert entry["n_trials"] == 16 * 15 // 2 and entry["eer_pct"] < 10


@pytest.mark.parametrize("fmt", ["hdf5", "npy_dir"])
def test_spk_inference_trials_reads_the_run_output_whatever_its_format(fmt, tmp_path, monkeypatch, capsys):
    import spk_toolkit
    from spk_toolkit.bin import spk_inference

    rng = np.random.default_rng(2)
    emb = {f"id{s}/v/{u}": rng.standard_normal(8).astype(np.float32) for s in range(3) for u in range(3)}

    def fake_extract(data, output_dir, output_format, **kw):
        out = Path(output_dir)
        outputs = {}
        for f in parse_formats(output_format):
            outputs[f] = str(_write_all(f, out, list(emb.items())).path)
        summary = {"utterances": len(emb), "embedded": len(emb), "errors": 0, "speakers": 3, "audio_hours": 0.0,
                   "model": {"toolkit": "fake"}, "embedding_dim": 8, "shards": 1, "output_formats": [fmt],
                   "outputs": outputs}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(spk_toolkit, "extract_embeddings", fake_extract)
    keys = list(emb)
    trials = tmp_path / "t.txt"
    trials.write_text("".join(f"{int(a[:3] == b[:3])} {a}.wav {b}.wav\n"
                              for i, a in enumerate(keys) for b in keys[i + 1:]))
    out = tmp_path / "run"
    rc = spk_inference.main(["--data_dir", str(tmp_path), "--output_dir", str(out), "--output_format", fmt,
                             "--trials", str(trials), "--progress", "false"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "scores" / "metrics.json").read_text())["trials"]


# ------------------------------------------------------------------------------------------------- registry
def test_registry_names_aliases_and_errors():
    assert storage_names() == sorted(FORMATS) and set(WRITERS) == set(READERS) == set(FORMATS)
    assert parse_formats("npz, ark,h5,npy,scp,hdf") == ["npz", "kaldi_ark", "hdf5", "npy_dir"]
    assert parse_formats(["kaldi_ark", "npz", ""]) == ["kaldi_ark", "npz"]
    assert get_writer("ark") is WRITERS["kaldi_ark"] and get_reader("h5") is Hdf5Reader
    assert get_reader("npz") is NpzReader and get_reader("scp") is KaldiArkReader
    assert set(FORMAT_ALIASES.values()) <= set(FORMATS)
    with pytest.raises(ValueError, match="unknown output format 'parquet'; registered: hdf5, kaldi_ark"):
        parse_formats("npz,parquet")
    with pytest.raises(ValueError, match="already registered"):
        register_storage("npz", NpzWriter, NpzReader)
    with pytest.raises(ValueError, match="already registered"):
        register_storage("ark", NpzWriter, NpzReader)
    with pytest.raises(TypeError, match="Writer subclass"):
        register_storage("new", dict, NpzReader)
    with pytest.raises(ValueError, match="stem must be a plain file name"):
        NpzWriter("/tmp", ".hidden")
    with pytest.raises(TypeError):
        NpzWriter("/tmp", "x", compresion=True)  # misspelt option
    assert issubclass(NpzWriter, Writer) and issubclass(NpzReader, Reader)
    from spk_toolkit.io import writers

    assert writers.WRITERS is WRITERS and writers.EmbeddingWriter is Writer
    assert writers.get_writer("npz") is NpzWriter and writers.FORMAT_ALIASES is FORMAT_ALIASES


# --------------------------------------------------------------------------------------------------- atomic
def test_atomic_helpers(tmp_path):
    p = atomic.atomic_write_text(tmp_path / "a.json", "{}\n")
    assert p.read_text() == "{}\n"
    atomic.atomic_write_bytes(tmp_path / "a.json", b"[]")
    assert (tmp_path / "a.json").read_bytes() == b"[]"
    with pytest.raises(KeyError):
        with atomic.atomic_path(tmp_path / "a.json") as t:
            t.write_text("partial")
            raise KeyError("x")
    assert (tmp_path / "a.json").read_bytes() == b"[]" and not _leftovers(tmp_path)
    # directories, replacing a non-empty one
    for n in (3, 1):
        with atomic.atomic_path(tmp_path / "d") as t:
            t.mkdir()
            for i in range(n):
                (t / f"{i}.txt").write_text(str(n))
    assert sorted(os.listdir(tmp_path / "d")) == ["0.txt"] and not _leftovers(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic.atomic_path(tmp_path / "never"):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.AtomicPath(tmp_path / "no" / "such" / "f")
    names = {atomic.temporary_name("embeddings.npz") for _ in range(50)}
    assert len(names) == 50
    n = next(iter(names))
    assert n.startswith(".embeddings.npz.") and ".tmp" in n and atomic.is_temporary(n)
    info = atomic.parse_temporary(tmp_path / n)
    assert info.final_name == "embeddings.npz" and info.pid == os.getpid()
    assert Path(n).match(atomic.TEMP_GLOB)
    for other in ("embeddings.npz", ".embeddings.npz", ".x.tmp", ".shard-3.tmp123"):
        assert not atomic.is_temporary(other)
