"""`moeserve up`: router + prefill + decode workers as local child processes.

Every child binds port 0 (or the router's ``--port``) and prints the address it got, so two
clusters on one machine never collide. Each child's command line names it (``moeserve worker
--role decode ...``). A child that dies is restarted with backoff on the same ports
(supervisor.py). Children die with us: SIGINT/SIGTERM stop them in order (workers drain), also
during start-up, and `moeserve up` then exits 0, quietly; PR_SET_PDEATHSIG kills them if this
process is killed outright.
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

from moeserve.common.errors import MoeServeError
from moeserve.common.optional import require
from moeserve.common.served_name import TINY_MODEL_NAME, served_model_name
from moeserve.deploy.supervisor import RestartPolicy, Supervisor, fixed_port_args

__all__ = ["LocalCluster", "add_up_parser", "ClusterSpec", "StartupError", "Interrupted"]

_LISTEN = re.compile(
    r"moeserve (worker|router) listening on (\S+)(?: grpc (\S+))?(?: metrics (\S+))?"
)


class StartupError(MoeServeError):
    """A child did not come up; its own output (above, prefixed with its name) says why."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while the cluster was starting."""


def _die_with_parent() -> None:
    # Linux only: the kernel sends SIGTERM to the child when its parent thread exits.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class ClusterSpec:
    model: str | None = None
    # None: the rule of moeserve.common.served_name for ``model``; passed to the workers as
    # --model-id (prefix-cache keys) and to the router.
    served_model_name: str | None = None
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
    pumps: list[threading.Thread] = field(default_factory=list)


class LocalCluster:
    """Start with ``start()`` (or as a context manager); ``url`` is the router's HTTP base."""

    def __init__(self, spec: ClusterSpec, log=sys.stderr, stop: threading.Event | None = None):
        """``stop``: when set during ``start()``, start-up gives up with :class:`Interrupted`."""
        self.spec = spec
        self.stop_requested = stop
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
        self._start_pump(child)
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
        self._start_pump(child)

    def _start_pump(self, child: _Child) -> None:
        pump = threading.Thread(target=self._pump, args=(child, child.proc), daemon=True)
        pump.start()
        child.pumps.append(pump)

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

    def _interrupted(self) -> bool:
        return self.stop_requested is not None and self.stop_requested.is_set()

    def _wait(self, children: list[_Child], deadline: float) -> None:
        for c in children:
            while not c.ready.wait(min(max(deadline - time.monotonic(), 0), 0.2)):
                if self._interrupted() or time.monotonic() >= deadline:
                    break
            if self._interrupted():
                raise Interrupted
            if c.address is None:
                code = c.proc.poll()
                why = f"exit code {code}" if code is not None else "no address in time"
                raise StartupError(f"{c.name} did not start ({why})")

    def start(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.startup_timeout_s
        # Before any child starts: one clear line, not a child's traceback.
        require("torch", "the workers `moeserve up` starts")
        if _uses_nixl(spec):
            require("nixl._api", "the KV hand-off between prefill and decode workers")
        model = spec.model or str(_ensure_tiny_checkpoint())
        self.model = model
        self.served_model_name = spec.served_model_name or served_model_name(model=spec.model)
        common = ["--model", model, "--model-id", self.served_model_name, "--host", spec.host,
                  "--port", "0"]  # fmt: skip
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
                "--served-model-name", self.served_model_name,
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
            if self._interrupted():
                raise Interrupted
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            dead = next((c for c in self.children if c.proc.poll() is not None), None)
            if dead is not None:
                raise StartupError(f"{dead.name} exited during start-up "
                                   f"(exit code {dead.proc.returncode})")  # fmt: skip
            time.sleep(0.2)
        raise StartupError("router did not become healthy in time")

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
        for c in self.children:  # their last lines (why one failed) reach the log
            for pump in c.pumps:
                pump.join(1.0)

    def failed_child(self) -> _Child | None:
        """A child that exited and will not be restarted (supervision off)."""
        if self.supervisor is not None:
            return None
        return next((c for c in self.children if c.proc.poll() is not None), None)


def _port(address: str | None) -> str:
    """"http://h:8000/metrics" or "h:8000" -> "8000" ("" when unknown)."""
    m = re.search(r":(\d+)(?:/|$)", address or "")
    return m.group(1) if m else ""


def _uses_nixl(spec: ClusterSpec) -> bool:
    """Workers register their KV cache with NIXL unless told --no-nixl."""
    if "--no-nixl" in spec.worker_args:
        return False
    return any("--no-nixl" not in spec.role_args.get(role, []) for role in ("prefill", "decode"))


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
            load_manifest(args.file), args.model, served_name=args.served_model_name,
            host=args.host, port=args.port, policy=args.policy, num_kv_blocks=args.num_kv_blocks,
        )  # fmt: skip
    else:
        spec = ClusterSpec(
            model=args.model, prefill=args.prefill, decode=args.decode, host=args.host,
            port=args.port, policy=args.policy, disagg_threshold=args.disagg_threshold,
            num_kv_blocks=args.num_kv_blocks,
            served_model_name=served_model_name(args.served_model_name, model=args.model),
        )  # fmt: skip
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
