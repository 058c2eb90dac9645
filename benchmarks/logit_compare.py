"""Logits of every position of a prompt through an engine's model, and how two paths' logits
compare (W8A8 against the exact path: benchmarks/fp8_roofline.py on a GPU,
benchmarks/fp8_accuracy.py on the CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.worker.engine import LLMEngine
from moeserve.worker.model import AttentionMetadata

__all__ = ["all_logits", "compare_logits"]


@torch.inference_mode()
def all_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Float32 logits of every position of one prompt (one forward over the paged cache)."""
    runner = engine.runner
    bs = runner.block_size
    blocks = list(range(1, -(-len(ids) // bs) + 1))
    meta, pos = AttentionMetadata.build([blocks], [0], [len(ids)], bs, runner.device)
    hidden = runner.model(torch.tensor(ids, device=runner.device), pos, runner.kv_cache, meta,
                          runner.backend)
    return runner.model.compute_logits(hidden).cpu()


def compare_logits(test: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """`test` [positions, vocab] against `ref`: cosine over all logits, the mean of the
    per-position cosines, top-1 agreement."""
    # float64: a float32 dot over 1k x 129k logits drifts past 1
    a, b = test.double(), ref.double()
    return {"positions": a.shape[0],
            "cosine": F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(),
            "cosine_per_position_mean": F.cosine_similarity(a, b, dim=-1).mean().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
