"""Device strings, checked once before any work: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` (and ``mps`` on Apple).

:func:`parse_device` checks the spelling (the CLIs' ``--device`` type, so ``--device gpu`` is a usage error at parse
time); :func:`check_device` also checks that the device exists on this machine (``cuda`` on a CPU-only torch build,
``cuda:99`` on a 1-GPU machine) and resolves ``auto``. :func:`spk_toolkit.backends.load_model` calls it, so the API,
the CLIs, the trainer and every executor's workers refuse a missing device with the same one line instead of torch's
``AssertionError: Torch not compiled with CUDA enabled`` from deep inside a model.
"""
from __future__ import annotations

import re

__all__ = ["DEVICE_FORMS", "check_device", "parse_device"]

#: The spellings a device may take (the message of every refusal lists them).
DEVICE_FORMS = "cpu, cuda, cuda:N, auto (cuda when available, else cpu), mps"

_SPEC = re.compile(r"^(cpu|cuda|mps|auto)(:(\d+))?$")


def parse_device(spec) -> str:
    """Check a device string's spelling and return it normalised (lower case, stripped).

    Parameters
    ----------
    spec : str or torch.device
        ``cpu``, ``cuda``, ``cuda:N``, ``auto``, ``mps``.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Any other spelling (``gpu``, ``cuda:x``, ``cpu:1``, ``auto:0``), named with the forms accepted.
    """
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    if not m or (m.group(2) and m.group(1) not in ("cuda",)):
        raise ValueError(f"device {str(spec)!r} is not one of {DEVICE_FORMS}")
    return text


def check_device(spec) -> str:
    """:func:`parse_device`, then check the device exists here; ``auto`` becomes ``cuda`` or ``cpu``.

    Parameters
    ----------
    spec : str or torch.device

    Returns
    -------
    str
        The device to use (``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    Raises
    ------
    ValueError
        A spelling :func:`parse_device` refuses; ``cuda`` with a torch build without CUDA or with no GPU visible;
        ``cuda:N`` with N >= the number of visible GPUs; ``mps`` where torch has no MPS.
    """
    text = parse_device(spec)
    if text == "cpu":
        return text
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' is not available (no Apple GPU, or this torch build lacks MPS)")
        return text
    if torch.version.cuda is None:
        raise ValueError(f"device {text!r}: this torch build ({torch.__version__}) has no CUDA; use --device cpu "
                         "(or install a CUDA build of torch)")
    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError(f"device {text!r}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver); use --device cpu")
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= n:
        raise ValueError(f"device {text!r}: only {n} CUDA GPU(s) are visible (cuda:0..cuda:{n - 1})")
    return text
