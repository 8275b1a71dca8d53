"""Discovery for the registries: built-in modules found in their package, plug-ins found through entry points.

Every registry of spk_toolkit (backends and feature extractors, executors, storage formats) is filled by the
classes themselves when their module is imported (``@register_backend``, ``@register_executor``,
``register_storage``). This module finds the modules to import:

* **built-ins**: every module of the registry's package (:func:`package_modules`), so a new backend, extractor or
  format is one file in its folder, listed nowhere else;
* **plug-ins**: the entry points of the registry's group in installed distributions (:data:`GROUPS`), e.g. in a
  plug-in's ``pyproject.toml``::

      [project.entry-points."spk_toolkit.backends"]
      my_model = "my_package.my_model"          # a module whose import registers the class, or
      my_other = "my_package.other:OtherModel"  # a class, registered by the registry that loads it

A plug-in that fails to import is logged as a warning naming its entry point and the error; it never breaks a run
that does not ask for it (asking for it by name then raises the registry's "unknown name" error).
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Dict, List, Sequence

logger = logging.getLogger(__name__)

#: registry -> entry-point group
GROUPS = {
    "backends": "spk_toolkit.backends",
    "features": "spk_toolkit.features",
    "executors": "spk_toolkit.executors",
    "storage": "spk_toolkit.storage",
}

_LOADED: Dict[str, Dict[str, object]] = {}


def entry_points_of(group: str) -> Dict[str, str]:
    """``name -> "module[:attr]"`` of every installed entry point of ``group`` (nothing is imported).

    Parameters
    ----------
    group : str
        An entry-point group, e.g. ``"spk_toolkit.backends"``.
    """
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in sorted(entry_points(group=group), key=lambda e: e.name)}


def load_entry_points(group: str) -> Dict[str, object]:
    """Import every entry point of ``group`` once per process; ``name -> loaded object`` of those that imported.

    Parameters
    ----------
    group : str

    Returns
    -------
    dict
        The module (``name = "pkg.mod"``) or attribute (``"pkg.mod:Cls"``) of each entry point, in name order.
        One that fails to import is left out with a warning (``plug-in <group>:<name> (<value>) failed to load:
        <error>``).
    """
    if group not in _LOADED:
        from importlib.metadata import entry_points

        loaded: Dict[str, object] = {}
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            try:
                loaded[ep.name] = ep.load()
            except Exception as e:  # noqa: BLE001 (a broken plug-in must not break the toolkit)
                logger.warning("plug-in %s:%s (%s) failed to load: %s: %s", group, ep.name, ep.value,
                               type(e).__name__, e)
        _LOADED[group] = loaded
    return _LOADED[group]


def package_modules(package: str, exclude: Sequence[str] = ()) -> List[str]:
    """Dotted names of the modules and sub-packages directly in ``package`` (sorted; none is imported).

    Parameters
    ----------
    package : str
        An imported package, e.g. ``"spk_toolkit.backends"``.
    exclude : sequence of str
        Module names (last component) to leave out, e.g. the package's protocol module. Names starting with
        ``_`` are always left out.
    """
    pkg = importlib.import_module(package)
    return sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name not in exclude)


def import_all(package: str, exclude: Sequence[str] = (), group: str = "") -> None:
    """Import every module of ``package`` (:func:`package_modules`) and every entry point of ``group``.

    Raises
    ------
    ImportError
        A built-in module failed to import (a bug of the package, never hidden). Plug-ins only warn.
    """
    for name in package_modules(package, exclude):
        importlib.import_module(name)
    if group:
        load_entry_points(group)
