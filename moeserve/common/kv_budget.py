"""The KV cache budget of one engine process on a GPU, as pure arithmetic (the runner passes the
device's numbers; tests pass made-up ones).

``--gpu-memory-utilization`` is the fraction of the device THIS process may use, as in vLLM:
``kv = util * total - held - workspace``, where ``held`` is what this process's allocator holds
after loading (weights, buffers) and ``workspace`` is kept for what it does not show (CUDA
context, cuBLAS/NCCL workspaces). Other processes on the device do not shrink the budget, so two
workers at 0.45 each fit one GPU; only when they leave less free memory than the budget is the
cache capped at what is free (the caller logs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.common.errors import MoeServeError
from moeserve.common.memory_plan import RUNTIME_RESERVE_BYTES, gib

__all__ = ["KvBudget", "KvBudgetError", "kv_cache_budget"]


class KvBudgetError(MoeServeError, MemoryError):
    """No room for a KV cache: the message names utilization, device, this process and others."""


@dataclass(frozen=True)
class KvBudget:
    bytes: int
    share_bytes: int  # util * total - held - workspace: this process's share, before the cap
    capped: bool  # other processes left less free memory than the share

    def describe(self, utilization: float, total: int, held: int, free: int) -> str:
        """The log line: where the number came from."""
        text = (f"KV cache budget {gib(self.bytes)}: {utilization:g} of {gib(total)} less "
                f"{gib(held)} held by this process")
        if self.capped:
            text += (f"; capped at free memory ({gib(free)} free, other processes hold "
                     f"{gib(_others(total, free, held))}), below this process's share "
                     f"{gib(self.share_bytes)}")
        return text


def _others(total: int, free: int, held: int) -> int:
    """Device memory in use that is not this process's allocator (other processes and CUDA
    contexts, this one's included)."""
    return max(total - free - held, 0)


def kv_cache_budget(utilization: float, total: int, held: int, free: int,
                    workspace: int = RUNTIME_RESERVE_BYTES,
                    min_bytes: int = 1) -> KvBudget:  # fmt: skip
    """Bytes the KV cache may take. ``total``/``free``: the device's (cudaMemGetInfo); ``held``:
    this process's reserved memory after loading. Raises KvBudgetError below ``min_bytes``."""
    if not 0 < utilization <= 1:
        raise KvBudgetError(f"gpu-memory-utilization must be in (0, 1], got {utilization:g}")
    share = int(utilization * total) - held - workspace
    # What is free must also leave this process's workspace (activations of its first steps).
    room = free - workspace
    capped = room < share
    budget = min(share, room)
    if budget < min_bytes:
        why = (f"other processes hold {gib(_others(total, free, held))} and leave "
               f"{gib(free)} free" if capped else
               "raise --gpu-memory-utilization or lower the weights per GPU")
        raise KvBudgetError(
            f"no memory left for the KV cache ({budget / 2**20:.0f} MiB): "
            f"gpu-memory-utilization {utilization:g} of {gib(total)} is "
            f"{gib(int(utilization * total))}, this process holds {gib(held)} (weights) plus a "
            f"{gib(workspace)} workspace; {why}")
    return KvBudget(budget, share, capped)
