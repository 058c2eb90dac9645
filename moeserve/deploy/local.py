"""`moeserve up`: router + prefill + decode workers as local child processes.

Every child binds port 0 (or the router's ``--port``) and prints the address it got, so two
clusters on one machine never collide. Each child's command line names it (``moeserve worker
--role decode ...``). A child that dies is restarted with backoff on the same ports
(supervisor.py). Children die with us: SIGINT/SIGTERM stop them in order (workers drain), and
PR_SET_PDEATHSIG kills them if this process is killed outright.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from moeserve.deploy.supervisor import RestartPolicy, Supervisor, fixed_port_args

__all__ = ["LocalCluster", "add_up_parser", "ClusterSpec"]

_LISTEN = re.compile(
    r"moeserve (worker|router) listening on (\S+)(?: grpc (\S+))?(?: metrics (\S+))?"
)


def _die_with_parent() -> None:
    # Linux only: the kernel sends SIGTERM to the child when its parent thread exits.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class ClusterSpec:
    model: str | None = None
    prefill: int = 1
    decode: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "prefix"
    disagg_threshold: int = 0
    num_kv_blocks: int = 0
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 120.0
    metrics: bool = True
    # Per child name ("prefill-1", "decode-0", "router"): extra flags and environment, e.g.
    # a fault-injection switch or a different block size for one worker.
    child_args: dict[str, list[str]] = field(default_factory=dict)
    # Per role ("prefill", "decode"): flags for every worker of the pool (a manifest's
    # parallelism, block size) and how many DP ranks, each its own address, one child starts.
    role_args: dict[str, list[str]] = field(default_factory=dict)
    role_ranks: dict[str, int] = field(default_factory=dict)
    child_env: dict[str, dict[str, str]] = field(default_factory=dict)
    restart: bool = True
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    addresses: list[str] = field(default_factory=list)  # one per DP rank
    expected: int = 1
    grpc: str | None = None
    metrics: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class LocalCluster:
    """Start with ``start()`` (or as a context manager); ``url`` is the router's HTTP base."""

    def __init__(self, spec: ClusterSpec, log=sys.stderr):
        self.spec = spec
        self.log = log
        self.children: list[_Child] = []
        self.url = ""
        self.grpc_address = ""
        self.stopping = False
        self.supervisor: Supervisor | None = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _popen(self, args: list[str], extra_env: dict[str, str]) -> subprocess.Popen:
        # The console script, when installed, so `ps` shows `moeserve worker --role decode`.
        script = Path(sys.executable).parent / "moeserve"
        entry = [str(script)] if script.is_file() else ["-m", "moeserve.cli"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
        return subprocess.Popen(
            [sys.executable, *entry, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, preexec_fn=_die_with_parent,
        )  # fmt: skip

    def _spawn(self, name: str, args: list[str], expected: int = 1) -> _Child:
        args = [*args, *self.spec.child_args.get(name, [])]
        env = dict(self.spec.child_env.get(name, {}))
        child = _Child(name, self._popen(args, env), args, env, expected=expected)
        threading.Thread(target=self._pump, args=(child, child.proc), daemon=True).start()
        self.children.append(child)
        return child

    def _respawn(self, child: _Child) -> None:
        """Supervisor: the same command on the ports the child had."""
        if self.stopping:
            return
        ports = {"--port": _port(child.address), "--metrics-port": _port(child.metrics),
                 "--grpc-port": _port(child.grpc)}  # fmt: skip
        child.ready = threading.Event()
        child.proc = self._popen(fixed_port_args(child.args, ports), child.env)
        threading.Thread(target=self._pump, args=(child, child.proc), daemon=True).start()

    def _pump(self, child: _Child, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            m = _LISTEN.search(line)
            if m and not child.ready.is_set():
                child.address = child.address or m.group(2)
                child.grpc, child.metrics = child.grpc or m.group(3), child.metrics or m.group(4)
                if m.group(2) not in child.addresses:
                    child.addresses.append(m.group(2))
                if len(child.addresses) >= child.expected:
                    child.ready.set()
            if self.log is not None and "NIXL INFO" not in line:
                self.log.write(f"[{child.name}] {line}")
        child.ready.set()  # exited: wake waiters

    def _wait(self, children: list[_Child], deadline: float) -> None:
        for c in children:
            c.ready.wait(max(deadline - time.monotonic(), 0))
            if c.address is None:
                code = c.proc.poll()
                raise RuntimeError(f"{c.name} did not start (exit code {code})")

    def start(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.startup_timeout_s
        model = spec.model or str(_ensure_tiny_checkpoint())
        self.model = model
        common = ["--model", model, "--host", spec.host, "--port", "0"]
        if spec.num_kv_blocks:
            common += ["--num-kv-blocks", str(spec.num_kv_blocks)]
        if spec.metrics:
            common += ["--metrics-port", "0"]
        try:
            workers = [
                self._spawn(f"{role}-{i}", ["worker", "--role", role, *common,
                                            *spec.role_args.get(role, []), *spec.worker_args],
                            expected=spec.role_ranks.get(role, 1))  # fmt: skip
                for role, n in (("prefill", spec.prefill), ("decode", spec.decode))
                for i in range(n)
            ]
            self._wait(workers, deadline)
            addrs = {r: ",".join(a for c in workers if c.name.startswith(r) for a in c.addresses)
                     for r in ("prefill", "decode")}  # fmt: skip
            router = self._spawn("router", [
                "router", "--model", model, "--prefill", addrs["prefill"],
                "--decode", addrs["decode"], "--host", spec.host, "--port", str(spec.port),
                "--policy", spec.policy, "--disagg-threshold", str(spec.disagg_threshold),
                *spec.router_args,
            ])  # fmt: skip
            self._wait([router], deadline)
            self.url, self.grpc_address = router.address, router.grpc
            self._wait_healthy(deadline)
            if spec.restart:
                self.supervisor = Supervisor(
                    lambda: list(self.children), lambda c: c.proc.poll() is not None,
                    self._respawn, spec.restart_policy,
                )  # fmt: skip
                self.supervisor.start()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if any(c.proc.poll() is not None for c in self.children):
                raise RuntimeError("a child process exited during start-up")
            time.sleep(0.2)
        raise RuntimeError("router did not become healthy in time")

    def worker(self, name: str) -> _Child:
        return next(c for c in self.children if c.name == name)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Router first (no new work), then workers; SIGKILL whatever outlives the timeout."""
        self.stopping = True
        if self.supervisor is not None:
            self.supervisor.stop()
        for c in sorted(self.children, key=lambda c: c.name != "router"):
            if c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def failed_child(self) -> _Child | None:
        """A child that exited and will not be restarted (supervision off)."""
        if self.supervisor is not None:
            return None
        return next((c for c in self.children if c.proc.poll() is not None), None)


def _port(address: str | None) -> str:
    """"http://h:8000/metrics" or "h:8000" -> "8000" ("" when unknown)."""
    m = re.search(r":(\d+)(?:/|$)", address or "")
    return m.group(1) if m else ""


def _ensure_tiny_checkpoint() -> Path:
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


def _run_up(args: argparse.Namespace) -> int:
    if args.ray:  # the same topology as a Ray Serve application (moeserve.deploy.ray_cli)
        from moeserve.deploy.ray_cli import run_up_ray

        return run_up_ray(args)
    if args.address:
        raise ValueError("--address needs --ray")
    if args.file:  # the manifest's topology as local processes
        from moeserve.deploy.manifest_local import cluster_spec_from_manifest, load_manifest

        spec = cluster_spec_from_manifest(
            load_manifest(args.file), args.model, host=args.host, port=args.port,
            policy=args.policy, num_kv_blocks=args.num_kv_blocks,
        )
    else:
        spec = ClusterSpec(
            model=args.model, prefill=args.prefill, decode=args.decode, host=args.host,
            port=args.port, policy=args.policy, disagg_threshold=args.disagg_threshold,
            num_kv_blocks=args.num_kv_blocks,
        )  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        print(f"\nmoeserve is up: {cluster.url}  (gRPC {cluster.grpc_address})")
        print(f"model {cluster.model}")
        print(f"  curl {cluster.url}/v1/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"prompt\": \"Hello, MoE world\", \"max_tokens\": 16}}'")  # fmt: skip
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            dead = cluster.failed_child()
            if dead is not None:
                print(f"{dead.name} exited with {dead.proc.returncode}; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        cluster.stop()


def add_up_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = ClusterSpec()
    p = subparsers.add_parser("up", help="run router + prefill + decode workers locally")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model)")
    p.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers")
    p.add_argument("--decode", type=int, default=d.decode, help="decode workers")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="router HTTP port (0: any)")
    p.add_argument("--policy", default=d.policy, choices=["prefix", "round_robin", "random"])
    p.add_argument("--disagg-threshold", type=int, default=d.disagg_threshold)
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=d.num_kv_blocks,
        help="KV blocks per worker (0: engine default)",
    )
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve application")
    p.add_argument("-f", "--file", default=None,
                   help="MoEDeployment manifest: its topology as local processes, or on Ray "
                        "with --ray")
    p.add_argument("--local", action="store_true",
                   help="run as local processes (the default without --ray)")
    p.add_argument("--address", default=None, help="Ray cluster (with --ray; default: start one)")
    p.add_argument("--route-prefix", default="/", help="HTTP route of the app (with --ray)")
    p.set_defaults(func=_run_up)
    return p  # fmt: skip
