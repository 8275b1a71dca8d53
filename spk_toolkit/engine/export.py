"""Exports: files a tool derives from a run's outputs (the TTS ``<tag>.ark/.scp``, ESPnet3's ``.pt`` layout),
written by the driver under the run's one lock, right after the merge, and named in ``summary.json``.

The driver (:func:`spk_toolkit.engine.extract` with ``exports=[...]``) calls, holding the output directory's lock:

1. :meth:`Export.paths` before planning: those files are removed, so a run that fails never leaves a previous
   export looking like its result;
2. :meth:`Export.write` after the merge: the files it returns are added to the summary's ``outputs``
   (:meth:`spk_toolkit.io.rundir.RunDir.add_outputs`), so ``--overwrite`` and readers know them.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Dict, List, Sequence

from spk_toolkit.io.rundir import RunDir

__all__ = ["Export", "clear_exports", "write_exports"]


class Export(abc.ABC):
    """Files derived from a finished run's outputs."""

    @abc.abstractmethod
    def paths(self, output_dir: Path) -> List[Path]:
        """Every file this export writes in ``output_dir`` (removed before the run)."""

    @abc.abstractmethod
    def write(self, output_dir: Path, summary: dict) -> Dict[str, str]:
        """Write the files from the run's outputs; returns ``output name -> path`` for ``summary.json``.

        Raises
        ------
        Exception
            Whatever makes the export impossible (the run's outputs stay; the export's files are absent).
        """


def clear_exports(output_dir: Path, exports: Sequence[Export]) -> List[str]:
    """Remove the files of ``exports`` in ``output_dir`` (the caller holds the lock); returns those removed."""
    removed = []
    for e in exports:
        for p in e.paths(Path(output_dir)):
            if p.exists() or p.is_symlink():
                p.unlink()
                removed.append(str(p))
    return removed


def write_exports(output_dir: Path, summary: dict, exports: Sequence[Export]) -> dict:
    """Run each export after the merge and name its files in ``summary.json``; returns the updated summary."""
    for e in exports:
        named = e.write(Path(output_dir), summary)
        if named:
            summary = {**summary, "outputs": RunDir(output_dir).add_outputs(**named)["outputs"]}
    return summary
