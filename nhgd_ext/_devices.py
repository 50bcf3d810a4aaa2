"""The one check of a device argument (``"cpu"``, ``"cuda"``, ``"cuda:N"``),
shared by the Pipeline's arguments and the command line's ``--device``."""

from __future__ import annotations

import torch


def checked_device(value, argument: str) -> torch.device:
    """``value`` as a CPU or CUDA device, a bare ``cuda`` resolved to the
    current GPU. Raises ValueError starting with ``argument`` (how the caller
    names it, e.g. ``"argument --device:"``) where it is no such device or
    that GPU is not visible."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{argument} must be cpu, cuda or cuda:N, got {value!r}") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument} must be cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument} {value!r} was asked for, but no CUDA device is visible")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{argument} {value!r} was asked for, but only {torch.cuda.device_count()} GPUs are visible")
    return device
