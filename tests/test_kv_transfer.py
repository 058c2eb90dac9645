"""KV transfer: the pure scheduler half, and real NIXL READs between two processes (UCX, DRAM)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator

import pytest
import torch

from moeserve.common.kv_compat import compat_fingerprint, fingerprint_mismatch
from moeserve.worker.kv_handoff.agent import (
    KVLayout,
    KVTransferAgent,
    KVTransferError,
    _pack_metadata,
    block_descs,
    block_runs,
    decode_release_notif,
    encode_release_notif,
    run_descs,
)
from moeserve.worker.kv_handoff.prefill import LeaseTable

SHAPE = (8, 3, 4, 16)  # [num_blocks, num_layers, block_size, kv_dim]


def _pattern(seed: int) -> torch.Tensor:
    # Every byte position distinct, so a block landing in the wrong slot is caught.
    return (torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32) + seed * 1e6).reshape(
        SHAPE
    )


def _peer_main(conn, name: str) -> None:
    agent = KVTransferAgent(name, _pattern(1))
    conn.send(agent.metadata())
    while True:
        cmd = conn.recv()
        if cmd == "exit":
            break
        # "released": wait up to 10 s for the decode side's release notification.
        deadline, got = time.monotonic() + 10, []
        while not got and time.monotonic() < deadline:
            got = agent.take_released_requests()
            time.sleep(0.01)
        conn.send(got)
    agent.close()


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[object, object, bytes]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer_main, args=(child, "prefill-0"), daemon=True)
    proc.start()
    assert parent.poll(60), "peer did not start"
    yield proc, parent, parent.recv()
    parent.send("exit")
    proc.join(10)
    if proc.is_alive():
        proc.kill()


@pytest.fixture(scope="module")
def local() -> Iterator[KVTransferAgent]:
    agent = KVTransferAgent("decode-0", torch.zeros(SHAPE))
    yield agent
    agent.close()


# ------------------------------------------------------------------ pure half


def test_block_descs_one_contiguous_range_per_block() -> None:
    layout = KVLayout(base_addr=4096, num_blocks=4, block_bytes=100, mem_type="DRAM", dev_id=0)
    descs = block_descs(layout, [2, 0])
    assert descs.tolist() == [[4296, 100, 0], [4096, 100, 0]]
    with pytest.raises(ValueError, match="outside"):
        block_descs(layout, [4])


def test_block_runs_merge_blocks_consecutive_on_both_sides() -> None:
    assert block_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 5, 6]) == ([4, 9, 10, 2], [0, 3, 5, 6],
                                                                   [3, 1, 1, 1])
    assert block_runs([], []) == ([], [], [])
    layout = KVLayout(base_addr=4096, num_blocks=8, block_bytes=100, mem_type="VRAM", dev_id=1)
    assert run_descs(layout, [1, 6], [3, 2]).tolist() == [[4196, 300, 1], [4696, 200, 1]]
    with pytest.raises(ValueError, match="outside"):
        run_descs(layout, [6], [3])  # blocks 6, 7, 8: 8 is past the end


def test_lease_table_release_and_expiry() -> None:
    leases = LeaseTable(default_lease_s=5)
    leases.add("a", [1, 2], now=0)
    leases.add("b", [3], now=0, lease_s=1)
    assert leases.expired(now=0.5) == []
    assert leases.expired(now=1) == ["b"]
    assert leases.release("a") == [1, 2]
    assert leases.release("a") is None and len(leases) == 0


def test_release_notif_round_trip() -> None:
    assert decode_release_notif(encode_release_notif("req-é")) == "req-é"
    assert decode_release_notif(b"something else") is None


def test_fingerprint_mismatch_names_the_field() -> None:
    ours = compat_fingerprint({"model": "tiny", "dtype": "float32", "block_size": 64})
    assert fingerprint_mismatch(ours, ours) is None
    theirs = compat_fingerprint({"model": "tiny", "dtype": "bfloat16", "block_size": 64})
    assert fingerprint_mismatch(ours, theirs) == "dtype: ours=float32 theirs=bfloat16"
    assert "block_size" in fingerprint_mismatch(ours, "model=tiny;dtype=float32")
    with pytest.raises(ValueError):
        compat_fingerprint({"a": "x;y"})


def test_incompatible_metadata_is_refused(local: KVTransferAgent) -> None:
    with pytest.raises(KVTransferError, match="not a moeserve"):
        local.add_peer(b"garbage")
    other = KVLayout(0, 8, local.layout.block_bytes * 2, "DRAM", 0)
    with pytest.raises(KVTransferError, match="incompatible"):
        local.add_peer(_pack_metadata("x", other, b""))


# ------------------------------------------------------------------ two processes


def test_read_blocks_bytes_arrive_exactly(peer, local: KVTransferAgent) -> None:
    _, conn, metadata = peer
    name = local.add_peer(metadata)
    assert name == "prefill-0" and local.add_peer(metadata) == name  # cached
    before = local._kv_cache.clone()
    # 1, 2 -> 4, 5 is one run (one descriptor); 5 -> 0 and 7 -> 3 are one block each
    handle = local.read_blocks(name, [5, 1, 2, 7], [0, 4, 5, 3], encode_release_notif("req-1"))
    result = local.wait(handle, timeout_s=10)
    assert result.ok, result.error
    assert result.num_bytes == 4 * local.layout.block_bytes
    src = _pattern(1)
    kv = local._kv_cache
    assert torch.equal(kv[0], src[5]) and torch.equal(kv[3], src[7])
    assert torch.equal(kv[4:6], src[1:3])
    untouched = [1, 2, 6, 7]
    assert torch.equal(kv[untouched], before[untouched])
    conn.send("released")
    # Named by the reader: the prefill side releases only a lease handed to that agent.
    assert conn.poll(15) and conn.recv() == [(local.name, "req-1")]


def test_bad_block_ids_and_unknown_peer_fail_without_raising(peer, local) -> None:
    _, _, metadata = peer
    name = local.add_peer(metadata)
    bad = local.read_blocks(name, [99], [0])
    assert not local.wait(bad, timeout_s=1).ok
    unknown = local.wait(local.read_blocks("nobody", [0], [0]), timeout_s=1)
    assert not unknown.ok and "unknown peer" in unknown.error


def test_dead_peer_reports_failure_within_deadline(local: KVTransferAgent) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer_main, args=(child, "prefill-dead"), daemon=True)
    proc.start()
    assert parent.poll(60)
    name = local.add_peer(parent.recv())
    proc.kill()
    proc.join(10)
    start = time.monotonic()
    result = local.wait(local.read_blocks(name, [0, 1], [4, 5]), timeout_s=3)
    assert not result.ok and result.error
    assert time.monotonic() - start < 10
    local.remove_peer(name)
    assert not local.has_peer(name)
