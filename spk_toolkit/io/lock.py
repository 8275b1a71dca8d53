"""One run per output directory at a time: an exclusive lock (``filelock``) with the holder's identity.

The lock file is ``<output_dir>/.spk_toolkit.lock`` (an OS-level ``flock``: released by the kernel when the
holding process dies, ``kill -9`` included, so a crashed run never leaves the directory locked). The holder
writes ``.spk_toolkit.lock.owner`` (JSON: pid, host, start time, command) so a refused run can say who holds it.
Only the driver of a run takes the lock; torchrun ranks and Dask workers of that run share the directory.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".spk_toolkit.lock"
OWNER_NAME = ".spk_toolkit.lock.owner"


class OutputDirLocked(RuntimeError):
    """Another run holds the output directory (the message names its pid, host and start time)."""


def _owner(out: Path) -> str:
    try:
        o = json.loads((out / OWNER_NAME).read_text(encoding="utf-8"))
        return f"pid {o.get('pid')} on {o.get('host')} since {o.get('started')} ({o.get('command', '?')})"
    except (OSError, ValueError):
        return "another process (owner unknown)"


@contextlib.contextmanager
def output_dir_lock(output_dir, timeout: float = 0.0):
    """Hold ``output_dir`` exclusively inside the block (creating the directory if needed).

    Parameters
    ----------
    output_dir : path
    timeout : float
        Seconds to wait for another holder (0 = refuse at once, -1 = wait for as long as it takes).

    Raises
    ------
    OutputDirLocked
        Another run holds the directory and did not release it within ``timeout`` seconds.
    OSError
        The directory cannot be created or the lock file cannot be opened (read-only file system, ...).
    """
    import filelock

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputDirLocked(f"{out} is in use by another run: {_owner(out)}; wait for it to finish, use another "
                              "--output_dir, or pass --lock_timeout SECONDS to wait") from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now().isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)[:300]}
        (out / OWNER_NAME).write_text(json.dumps(owner), encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            (out / OWNER_NAME).unlink()
        lock.release()
