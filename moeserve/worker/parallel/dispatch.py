"""Expert dispatch / combine: send each token copy to the rank holding its expert and back.

One interface, several backends (`make_dispatcher`): `torch` (all_to_all over
torch.distributed: gloo on the CPU, NCCL on GPUs) always works; `deepep` and `nixl_ep` are
imported only when asked for and fail with an error naming the missing package.

Both operations start asynchronously and return a pending object whose `wait()` finishes them,
so dual-batch overlap can compute one micro-batch while the other's bytes are on the wire.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from moeserve.common.errors import ConfigError
from moeserve.worker.parallel.group import ParallelContext

__all__ = [
    "DispatchHandle", "Dispatched", "PendingDispatch", "PendingCombine", "CommStats",
    "Dispatcher", "TorchDispatcher", "BackendUnavailable", "make_dispatcher", "BACKENDS",
]

BACKENDS = ("torch", "deepep", "nixl_ep")
# backend -> (module to import, package that provides it)
_OPTIONAL = {"deepep": ("deep_ep", "deep_ep (DeepEP)"), "nixl_ep": ("nixl_ep", "nixl_ep_cu13")}


class BackendUnavailable(ConfigError):
    """The chosen a2a backend cannot run in this environment."""


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs to route results back; produced by dispatch, never built by hand.

    order: [C] int64, token copies (flattened [T, k]) sorted by destination rank.
    send_counts / recv_counts: rows sent to / received from each rank in dispatch.
    """

    order: torch.Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    num_copies: int


@dataclass(frozen=True)
class Dispatched:
    """Rows that arrived at this rank. x: [N, H]; slots: [N] int64 local expert slot."""

    x: torch.Tensor
    slots: torch.Tensor
    handle: DispatchHandle


@dataclass
class CommStats:
    """Wall time this rank spent inside dispatch/combine (issue + wait), per call."""

    seconds: float = 0.0
    calls: int = 0
    rows_sent: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.rows_sent = 0.0, 0, 0


class PendingDispatch:
    def __init__(self, ctx: ParallelContext, works: list, result: Dispatched, stats: CommStats):
        self._ctx, self._works, self._result, self._stats = ctx, works, result, stats

    def wait(self) -> Dispatched:
        t0 = time.perf_counter()
        for w in self._works:
            self._ctx.wait(w)
        self._stats.seconds += time.perf_counter() - t0
        return self._result


class PendingCombine:
    def __init__(self, ctx: ParallelContext, work, recv: torch.Tensor, handle: DispatchHandle,
                 stats: CommStats):
        self._ctx, self._work, self._recv, self._handle = ctx, work, recv, handle
        self._stats = stats

    def wait(self) -> torch.Tensor:
        """[C, H] expert outputs in flat token-copy order (copy c = token c // k, choice c % k)."""
        t0 = time.perf_counter()
        self._ctx.wait(self._work)
        out = torch.empty_like(self._recv)
        out[self._handle.order] = self._recv
        self._stats.seconds += time.perf_counter() - t0
        return out


class Dispatcher(Protocol):
    stats: CommStats

    def dispatch(self, x: torch.Tensor, physical: torch.Tensor,
                 slots_per_rank: int) -> PendingDispatch:
        """x: [T, H]; physical: [T, k] int64 physical expert of each copy."""
        ...

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        """y: [N, H] expert outputs of the rows dispatch delivered, in their arrival order."""
        ...


@dataclass
class TorchDispatcher:
    """all_to_all_single over the group: one blocking exchange of row counts, then the rows.

    Copies, not tokens, travel: a token whose k experts sit on one rank is sent k times. DeepEP
    sends it once and expands on arrival; at CPU test sizes the simpler layout costs nothing.
    """

    ctx: ParallelContext
    stats: CommStats = field(default_factory=CommStats)

    def dispatch(self, x: torch.Tensor, physical: torch.Tensor,
                 slots_per_rank: int) -> PendingDispatch:
        t0 = time.perf_counter()
        top_k = physical.shape[1]
        flat = physical.flatten()
        dest = flat // slots_per_rank
        order = dest.argsort(stable=True)
        world = self.ctx.world_size
        send = torch.bincount(dest, minlength=world)
        recv = torch.empty_like(send)
        # Sizes first (blocking, 8 bytes per rank): the receiver must allocate its buffer.
        group = self.ctx.group
        self.ctx.wait(dist.all_to_all_single(recv, send, group=group, async_op=True))
        send_counts, recv_counts = tuple(send.tolist()), tuple(recv.tolist())
        send_x = x[order // top_k]
        send_slots = (flat % slots_per_rank)[order]
        recv_x = x.new_empty(sum(recv_counts), x.shape[1])
        recv_slots = send_slots.new_empty(sum(recv_counts))
        works = [
            dist.all_to_all_single(recv_x, send_x, list(recv_counts), list(send_counts),
                                   group=group, async_op=True),
            dist.all_to_all_single(recv_slots, send_slots, list(recv_counts), list(send_counts),
                                   group=group, async_op=True),
        ]
        handle = DispatchHandle(order, send_counts, recv_counts, flat.numel())
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.rows_sent += flat.numel()
        return PendingDispatch(self.ctx, works, Dispatched(recv_x, recv_slots, handle),
                               self.stats)

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        t0 = time.perf_counter()
        recv = y.new_empty(handle.num_copies, y.shape[1])
        work = dist.all_to_all_single(recv, y.contiguous(), list(handle.send_counts),
                                      list(handle.recv_counts), group=self.ctx.group,
                                      async_op=True)
        self.stats.seconds += time.perf_counter() - t0
        return PendingCombine(self.ctx, work, recv, handle, self.stats)


def make_dispatcher(name: str, ctx: ParallelContext, device: torch.device) -> Dispatcher:
    """The backend named by --a2a-backend; optional ones are imported here, not at start-up."""
    if name not in BACKENDS:
        raise ConfigError(f"a2a_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "torch":
        return TorchDispatcher(ctx)
    module, package = _OPTIONAL[name]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"a2a_backend={name!r} needs the {package} package, which is not importable here "
            f"({e}); install it or use --a2a-backend torch"
        ) from e
    if device.type != "cuda":
        raise BackendUnavailable(f"a2a_backend={name!r} runs on CUDA devices only, not {device}")
    # The package exists and a GPU is present, but its buffers (RDMA/NVLink registration,
    # low-latency vs normal mode) are owned by the multi-GPU issue; refuse rather than pretend.
    raise BackendUnavailable(
        f"a2a_backend={name!r}: {package} is installed but moeserve's adapter for it is not "
        "built yet (tracked by the multi-GPU expert-parallel issue); use --a2a-backend torch"
    )
