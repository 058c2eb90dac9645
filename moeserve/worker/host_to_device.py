"""Host values onto the device without waiting for the device.

`torch.tensor(values, device="cuda")` and `cpu_tensor.to("cuda")` copy from pageable memory,
which torch follows with a stream synchronize: the host then waits for every kernel queued
before it. With a decode step scheduled ahead that wait is the whole running step, so every
host-built input of a step (metadata, sampling parameters, row indices) goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["to_device"]


def to_device(
    values: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``values`` (a CPU tensor or a list) on ``device``. On CUDA it is staged in pinned
    memory and copied asynchronously, in stream order; torch's pinned-memory cache keeps the
    staging buffer alive until the copy has run."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
