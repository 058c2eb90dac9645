"""The checked-in gRPC code in moeserve/api/ must equal a fresh ``make proto``."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeserve.api import generate as gen

pytest.importorskip("grpc_tools")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_text() for p in gen.generate(tmp_path)}
    checked_in = {
        p.relative_to(gen.API_ROOT): p.read_text() for p in gen.generated_files(gen.API_ROOT)
    }
    assert sorted(fresh) == sorted(checked_in), "generated file set differs: run `make proto`"
    stale = [str(name) for name, text in fresh.items() if checked_in[name] != text]
    assert not stale, f"stale generated code {stale}: run `make proto`"


def test_generated_modules_import_and_round_trip() -> None:
    from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc

    handle = worker_pb2.KVHandle(agent_name="p0", request_id="r", block_ids=[3, 1], num_tokens=70)
    event = worker_pb2.KVEvent(stored=worker_pb2.BlockStored(block_hashes=[2**64 - 1]))
    assert worker_pb2.KVHandle.FromString(handle.SerializeToString()) == handle
    assert worker_pb2.KVEvent.FromString(event.SerializeToString()).stored.block_hashes == [
        2**64 - 1
    ]
    assert common_pb2.HealthResponse.SERVING == 1
    assert hasattr(worker_pb2_grpc, "WorkerServicer")
