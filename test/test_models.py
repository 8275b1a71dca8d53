"""Models by name (issue 18): one spelling for every backend; an ESPnet model packed in espnet_model_zoo's layout
(``meta.yaml`` + ``exp/...``) used from a local file, no network."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from spk_toolkit.models import read_model_dir, resolve_model, unpack_model

ROOT = Path(__file__).resolve().parents[1]
META = """espnet: '202611'
files:
  model_file: exp/spk_xvector/valid.eer.best.pth
python: 3.11.7
timestamp: 1764600000.0
torch: 2.13.0
yaml_files:
  train_config: exp/spk_xvector/config.yaml
"""


def test_registry_names_and_tags_resolve_without_loading_anything():
    assert resolve_model("resemblyzer", device="cpu") == ("resemblyzer", {"device": "cpu"})
    assert resolve_model("espnet:espnet/voxcelebs12_ecapa") == ("espnet", {"model_tag": "espnet/voxcelebs12_ecapa"})
    with pytest.raises(ValueError, match="registered names are .*resemblyzer.*espnet:<model_tag>"):
        resolve_model("not_a_model")
    with pytest.raises(ValueError, match="takes no <name>:<tag>"):
        resolve_model("resemblyzer:x")
    assert resolve_model("speechbrain:speechbrain/spkrec-ecapa-voxceleb") == (
        "speechbrain", {"source": "speechbrain/spkrec-ecapa-voxceleb"})


def test_a_speechbrain_directory_resolves_to_the_speechbrain_backend(tmp_path):
    (tmp_path / "hyperparams.yaml").write_text("embedding_model: null\n")
    assert resolve_model(tmp_path, device="cpu") == ("speechbrain", {"source": str(tmp_path), "device": "cpu"})


def test_unsafe_packages_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPK_TOOLKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="unsafe member path"):
        unpack_model(bad)
    assert not (tmp_path / "evil.txt").exists()


def test_experiment_dir_needs_a_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("encoder: xvector\n")
    with pytest.raises(FileNotFoundError, match="no \\*.pth checkpoint"):
        read_model_dir(tmp_path)
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="several checkpoints"):
        read_model_dir(tmp_path)
    (tmp_path / "valid.eer.best.pth").write_bytes(b"")
    assert read_model_dir(tmp_path)["model_file"].endswith("valid.eer.best.pth")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A random x-vector ESPnet model packed as espnet_model_zoo packs models, and the built reference."""
    pytest.importorskip("espnet2")
    import torch

    from spk_toolkit.backends.espnet import build_random_model

    d = tmp_path_factory.mktemp("packed")
    ref = build_random_model(ROOT / "conf" / "model_xvector.yaml", seed=0)
    pkg = d / "pkg"
    exp = pkg / "exp" / "spk_xvector"
    exp.mkdir(parents=True)
    shutil.copy(ROOT / "conf" / "model_xvector.yaml", exp / "config.yaml")
    torch.save(ref.model.state_dict(), exp / "valid.eer.best.pth")
    (pkg / "meta.yaml").write_text(META)
    archive = d / "spk_xvector.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(pkg.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(pkg))
    return archive, pkg, exp, ref


def test_local_packed_model_in_espnet_model_zoo_layout(packed, tmp_path, monkeypatch):
    import torch

    import spk_toolkit

    monkeypatch.setenv("SPK_TOOLKIT_CACHE", str(tmp_path / "cache"))
    archive, pkg, exp, ref = packed
    unpacked = unpack_model(archive)
    assert unpacked.parent == tmp_path / "cache" / "models" and unpack_model(archive) == unpacked  # once
    for spec in (archive, f"espnet:{archive}", pkg, exp, exp / "config.yaml"):
        toolkit, kw = resolve_model(spec)
        assert toolkit == "espnet", spec
        assert kw["train_config"].endswith("exp/spk_xvector/config.yaml") and kw["model_file"].endswith(
            "exp/spk_xvector/valid.eer.best.pth"), (spec, kw)
    model = spk_toolkit.get_model(archive)
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(2, 16000, generator=g)
    lengths = torch.tensor([16000, 11000])
    torch.testing.assert_close(model.embed(wav, lengths), ref.embed(wav, lengths))


@pytest.mark.slow
def test_spk_inference_takes_the_packed_model_by_name(packed, fillets_small, tmp_path):
    import json

    from spk_toolkit.testing import make_subset

    archive = packed[0]
    data = make_subset(fillets_small, tmp_path / "data", per_speaker=1)
    r = subprocess.run([sys.executable, "-m", "spk_toolkit.bin.spk_inference", "--model", str(archive),
                        "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--num_workers", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**__import__("os").environ, "SPK_TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["model"]["toolkit"] == "espnet" and s["embedded"] == 4
    assert s["model"]["model_file"].endswith("valid.eer.best.pth")
