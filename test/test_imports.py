"""Import layering (issue 14): the backends never import spk_toolkit's ESPnet glue (``spk_toolkit.tasks``) or its
trainer (``spk_toolkit.train``), and loading a model for inference pulls in neither.

The module sets are read in fresh interpreters (``sys.modules`` of the test process already holds everything
other tests imported).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ROOT / "spk_toolkit" / "backends"
FORBIDDEN = ("spk_toolkit.tasks", "spk_toolkit.train")


def _is_forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _run(code: str, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh interpreter (cwd = the repository); it prints one JSON line last, returned."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"subprocess failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


_SNAPSHOT = """
def snap():
    import sys
    return sorted(m for m in sys.modules if m.startswith(("espnet", "spk_toolkit")))
"""


def test_bare_import_of_the_espnet_backend_is_light():
    """``import spk_toolkit.backends.espnet`` imports no espnet2 module, no trainer, no spk_toolkit glue."""
    got = _run(_SNAPSHOT + "import json, spk_toolkit.backends.espnet\nprint(json.dumps(snap()))")
    assert "espnet2.train.trainer" not in got
    assert not [m for m in got if _is_forbidden(m)]
    assert not [m for m in got if m == "espnet2" or m.startswith("espnet2.")]
    assert "spk_toolkit.backends.espnet.model" in got  # the package really loaded its parts


def test_loading_and_building_import_no_spk_toolkit_trainer():
    """Our checkpoint checks import no trainer at all; building a random x-vector model, embedding a batch and
    loading a checkpoint import no spk_toolkit.tasks / spk_toolkit.train, and no ``espnet2.train`` module beyond
    those ``espnet2.tasks.spk`` (ESPnet's own SpeakerTask, which imports ESPnet's trainers) imports itself."""
    pytest.importorskip("espnet2")
    code = _SNAPSHOT + """
import json, os, tempfile
import torch
import spk_toolkit.backends.espnet as E

out = {}
with tempfile.TemporaryDirectory() as tmp:
    # 1. our own checkpoint path on a plain module: read, check, load
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.save(net.state_dict(), os.path.join(tmp, "net.pth"))
    sd = E.read_state_dict(os.path.join(tmp, "net.pth"))
    assert E.checkpoint_coverage(net, sd) == ([], [])
    E.check_checkpoint(net, os.path.join(tmp, "net.pth"))
    E.load_embedding_weights(net, os.path.join(tmp, "net.pth"))
    out["checks"] = snap()
    # 2. what ESPnet's own SpeakerTask imports by itself
    import espnet2.tasks.spk  # noqa: F401
    out["espnet_task"] = snap()
    # 3. build, embed, save, load the checkpoint back through the backend
    m = E.build_random_model("conf/model_xvector.yaml", seed=0)
    g = torch.Generator().manual_seed(0)
    e = m.embed(0.1 * torch.randn(2, 16000, generator=g), torch.tensor([16000, 9000]))
    assert e.shape == (2, m.embed_dim) and bool(torch.isfinite(e).all())
    torch.save(m.model.state_dict(), os.path.join(tmp, "model.pth"))
    loaded = E.EspnetSpeakerModel(train_config="conf/model_xvector.yaml", model_file=os.path.join(tmp, "model.pth"))
    assert loaded.embed_dim == m.embed_dim
    out["built"] = snap()
print(json.dumps(out))
"""
    got = _run(code)
    checks, task, built = got["checks"], set(got["espnet_task"]), got["built"]
    assert "espnet2.train.trainer" not in checks
    assert not [m for m in checks if m.startswith("espnet2.train")]
    for stage in ("checks", "espnet_task", "built"):
        assert not [m for m in got[stage] if _is_forbidden(m)], stage
    assert not [m for m in built if m.startswith("espnet2.train") and m not in task]


def _imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module name ``path`` (a file under ``root``) imports, with line numbers: any scope (lazy imports
    inside functions too), relative imports resolved, ``from a import b`` also as ``a.b``, and string arguments
    of ``importlib.import_module`` / ``__import__``."""
    package = list(path.relative_to(root).parts[:-1])  # the package the file belongs to (also for __init__.py)
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names.append((node.lineno, base))
            names += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    names.append((node.lineno, node.args[0].value))
    return names


def test_backends_never_import_tasks_or_train():
    files = sorted(BACKENDS.rglob("*.py"))
    assert BACKENDS / "espnet" / "checkpoint.py" in files
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in files for line, name in _imported_names(p)
           if _is_forbidden(name)]
    assert not bad, "backends import spk_toolkit.tasks / spk_toolkit.train:\n" + "\n".join(bad)


def test_import_scanner_sees_relative_and_lazy_imports(tmp_path):
    """The scanner itself: lazy, relative, ``from spk_toolkit import ...`` and importlib imports are caught."""
    probe = tmp_path / "spk_toolkit" / "backends" / "espnet" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import torch\n"
        "def f():\n"
        "    from ...train import spk_trainer\n"
        "    from spk_toolkit import tasks\n"
        "    from .. import base\n"
        "    import importlib\n"
        "    importlib.import_module('spk_toolkit.train.spk_trainer')\n"
    )
    names = [n for _, n in _imported_names(probe, tmp_path)]
    assert [n for n in names if _is_forbidden(n)] == [
        "spk_toolkit.train", "spk_toolkit.train.spk_trainer", "spk_toolkit.tasks", "spk_toolkit.train.spk_trainer"
    ]
    assert "spk_toolkit.backends.base" in names and "torch" in names


def test_tasks_reexports_the_backend_checks():
    """spk_toolkit.tasks.spk keeps the old names (same objects) and its SpeakerTask uses our trainer."""
    pytest.importorskip("espnet2.tasks.spk")
    import spk_toolkit.backends.espnet as E
    import spk_toolkit.tasks.spk as T
    from spk_toolkit.train.spk_trainer import SpkTrainer

    for name in ("unwrap_state_dict", "legacy_renamed", "checkpoint_coverage", "read_state_dict",
                 "check_checkpoint", "load_embedding_weights", "NOT_FOR_EMBEDDINGS"):
        assert getattr(T, name) is getattr(E, name), name
    assert T.SpeakerTask.trainer is SpkTrainer
