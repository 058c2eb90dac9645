"""The one block-hash rule shared by the worker's prefix cache and the router's prefix index.

Hash of block i = first 8 bytes (big-endian) of SHA-256 over the canonical bytes of
(hash of block i-1, model id, the block's token ids). Only full blocks are hashed. The digest is
stable across processes, machines and Python versions (never Python's ``hash()``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["ROOT_PARENT_HASH", "hash_block", "hash_blocks"]

# Parent of the first block of every prompt.
ROOT_PARENT_HASH = 0
_DOMAIN = b"moeserve.block.v1"


def hash_block(parent_hash: int, token_ids: Sequence[int], model_id: str) -> int:
    """64-bit digest of one full block chained to its parent's digest."""
    model = model_id.encode("utf-8")
    h = hashlib.sha256()
    h.update(_DOMAIN)
    h.update(struct.pack(">QI", parent_hash, len(model)))
    h.update(model)
    h.update(struct.pack(f">I{len(token_ids)}I", len(token_ids), *token_ids))
    return int.from_bytes(h.digest()[:8], "big")


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    parent_hash: int = ROOT_PARENT_HASH,
) -> list[int]:
    """Hash chain of every full block of ``token_ids``; a trailing partial block is skipped."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size], model_id)
        hashes.append(parent_hash)
    return hashes
