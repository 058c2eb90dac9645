"""Issue 22 item 6: a restarted router keeps its gRPC port; a stream cut by shutdown says so."""

from __future__ import annotations

import argparse

from moeserve.deploy.supervisor import fixed_port_args
from moeserve.router.server import add_router_parser


def _router_flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_router_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_restarted_router_keeps_the_grpc_port_it_got() -> None:
    # What `moeserve up` starts the router with: --grpc-port is left to its default (0).
    argv = ["router", "--model", "m", "--decode", "h:1", "--port", "8000"]
    ports = {"--port": "8000", "--metrics-port": "", "--grpc-port": "43117"}
    args = _router_flags(fixed_port_args(argv, ports))
    assert args.grpc_port == 43117 and args.port == 8000


def test_an_explicit_port_is_not_overridden() -> None:
    argv = ["router", "--grpc-port", "5000"]
    assert fixed_port_args(argv, {"--grpc-port": "43117"}) == argv
