"""Import layering: one declared map of layers (docs/architecture.md, "Layers"), and a test that fails on any import
against it, eager or lazy (imports inside functions, ``importlib.import_module`` / ``__import__`` of a literal or an
f-string's literal prefix). Plus the run-time checks: loading a model for inference pulls in neither spk_toolkit's
ESPnet glue (``spk_toolkit.tasks``) nor its trainer (``spk_toolkit.train``).

The module sets of the run-time checks are read in fresh interpreters (``sys.modules`` of the test process already
holds everything other tests imported).
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

#: The layers of spk_toolkit, lowest first: a module may import its own layer and those below, never one above.
#: Entries are module paths under ``spk_toolkit`` matched by the longest dotted prefix (``features.cache`` is a
#: module of its own layer; the rest of ``features`` is the extractors). The package root (``spk_toolkit``, the
#: lazy facade of the Python API) is above everything; a bare ``import spk_toolkit`` (for ``__version__``) is
#: neutral, ``from spk_toolkit import <name>`` counts as the module that defines ``<name>``.
LAYERS = (
    ("io", "metrics", "plot", "errors", "plugins"),     # files, formats, metrics, plots, exceptions, plug-in discovery
    ("data", "scoring", "testing", "recipes", "pipeline3d"),  # decoding + batches; trials x embeddings -> scores
    ("backends", "features"),                           # models and feature extractors: one protocol, one registry
    ("engine",),                                        # plan, run, shards, merge, the driver, in-process executor
    ("parallel",),                                      # torchrun and Dask executors (register into the engine)
    ("features.cache", "api", "models"),                # the feature cache, the in-memory API, models by name
    ("tts", "train"),                                   # ESPnet TTS drop-in, SpkTrainer
    ("tasks",),                                         # ESPnet task glue (SpeakerTask with our trainer)
    ("bin",),                                           # command-line entry points
)


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


def test_listing_the_registries_imports_no_espnet():
    """available_models() (and so every --help that lists backends) fills the registries without importing espnet2:
    a machine without ESPnet lists and runs the other backends (the wheel's default job, test_packaging.py)."""
    got = _run(_SNAPSHOT + "import json, spk_toolkit\nspk_toolkit.available_models()\nprint(json.dumps(snap()))")
    assert not [m for m in got if m == "espnet2" or m.startswith("espnet2.")]
    assert "spk_toolkit.features.kaldi" in got and "spk_toolkit.backends.resemblyzer" in got


@pytest.mark.slow
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
    of ``importlib.import_module`` / ``__import__`` (an f-string by its literal prefix)."""
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
            arg = node.args[0] if fname in ("import_module", "__import__") and node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value).rstrip(".")  # f"spk_toolkit.bin.{name}" -> spk_toolkit.bin
                if prefix:
                    names.append((node.lineno, prefix))
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


def _layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``spk_toolkit.<module>`` (longest dotted prefix); ``len(LAYERS)`` for the package
    root; -1 for a module the map does not place (a new part must be placed on purpose)."""
    if module == "":
        return len(LAYERS)
    best, where = "", -1
    for k, entries in enumerate(LAYERS):
        for e in entries:
            if (module == e or module.startswith(e + ".")) and len(e) > len(best):
                best, where = e, k
    return where


def _resolve(name: str, root: Path, lazy: dict) -> str | None:
    """``spk_toolkit.a.b`` -> ``a.b`` (``""`` for the root facade); None for other packages and a bare
    ``import spk_toolkit``. A name of the root facade is the module defining it (``_LAZY``) or the root itself."""
    parts = name.split(".")
    if parts[0] != "spk_toolkit":
        return None
    if len(parts) == 1:
        return None  # importing the package root itself: every import of a submodule does that
    if len(parts) == 2 and not ((root / "spk_toolkit" / parts[1]).is_dir()
                                or (root / "spk_toolkit" / f"{parts[1]}.py").is_file()):
        if parts[1] == "__version__":
            return None
        target = lazy.get(parts[1])
        return target.split(".", 1)[1] if target else ""
    return ".".join(parts[1:])


def _root_lazy(root: Path) -> dict:
    """The root facade's ``_LAZY`` table (name -> defining module), read without importing it."""
    tree = ast.parse((root / "spk_toolkit" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def layer_violations(root: Path = ROOT) -> list:
    """Every import under ``root/spk_toolkit`` against :data:`LAYERS`, as ``file:line: module (layer) imports name
    (layer)`` lines; also every module the map does not place."""
    lazy = _root_lazy(root)
    bad = []
    for path in sorted((root / "spk_toolkit").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts[1:])
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        here = _layer_of(module)
        if here < 0:
            bad.append(f"{path.relative_to(root)}: module {module!r} is not placed in LAYERS")
            continue
        for line, name in _imported_names(path, root):
            target = _resolve(name, root, lazy)
            if target is None:
                continue
            there = _layer_of(target)
            if there > here or there < 0:
                bad.append(f"{path.relative_to(root)}:{line}: {module or 'spk_toolkit'} (layer {here}) imports "
                           f"spk_toolkit.{target} (layer {there})")
    return sorted(set(bad))


def test_no_import_against_the_layer_map():
    bad = layer_violations()
    assert not bad, "imports against the layer map (test/test_layers.py LAYERS, docs/architecture.md):\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("where, code, expect", [
    ("engine/probe.py", "def f():\n    from spk_toolkit.parallel import dask\n", "engine.probe (layer 3) imports "
     "spk_toolkit.parallel.dask (layer 4)"),
    ("io/probe.py", "import importlib\nimportlib.import_module('spk_toolkit.engine.driver')\n",
     "io.probe (layer 0) imports spk_toolkit.engine.driver (layer 3)"),
    ("backends/probe.py", "import importlib\ndef f(n):\n    return importlib.import_module(f'spk_toolkit.bin.{n}')\n",
     "backends.probe (layer 2) imports spk_toolkit.bin (layer 8)"),
    ("features/probe.py", "from ..features import cache\n", "features.probe (layer 2) imports "
     "spk_toolkit.features.cache (layer 5)"),
    ("scoring2.py", "import numpy\n", "module 'scoring2' is not placed in LAYERS"),
    ("metrics_probe.py", "from spk_toolkit import extract_embeddings\n", "is not placed"),
    ("io/probe.py", "from spk_toolkit import load_model\n", "io.probe (layer 0) imports "
     "spk_toolkit.backends.base (layer 2)"),
])
def test_an_upward_import_in_a_new_module_fails(tmp_path, where, code, expect):
    """Criterion: the layering check fails when an upward import is added (a temporary copy of the package with one
    probe module), and a module the map does not place fails too."""
    import shutil

    shutil.copytree(ROOT / "spk_toolkit", tmp_path / "spk_toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_violations(tmp_path) == []  # the copy is clean
    (tmp_path / "spk_toolkit" / where).write_text(code)
    bad = layer_violations(tmp_path)
    assert bad and all(where.replace(".py", "") in b for b in bad) and any(expect in b for b in bad), bad


def test_the_layer_map_is_the_documented_one():
    """docs/architecture.md lists the same layers in the same order."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## Layers"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and ln[2:3].isdigit()]
    documented = [tuple(m.strip("` ") for m in row.split("|")[2].split(",")) for row in rows]
    assert documented == [tuple(e) for e in LAYERS]


# ------------------------------------------------------------------------------------- files that hold one concept
#: Where no function may exceed :data:`MAX_FUNCTION_LINES` lines of code (issue 22): the engine, the storage
#: formats, the TTS drop-in and the trainer.
SHORT_FUNCTIONS = ("engine", "io/storage", "tts", "train")
MAX_FUNCTION_LINES = 60


def code_lines(source: str, node: ast.AST) -> int:
    """Lines of ``node`` (a function) that hold code: not blank, not a comment, not its docstring."""
    body = getattr(node, "body", [])
    doc = range(0)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = range(body[0].lineno, body[0].end_lineno + 1)
    lines = source.splitlines()
    return sum(1 for n in range(node.lineno, node.end_lineno + 1)
               if n not in doc and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#"))


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list:
    """``file:line: name (n lines)`` of every function over ``limit`` code lines under :data:`SHORT_FUNCTIONS`."""
    pkg = root / "spk_toolkit"
    files = []
    for entry in SHORT_FUNCTIONS:
        files += sorted((pkg / entry).rglob("*.py")) if (pkg / entry).is_dir() else []
        files += [p for p in [pkg / f"{entry}.py"] if p.is_file()]
    out = []
    for path in files:
        src = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(src, node)
                if n > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: {node.name} ({n} lines)")
    return out


def test_no_function_over_sixty_lines_in_the_engine_storage_tts_and_trainer():
    assert not long_functions(), f"functions over {MAX_FUNCTION_LINES} code lines (split them):\n" + \
        "\n".join(long_functions())


def test_the_length_rule_counts_code_not_docstrings_or_comments(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "spk_toolkit" / "engine").mkdir(parents=True)
    (tmp_path / "spk_toolkit" / "engine" / "probe.py").write_text(
        f'def long():\n    """Doc.\n\n    More doc.\n    """\n    # a comment\n\n{body}\n\n'
        f'def short():\n    """{"x" * 10}"""\n' + "\n".join(f"    # c{i}" for i in range(100)) + "\n    return 1\n")
    assert long_functions(tmp_path) == ["spk_toolkit/engine/probe.py:1: long (62 lines)"]
