"""`moeserve worker`'s command line, importable without torch, so that `moeserve --help`,
`moeserve router` and `moeserve operator` work on an install without the ``worker`` extra. What
runs a worker is imported when the command runs; without torch that is one line naming the
extra.
"""

from __future__ import annotations

import argparse
import os

from moeserve.common.launch_plan import WORKER_DRAIN_GRACE_S
from moeserve.common.optional import require
from moeserve.common.tls import add_tls_arguments
from moeserve.common.worker_auth import add_worker_auth_arguments
from moeserve.worker.engine_args import add_engine_args
from moeserve.worker.env_defaults import apply_env_defaults
from moeserve.worker.faults import ENV_VAR

__all__ = ["ROLES", "add_worker_parser", "require_engine"]

ROLES = ("prefill", "decode", "both")


def require_engine(needed_for: str) -> None:
    """Fail with the ``worker`` extra's install command when torch is missing."""
    require("torch", needed_for)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_worker_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("worker", help="serve one engine over gRPC (prefill/decode/both)")
    add_engine_args(p, model_required=True)
    p.add_argument("--role", choices=ROLES, default="both")
    add_tls_arguments(p)
    add_worker_auth_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--advertise-host", default=None, help="host peers use to reach this worker")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--nixl", action=argparse.BooleanOptionalAction, default=True,
                   help="register the KV cache with NIXL for disaggregated transfer")
    p.add_argument("--nixl-threads", type=_non_negative_int, default=4,
                   help="UCX backend threads that split a large KV READ (0: one)")
    p.add_argument("--kv-lease-s", type=float, default=30.0,
                   help="release pinned prefill KV not collected within this time")
    p.add_argument("--kv-timeout-s", type=float, default=10.0,
                   help="give up a KV READ after this long and recompute")
    p.add_argument("--max-queued", type=int, default=1024,
                   help="requests held at once (running or waiting); more get RESOURCE_EXHAUSTED")
    p.add_argument("--drain-grace-s", type=float, default=float(WORKER_DRAIN_GRACE_S),
                   help="on SIGTERM, finish held requests within this time, then exit")
    p.add_argument("--faults", default=None,
                   help=f"test fault injection, e.g. stall_prefill_s=30 (default ${ENV_VAR})")
    p.set_defaults(func=_run_worker)
    apply_env_defaults(p, os.environ)  # last: the operator's MOESERVE_* env; flags still win
    return p  # fmt: skip


def usable_kernel_cache(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Point TRITON_CACHE_DIR at a directory this process can write: a shared cache mounted
    read-only or owned by another user (a node directory the worker's uid cannot write)
    would make every compilation fail. Falls back to a private one under the temp dir;
    returns a warning naming why, or None when the configured one is usable."""
    configured = env.get("TRITON_CACHE_DIR")
    if not configured:
        return None
    try:
        os.makedirs(configured, exist_ok=True)
        probe = os.path.join(configured, f".write-probe-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
        return None
    except OSError as e:
        import tempfile

        fallback = os.path.join(tempfile.gettempdir(), "moeserve-triton-cache")
        env["TRITON_CACHE_DIR"] = fallback
        return (f"kernel cache {configured} is not writable ({e.strerror or e}): compiling "
                f"into {fallback}, which this pod loses; kernels compile again at every start")


def _run_worker(args: argparse.Namespace) -> int:
    require_engine("the engine a worker serves")
    warning = usable_kernel_cache()  # before Triton is imported: it reads the variable once
    if warning:
        import logging

        logging.getLogger("moeserve.worker").warning("%s", warning)
    from moeserve.common import aio
    from moeserve.worker.server import serve_worker

    return aio.run(serve_worker(args)) or 0
