"""gRPC code generated from proto/moeserve/v1 (never edited by hand; ``make proto``).

``from moeserve.api import worker_pb2, worker_pb2_grpc`` resolves lazily to the generated
``moeserve.api.moeserve.v1`` modules, so importing this package has no side effects and
``python -m moeserve.api.generate`` works even when the generated code is missing or stale.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "common_pb2",
    "router_pb2",
    "router_pb2_grpc",
    "worker_pb2",
    "worker_pb2_grpc",
]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"moeserve.api.moeserve.v1.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
