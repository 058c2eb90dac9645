"""`moeserve up`'s cluster: router + prefill + decode workers as local child processes.

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
from moeserve.common.launch_plan import (
    STARTUP_TIMEOUT_S,
    Placement,
    WorkerLaunch,
    pool_launch,
    worker_launch,
)
from moeserve.common.listen_line import LISTEN_LINE
from moeserve.common.optional import require
from moeserve.common.served_name import served_model_name
from moeserve.common.spec import ENV_METRICS_KEYS, MoEDeployment, Role
from moeserve.common.worker_auth import (
    ENV_INSECURE,
    HEADER,
    ROUTER_SECRET_ENV,
    PlaneSecret,
)
from moeserve.deploy.supervisor import RestartPolicy, Supervisor, fixed_port_args
from moeserve.deploy.up_flags import shared_gpu_args
from moeserve.router.auth import keys_from_sources

__all__ = ["LocalCluster", "ClusterSpec", "StartupError", "Interrupted", "local_launch",
           "LAPTOP_DISAGG_THRESHOLD"]

# A named override of the spec's default (spec.router.disaggThreshold, 256) for `moeserve up`
# without a manifest: it runs the embedded tiny model, whose prompts are a few tokens, so with
# the cluster default no prompt would ever reach the prefill worker `up` starts beside the
# decode worker. A manifest (`up -f`) keeps its own value.
LAPTOP_DISAGG_THRESHOLD = 0


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
    """A local topology. With ``deployment`` (every `moeserve up`), workers are launched from
    its pools through the launch plan; without it (tests), from the flags below."""

    deployment: MoEDeployment | None = None
    model: str | None = None
    # None: the rule of moeserve.common.served_name for ``model``; passed to the workers as
    # --model-id (prefix-cache keys) and to the router.
    served_model_name: str | None = None
    prefill: int = 1
    decode: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "prefix"
    disagg_threshold: int = LAPTOP_DISAGG_THRESHOLD
    num_kv_blocks: int = 0
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    metrics: bool = True
    # Per child name ("prefill-1", "decode-0", "router"): extra flags and environment, e.g.
    # a fault-injection switch or a different block size for one worker.
    child_args: dict[str, list[str]] = field(default_factory=dict)
    # Per role ("prefill", "decode"): flags for every worker of the pool (without a
    # deployment) and how many DP ranks, each its own address, one child starts.
    role_args: dict[str, list[str]] = field(default_factory=dict)
    role_ranks: dict[str, int] = field(default_factory=dict)
    child_env: dict[str, dict[str, str]] = field(default_factory=dict)
    restart: bool = True
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # Development only: no worker-plane tokens (`up --insecure-worker-plane`).
    insecure_worker_plane: bool = False


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
        # One secret per start, handed to the children in their environment (not argv).
        self.plane = None if spec.insecure_worker_plane else PlaneSecret.generate()

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

    def _spawn(self, name: str, args: list[str], expected: int = 1,
               env: dict[str, str] | None = None) -> _Child:  # fmt: skip
        args = [*args, *self.spec.child_args.get(name, [])]
        env = {**(env or {}), **self.spec.child_env.get(name, {})}
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
            m = LISTEN_LINE.search(line)
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

    def secret_env(self, names: tuple[str, ...]) -> dict[str, str]:
        """A child's worker-plane variables: its tokens, or the development opt-out."""
        return {ENV_INSECURE: "1"} if self.plane is None else self.plane.env(names)

    def metrics_env(self) -> dict[str, str]:
        """Workers' metrics keys: the router's API keys when its metrics want one
        (``--api-key-metrics`` among the router flags), so a scraper sends every port the same
        key; nothing (open, like the router's) otherwise."""
        p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        p.add_argument("--api-key", action="append", default=[])
        p.add_argument("--api-key-metrics", action="store_true")
        flags, _ = p.parse_known_args(self.spec.router_args)
        keys = keys_from_sources(flags.api_key) if flags.api_key_metrics else []
        return {ENV_METRICS_KEYS: ",".join(keys)} if keys else {}

    def auth_metadata(self, role: str = "router") -> tuple[tuple[str, str], ...]:
        """gRPC metadata that lets a test call the workers as the router (or as a peer)."""
        if self.plane is None:
            return ()
        return ((HEADER, self.plane.router_token if role == "router"
                 else self.plane.worker_token),)  # fmt: skip

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

    def _worker_launches(self, model: str) -> list[tuple[str, WorkerLaunch, int]]:
        """(child name, launch, DP ranks it serves) of every worker child."""
        spec = self.spec
        out = []
        for role, n in (("prefill", spec.prefill), ("decode", spec.decode)):
            for i in range(n):
                if spec.deployment is not None:
                    launch = local_launch(spec, role, i, model)
                else:
                    launch = WorkerLaunch(["worker", "--role", role, *self._common_args(model),
                                           *spec.role_args.get(role, []), *spec.worker_args],
                                          {})  # fmt: skip
                out.append((f"{role}-{i}", launch, spec.role_ranks.get(role, 1)))
        return self._split_shared_gpu(out)

    def _split_shared_gpu(self, launches: list[tuple[str, WorkerLaunch, int]],
                          ) -> list[tuple[str, WorkerLaunch, int]]:  # fmt: skip
        """Workers without a --device all take the default CUDA device: with no utilization
        given, each gets its part of the default so they fit together."""
        on_default = [i for i, (_, launch, _) in enumerate(launches)
                      if "--device" not in launch.argv]  # fmt: skip
        flags, line = shared_gpu_args([launches[i][1].argv for i in on_default])
        if line is not None and self.log is not None:
            self.log.write(f"[up] {line}\n")
        out = list(launches)
        for i in on_default if flags else ():
            name, launch, ranks = out[i]
            out[i] = (name, WorkerLaunch([*launch.argv, *flags], launch.env), ranks)
        return out

    def _common_args(self, model: str) -> list[str]:
        spec = self.spec
        common = ["--model", model, "--model-id", self.served_model_name, "--host", spec.host,
                  "--port", "0"]  # fmt: skip
        if spec.num_kv_blocks:
            common += ["--num-kv-blocks", str(spec.num_kv_blocks)]
        if spec.metrics:
            common += ["--metrics-port", "0"]
        return common

    def start(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.startup_timeout_s
        # Before any child starts: one clear line, not a child's traceback.
        require("torch", "the workers `moeserve up` starts")
        model = spec.model or str(_ensure_tiny_checkpoint())
        self.model = model
        self.served_model_name = spec.served_model_name or served_model_name(model=spec.model)
        launches = self._worker_launches(model)
        # Workers register their KV cache with NIXL unless told --no-nixl.
        if any("--no-nixl" not in launch.argv for _, launch, _ in launches):
            require("nixl._api", "the KV hand-off between prefill and decode workers")
        try:
            workers = [self._spawn(name, launch.argv, expected,
                                   {**launch.env, **self.secret_env(launch.secret_env),
                                    **self.metrics_env()})
                       for name, launch, expected in launches]  # fmt: skip
            self._wait(workers, deadline)
            addrs = {r: ",".join(a for c in workers if c.name.startswith(r) for a in c.addresses)
                     for r in ("prefill", "decode")}  # fmt: skip
            router = self._spawn("router", [
                "router", "--model", model, "--prefill", addrs["prefill"],
                "--decode", addrs["decode"], "--host", spec.host, "--port", str(spec.port),
                "--served-model-name", self.served_model_name,
                "--policy", spec.policy, "--disagg-threshold", str(spec.disagg_threshold),
                *spec.router_args,
            ], env=self.secret_env(ROUTER_SECRET_ENV))  # fmt: skip
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


def _ensure_tiny_checkpoint() -> Path:
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


def local_launch(spec: ClusterSpec, role: Role, group: int, model: str) -> WorkerLaunch:
    """The launch plan placed in one child process: the whole EP group (all its ranks) in the
    child, the rendezvous on a free local port, any free ports for gRPC and metrics."""
    assert spec.deployment is not None
    pool = spec.deployment.spec.pool(role)
    address = ["--host", spec.host, "--port", "0"]
    if spec.metrics:
        address += ["--metrics-port", "0"]
    where = Placement(ranks_per_process=pool.parallelism.ep, group=group, rank=0,
                      address_args=tuple(address))  # fmt: skip
    launch = worker_launch(pool_launch(spec.deployment, role, model, spec.num_kv_blocks), where)
    return WorkerLaunch([*launch.argv, *spec.worker_args], launch.env)
