"""Models by name: one ``--model`` spelling across backends, resolved to a registered backend and its arguments.

Spellings (:func:`resolve_model`):

=====================================  ==============================================================
``resemblyzer``, ``espnet``, ...        a registry name (:func:`spk_toolkit.available_models`)
``espnet:<tag>``                        an espnet_model_zoo tag (``model_tag``; a hub name needs espnet_model_zoo
                                        and the network, a local packed model ``.zip`` / ``.tar.gz`` needs neither)
``path/to/model.zip`` / ``.tar.gz``     a packed ESPnet model in espnet_model_zoo's layout (``meta.yaml`` +
                                        ``exp/...``), unpacked once into the cache
``path/to/unpacked/``                   an unpacked model (``meta.yaml`` naming ``train_config`` / ``model_file``)
                                        or an ESPnet experiment directory (``config.yaml`` + ``*.pth``); a
                                        directory with ``hyperparams.yaml`` is a SpeechBrain model
``speechbrain:<source>``                a SpeechBrain source (local directory, or a hub id when online)
``path/to/config.yaml``                 an ESPnet ``config.yaml`` (the checkpoint next to it, when there is one)
=====================================  ==============================================================

espnet_model_zoo's layout: ``meta.yaml`` at the top with ``yaml_files: {train_config: exp/.../config.yaml}`` and
``files: {model_file: exp/.../valid.eer.best.pth}``, paths relative to the package (what
``espnet_model_zoo.downloader.ModelDownloader.download_and_unpack`` returns as absolute paths).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Tuple

__all__ = ["resolve_model", "unpack_model", "read_model_dir", "cache_dir"]

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
#: checkpoint names preferred in an experiment directory, in order (ESPnet's best-model links first)
PREFERRED_CHECKPOINTS = ("valid.eer.best.pth", "valid.loss.best.pth", "valid.acc.best.pth", "latest.pth")


def cache_dir() -> Path:
    """Where packed models are unpacked: ``$SPK_TOOLKIT_CACHE`` or ``~/.cache/spk_toolkit`` (``/models``)."""
    return Path(os.environ.get("SPK_TOOLKIT_CACHE", Path.home() / ".cache" / "spk_toolkit")) / "models"


def _is_archive(p: Path) -> bool:
    return p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)


def unpack_model(archive: str | os.PathLike) -> Path:
    """Unpack a packed model (zip or tar) once into :func:`cache_dir` and return the directory.

    The directory is named by the archive's sha256, so a changed archive is unpacked anew; unpacking goes to a
    temporary directory renamed into place (a concurrent or killed unpack never leaves a partial model).

    Raises
    ------
    ValueError
        The archive holds absolute paths, ``..`` components, links or special files (refused, nothing written
        outside the cache), or is not a readable zip or tar (named).
    """
    import shutil
    import tempfile

    archive = Path(archive)
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    dst = cache_dir() / f"{archive.name.split('.')[0]}-{h.hexdigest()[:16]}"
    if dst.is_dir():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        _unpack_into(archive, tmp)
        try:
            os.replace(tmp, dst)
        except OSError:  # another process unpacked it first
            if not dst.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _unpack_into(archive: Path, tmp: Path) -> None:
    """Extract ``archive`` into ``tmp``: members checked first, links and special files refused; a file that is not
    a readable zip or tar (truncated, corrupt, another format) is a ``ValueError`` naming it."""
    import tarfile
    import zipfile
    import zlib

    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                names = z.namelist()
                _check_members(archive, names)
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _check_members(archive, [m.name for m in members])
                bad = [m.name for m in members if not (m.isfile() or m.isdir())]
                if bad:
                    raise ValueError(f"{archive}: links or special files are not accepted in a model package: {bad[:3]}")
                t.extractall(tmp)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{archive}: not a readable model package ({type(e).__name__}: {e}); unpack it or "
                         "download it again") from None


def _check_members(archive: Path, names) -> None:
    for n in names:
        parts = Path(n).parts
        if n.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(f"{archive}: unsafe member path {n!r} in a model package")


def read_model_dir(d: str | os.PathLike) -> dict:
    """``{"train_config": path, "model_file": path}`` of an unpacked model or an experiment directory.

    A ``meta.yaml`` (espnet_model_zoo's layout, possibly one level down) names the files; otherwise the directory
    must hold ``config.yaml`` and a checkpoint: :data:`PREFERRED_CHECKPOINTS` first, else the only ``*.pth``.

    Raises
    ------
    FileNotFoundError
        No ``meta.yaml`` and no ``config.yaml``; a file ``meta.yaml`` names is missing.
    ValueError
        Several checkpoints and none of the preferred names (the message lists them).
    """
    import yaml

    d = Path(d)
    metas = [d / "meta.yaml"] + sorted(d.glob("*/meta.yaml"))
    meta = next((m for m in metas if m.is_file()), None)
    if meta is not None:
        try:
            info = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(info, dict):
            raise ValueError(f"{meta}: expected a mapping (yaml_files, files), got {type(info).__name__}")
        files = {**(info.get("yaml_files") or {}), **(info.get("files") or {})}
        out = {}
        for key in ("train_config", "model_file"):
            name = next((v for k, v in files.items() if k == key or k.endswith(key)), None)
            if name is None:
                continue
            p = (meta.parent / name).resolve()
            if not p.is_file():
                raise FileNotFoundError(f"{meta} names {key} {name}, which is not in the package ({p})")
            out[key] = str(p)
        missing = [k for k in ("train_config", "model_file") if k not in out]
        if missing:
            raise FileNotFoundError(f"{meta}: no {' and no '.join(missing)} (yaml_files: train_config, "
                                    "files: model_file)")
        return out
    cfg = d / "config.yaml"
    if not cfg.is_file():
        raise FileNotFoundError(f"{d}: neither meta.yaml (espnet_model_zoo package) nor config.yaml "
                                "(ESPnet experiment directory)")
    for name in PREFERRED_CHECKPOINTS:
        if (d / name).is_file():
            return {"train_config": str(cfg.resolve()), "model_file": str((d / name).resolve())}
    pths = sorted(d.glob("*.pth"))
    if len(pths) > 1:
        raise ValueError(f"{d}: several checkpoints {[p.name for p in pths]}; pass model_file= to choose one")
    if not pths:
        raise FileNotFoundError(f"{d}: config.yaml but no *.pth checkpoint (a model without weights is only built "
                                "on request: load_model('espnet', train_config=...))")
    return {"train_config": str(cfg.resolve()), "model_file": str(pths[0].resolve())}


def resolve_model(model: str | os.PathLike = "resemblyzer", **kwargs) -> Tuple[str, dict]:
    """Turn a model spelling into ``(registry name, constructor arguments)``.

    Parameters
    ----------
    model : str or path, default="resemblyzer"
        One of the spellings in the module docstring.
    **kwargs
        Constructor arguments given with it (``device``, ...); they win over what the spelling implies.

    Returns
    -------
    (str, dict)

    Raises
    ------
    ValueError
        Neither a registered name, nor ``<name>:<tag>``, nor an existing file or directory (the message lists the
        registered names and the accepted spellings).
    """
    from spk_toolkit.backends.base import BACKENDS, _import_all

    _import_all()
    spec = os.fspath(model)
    if spec in BACKENDS:
        return spec, dict(kwargs)
    name, sep, tag = spec.partition(":")
    if sep and name in BACKENDS and tag:
        if name == "espnet" and (_is_archive(Path(tag)) or Path(tag).is_dir()):
            return "espnet", {**_espnet_files(Path(tag)), **kwargs}
        arg = BACKENDS[name].tag_argument
        if not arg:
            raise ValueError(f"model {spec!r}: the {name} backend takes no <name>:<tag> spelling; pass its "
                             "constructor arguments instead")
        return name, {arg: tag, **kwargs}
    p = Path(spec)
    if p.is_dir() and (p / "hyperparams.yaml").is_file() and "speechbrain" in BACKENDS:  # a SpeechBrain model dir
        return "speechbrain", {BACKENDS["speechbrain"].tag_argument or "source": str(p), **kwargs}
    if _is_archive(p) or p.is_dir():
        return "espnet", {**_espnet_files(p), **kwargs}
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        found = read_model_dir(p.parent)
        if Path(found["train_config"]) != p.resolve():
            found["train_config"] = str(p.resolve())
        return "espnet", {**found, **kwargs}
    raise ValueError(
        f"unknown model {spec!r}: registered names are {', '.join(sorted(BACKENDS))}; or give espnet:<model_tag>, "
        "a packed ESPnet model (.zip/.tar.gz), an unpacked model or experiment directory, or its config.yaml")


def _espnet_files(p: Path) -> dict:
    return read_model_dir(unpack_model(p) if _is_archive(p) else p)
