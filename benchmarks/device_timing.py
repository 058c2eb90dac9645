"""GPU timing the benchmark scripts share: the synchronised wall time of a call, the mean of
repeated calls, and the two ceilings a roofline is drawn against (device-to-device copy
bandwidth counting bytes read + written, and the bf16 8192^3 matmul rate).

Scripts import it as ``benchmarks.device_timing`` when run as modules (``python -m``) and as
``device_timing`` when run as files (``python benchmarks/x.py`` puts this folder on the path).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["elapsed", "mean_seconds", "measure_peaks"]


def elapsed(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``, the device idle before and finished after."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def mean_seconds(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Mean seconds of ``reps`` back-to-back calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()

    def repeated() -> None:
        for _ in range(reps):
            fn()

    return elapsed(repeated) / reps


def measure_peaks(seconds: Callable[[Callable[[], object]], float] = mean_seconds
                  ) -> dict[str, float]:
    """{"copy_GBps", "bf16_TFLOPs"}: a 1 GiB device copy and an 8192^3 bf16 matmul, each
    timed by ``seconds`` (default: the mean of 20 calls)."""
    size = 1 << 30  # bytes per buffer
    src = torch.randn(size // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    copy_s = seconds(lambda: dst.copy_(src))
    mm_s = seconds(lambda: a @ b)
    return {"copy_GBps": 2 * size / copy_s / 1e9, "bf16_TFLOPs": 2 * n**3 / mm_s / 1e12}
