"""This worker's KV compatibility fingerprint: which fields must match for KV to be reused.

The format and the comparison (``compat_fingerprint``, ``fingerprint_mismatch``) live in
``moeserve.common.kv_compat``: the router compares fingerprints too and never imports worker
code. This module only chooses the fields, from the engine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING

import moeserve
from moeserve.common.kv_compat import compat_fingerprint
from moeserve.worker.kv_handoff.agent import METADATA_VERSION

if TYPE_CHECKING:
    from moeserve.worker.engine import LLMEngine

__all__ = ["engine_fingerprint"]


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big") + p)
    return h.hexdigest()[:16]


def _nixl_version() -> str:
    for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def engine_fingerprint(engine: LLMEngine) -> str:
    """What must match between a prefill and a decode worker for KV to be reused as is.

    Model id and weights, dtype, KV layout and block size, parallel layout, moeserve and NIXL
    versions. Each is its own field so a refusal names the one that differs.
    """
    model_dir = Path(engine.config.model)
    config = model_dir / "config.json"
    # Names and sizes, not contents: hashing hundreds of GB at start-up is not an option.
    shards = sorted(model_dir.glob("*.safetensors"))
    weights = [f"{p.name}:{p.stat().st_size}".encode() for p in shards]
    kv = engine.kv_cache
    return compat_fingerprint(
        {
            "model": engine.config.model_id,
            "config": _digest([config.read_bytes()]) if config.is_file() else "none",
            "weights": _digest(weights),
            "kv_layout": "x".join(str(d) for d in kv.shape[1:]),
            "kv_dtype": str(kv.dtype).removeprefix("torch."),
            "block_size": engine.config.block_size,
            "parallel": f"dp{engine.config.dp}-ep{engine.config.ep}-tp1",
            "nixl": _nixl_version(),
            "mla": engine.config.mla_impl,
            "moeserve": getattr(moeserve, "__version__", "0"),
            "kv_metadata": METADATA_VERSION,
        }
    )
