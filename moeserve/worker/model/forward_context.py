"""What one forward step runs with besides the hidden states: `ForwardContext`, and the
kernel backend in force while a step's stages run (`run_stages`).

The context travels explicitly down the decoder (attention inputs of the step or DBO
micro-batch). The backend is the step's too, but the leaves that switch on it (norms, fp8
GEMMs, routing, experts) are reached through plain ``module(x)`` calls, so it is set once for
the duration of the step by the one function that advances the stages, and read with
`kernels_on`; no module carries a flag of its own.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from moeserve.ops import kernels_run_on
from moeserve.worker.model.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from moeserve.worker.model.rotary import RotaryEmbedding

__all__ = ["KernelBackend", "ForwardContext", "Stages", "kernel_backend", "kernels_on",
           "run_stages"]

# "triton": moeserve.kernels (Triton, FlashInfer, DeepGEMM) on CUDA tensors, or on CPU ones
# under TRITON_INTERPRET; "torch": the plain-torch reference path everywhere.
KernelBackend = Literal["torch", "triton"]
_BACKEND: ContextVar[KernelBackend] = ContextVar("moeserve_kernel_backend", default="torch")

# A forward as a generator: it yields while a collective is in flight (expert-parallel
# dispatch/combine) and returns its result; run alone it is a plain call.
Stages = Generator[None, None, torch.Tensor]


@dataclass(frozen=True)
class ForwardContext:
    """One step's (or one DBO micro-batch's) inputs to the decoder besides its hidden states.

    kv_cache: [num_blocks, num_layers, block_size, kv_dim]; meta None: an empty micro-batch
    of an idle expert-parallel rank, which runs only the collectives."""

    positions: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata | None
    rotary: RotaryEmbedding

    def layer_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, kv_dim]: the strided view of layer `layer`'s cache."""
        return self.kv_cache[:, layer]


@contextmanager
def kernel_backend(backend: KernelBackend) -> Iterator[None]:
    """`backend` in force for the block (the step); the previous one after it."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"kernel backend must be 'torch' or 'triton', got {backend!r}")
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def kernels_on(x: torch.Tensor) -> bool:
    """Whether the op about to run on x takes its moeserve.kernels path: the step's backend
    is triton and x is where the kernels run (`kernels_run_on`)."""
    return _BACKEND.get() == "triton" and kernels_run_on(x)


def run_stages(stages: list[Stages], backend: KernelBackend) -> list[torch.Tensor]:
    """Advance the generators round-robin under `backend` until all return; their results
    in order. One generator is a plain forward; two are dual-batch overlap, each one's
    all-to-all in flight while the other computes. The backend is set here, around the
    whole loop, not inside the generators: interleaved ones would undo each other's."""
    results: list[torch.Tensor | None] = [None] * len(stages)
    live = list(range(len(stages)))
    with kernel_backend(backend):
        while live:
            for i in list(live):
                try:
                    next(stages[i])
                except StopIteration as stop:
                    results[i] = stop.value
                    live.remove(i)
    return results  # type: ignore[return-value]
