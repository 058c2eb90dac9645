"""`moeserve up`: its command line. Every form runs a MoEDeployment: the manifest given with
``-f``, or, without one, the equivalent manifest of ``--model`` / ``--prefill`` / ``--decode``
(``manifest_local.model_deployment``), so plain `up`, `up -f` and the operator launch workers
from the same plan with the same defaults. Local processes by default (``local.LocalCluster``),
Ray Serve with ``--ray`` (``ray_cli``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from moeserve.common.served_name import TINY_MODEL_NAME
from moeserve.deploy.local import ClusterSpec, LocalCluster
from moeserve.deploy.manifest_local import (
    LAPTOP_DISAGG_THRESHOLD,
    cluster_spec_from_manifest,
    load_manifest,
    model_deployment,
)
from moeserve.deploy.up_flags import add_forwarded_args, forwarded_argv, with_engine_args

__all__ = ["add_up_parser"]


def _cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    if args.file:  # the manifest's topology as local processes
        dep = load_manifest(args.file)
    else:
        dep = model_deployment(args.model, args.prefill, args.decode,
                               disagg_threshold=args.disagg_threshold)  # fmt: skip
    engine_argv, router_argv = forwarded_argv(args)
    return cluster_spec_from_manifest(
        with_engine_args(dep, engine_argv), args.model, served_name=args.served_model_name,
        host=args.host, port=args.port, policy=args.policy, num_kv_blocks=args.num_kv_blocks,
        insecure_worker_plane=args.insecure_worker_plane, router_args=router_argv,
    )  # fmt: skip


def _run_up(args: argparse.Namespace) -> int:
    if args.ray:  # the same topology as a Ray Serve application (moeserve.deploy.ray_cli)
        from moeserve.deploy.ray_cli import run_up_ray

        return run_up_ray(args)
    if args.address:
        raise ValueError("--address needs --ray")
    spec = _cluster_spec(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster(spec, stop=stop)
    try:
        cluster.start()
        print(f"\nmoeserve is up: {cluster.url}  (gRPC {cluster.grpc_address})")
        print(f"model {cluster.served_model_name} ({cluster.model})")
        print(f"  curl {cluster.url}/v1/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"prompt\": \"Hello, MoE world\", \"max_tokens\": 16}}'")  # fmt: skip
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            dead = cluster.failed_child()
            if dead is not None:
                print(f"{dead.name} exited with {dead.proc.returncode}; stopping", file=sys.stderr)
                return 1
        return 0
    except Exception:  # Interrupted, StartupError, or one the stop itself caused
        if stop.is_set():  # stopped during start-up: children exiting early is expected
            return 0
        raise
    finally:
        cluster.stop()
        if stop.is_set():  # a late second signal must not kill the interpreter's teardown
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)


def add_up_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = ClusterSpec()
    p = subparsers.add_parser("up", help="run router + prefill + decode workers locally")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the "
                        "manifest's spec.model.name, else the checkpoint directory's name, "
                        f"else {TINY_MODEL_NAME!r})")
    p.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers")
    p.add_argument("--decode", type=int, default=d.decode, help="decode workers")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="router HTTP port (0: any)")
    p.add_argument("--policy", default=d.policy, choices=["prefix", "round_robin", "random"])
    p.add_argument("--disagg-threshold", type=int, default=LAPTOP_DISAGG_THRESHOLD,
                   help="without -f: uncached prompt tokens below which the decode worker "
                        "prefills locally (with -f: the manifest's spec.router.disaggThreshold)")
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=d.num_kv_blocks,
        help="KV blocks per worker (0: engine default)",
    )
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve application")
    p.add_argument("--insecure-worker-plane", action="store_true",
                   help="development only: start router and workers without worker-plane "
                        "tokens (default: a fresh secret per start, passed in their env)")
    p.add_argument("-f", "--file", default=None,
                   help="MoEDeployment manifest: its topology as local processes, or on Ray "
                        "with --ray")
    p.add_argument("--local", action="store_true",
                   help="run as local processes (the default without --ray)")
    p.add_argument("--address", default=None, help="Ray cluster (with --ray; default: start one)")
    p.add_argument("--route-prefix", default="/", help="HTTP route of the app (with --ray)")
    add_forwarded_args(p)  # last: `up`'s own flags keep their meaning
    p.set_defaults(func=_run_up)
    return p  # fmt: skip
