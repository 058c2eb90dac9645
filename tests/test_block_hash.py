"""Pinned vectors of the shared block hash: router and workers must agree on these forever."""

import os
import subprocess
import sys

from moeserve.common.block_hash import ROOT_PARENT_HASH, hash_block, hash_blocks

# Changing these breaks every router prefix index against running workers: bump the domain
# string in block_hash.py (a new hash version) instead of editing the numbers.
PINNED = [
    ((list(range(8)), 4, "deepseek-ai/DeepSeek-V3"), [12798121479395944154, 2033622640706464212]),
    (([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, "tiny"), [14062367822964583769, 1906719429881354065]),
]


def test_pinned_vectors():
    for args, expected in PINNED:
        assert hash_blocks(*args) == expected
    assert hash_block(ROOT_PARENT_HASH, [0], "") == 1239459317746134325


def test_chaining_and_partial_block():
    tokens = list(range(10))
    chain = hash_blocks(tokens, 4, "m")
    assert len(chain) == 2  # the trailing 2 tokens are not a full block
    assert chain[0] == hash_block(ROOT_PARENT_HASH, tokens[:4], "m")
    assert chain[1] == hash_block(chain[0], tokens[4:8], "m")
    # Same block content under a different prefix hashes differently.
    assert hash_blocks([9, 9, 9, 9] + tokens[4:8], 4, "m")[1] != chain[1]
    # Continuing a chain from a parent equals hashing the whole sequence.
    assert hash_blocks(tokens[4:8], 4, "m", parent_hash=chain[0]) == chain[1:]


def test_model_id_changes_hash():
    assert hash_blocks([1, 2, 3, 4], 4, "a") != hash_blocks([1, 2, 3, 4], 4, "b")


def test_large_token_ids_and_64_bit_range():
    (h,) = hash_blocks([2**32 - 1, 0, 129279, 7], 4, "m")
    assert 0 <= h < 2**64


def test_stable_across_processes_with_different_hash_seeds():
    code = (
        "from moeserve.common.block_hash import hash_blocks;"
        "print(hash_blocks(list(range(8)), 4, 'deepseek-ai/DeepSeek-V3'))"
    )
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == str(PINNED[0][1])
