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


def _floor(requirement: str) -> tuple[int, ...]:
    """'grpcio>=1.72.2' -> (1, 72, 2), from pyproject's dependency list."""
    import tomllib

    deps = tomllib.loads((gen.REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.split(">=")[0].strip() == requirement]
    return tuple(int(x) for x in spec.split(">=")[1].split(";")[0].strip().split("."))


def _generated_version(pattern: str) -> tuple[int, ...]:
    import re

    found = {
        m.group(1)
        for p in gen.generated_files(gen.API_ROOT)
        if p.suffix == ".py"
        for m in [re.search(pattern, p.read_text())]
        if m
    }
    assert len(found) == 1, f"generated files disagree on {pattern}: {found}"
    return tuple(int(x) for x in found.pop().split("."))


def test_dependency_floors_are_what_the_generated_code_needs() -> None:
    # The stubs raise at import under an older runtime than their generator, so a floor below
    # the generator's version lets pip install a combination that cannot start.
    assert _floor("grpcio") == _generated_version(r"GRPC_GENERATED_VERSION = '([\d.]+)'")
    assert _floor("grpcio-health-checking") == _floor("grpcio")
    assert _floor("protobuf") == _generated_version(r"# Protobuf Python Version: ([\d.]+)")
    assert _floor("grpcio") == tuple(int(x) for x in gen.GRPCIO_TOOLS_VERSION.split("."))
