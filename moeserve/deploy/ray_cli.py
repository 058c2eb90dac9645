"""`moeserve up --ray` and `moeserve ray status`: the Serve application on a Ray cluster.

Without ``--address`` a local Ray instance is started (loopback, a few logical CPUs) and stopped
again on Ctrl-C / SIGTERM, after the application is deleted, so nothing is left running. Stopping
is bounded (``STOP_BUDGET_S``, inside Kubernetes' default 30 s grace period) whatever state the
application is in, also while it is still deploying, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from moeserve.common.errors import UnavailableError
from moeserve.common.launch_plan import STARTUP_TIMEOUT_S
from moeserve.common.optional import require
from moeserve.common.served_name import with_served_name
from moeserve.common.spec import MoEDeployment
from moeserve.deploy.up_flags import forwarded_argv, with_engine_args

__all__ = ["RayCluster", "RayClusterSpec", "run_up_ray", "add_ray_parser", "pool_status",
           "connect", "STOP_BUDGET_S"]

# Whole stop (app deletion, Ray shutdown, stragglers), inside Kubernetes' default 30 s grace.
STOP_BUDGET_S = 20.0
# Of it, how long replicas may take to drain before Ray is shut down under them.
_DELETE_WAIT_S = 8.0
_RAY_NEEDED_FOR = "it runs moeserve on Ray"


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while the application was deploying."""


@dataclass
class RayClusterSpec:
    deployment: MoEDeployment
    address: str | None = None  # None: start a local Ray instance
    host: str = "127.0.0.1"
    port: int = 8000
    num_cpus: float | None = None  # local instance only; default from the spec's groups
    num_kv_blocks: int = 0
    route_prefix: str = "/"  # another prefix lets two deployments share one Serve proxy
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    ray_init_kwargs: dict[str, Any] = field(default_factory=dict)
    insecure_worker_plane: bool = False  # development only: no worker-plane tokens
    router_argv: tuple[str, ...] = ()  # `up --ray`'s router flags (over the manifest's)


class RayCluster:
    """Deploy with ``start()`` (or as a context manager); ``url`` is the OpenAI base URL."""

    def __init__(self, spec: RayClusterSpec, stop: threading.Event | None = None):
        """``stop``: set on SIGINT/SIGTERM once Ray is up (see ``_catch_signals``)."""
        self.spec = spec
        self.stop_requested = stop
        self.dep = spec.deployment
        self.app_name = f"moeserve-{self.dep.name}"
        self.url = ""
        self.gcs_address = ""
        self._started_ray = False
        self._served = False  # healthy once: only then are there requests to drain
        self._deploying = False  # a stop signal now interrupts the blocking Serve calls

    def __enter__(self) -> RayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ray = require("ray", _RAY_NEEDED_FOR)
        serve = require("ray.serve", _RAY_NEEDED_FOR)

        from moeserve.deploy.ray_app import required_cpus

        spec = self.spec
        port = spec.port or _free_port(spec.host)
        try:
            if spec.address is None:
                cpus = spec.num_cpus or required_cpus(self.dep)
                # Ray on Linux advertises the node's interface address, never loopback: the
                # workers bind that; only the HTTP proxy binds ``host``.
                with _sigint_ignored_by_children():
                    ctx = ray.init(num_cpus=max(int(cpus + 0.999), 1), include_dashboard=False,
                                   namespace="moeserve-up", **spec.ray_init_kwargs)  # fmt: skip
                self._started_ray = True
            else:
                ctx = connect(spec.address, "moeserve-up", **spec.ray_init_kwargs)
            self._catch_signals()
            if self.stop_requested is not None and self.stop_requested.is_set():
                raise Interrupted  # arrived during ray.init
            self.gcs_address = ctx.address_info["gcs_address"]
            serve.start(http_options={"host": spec.host, "port": port})
            port = _serve_http_port(port)
            self.deploy()
            self.url = f"http://{spec.host}:{port}{spec.route_prefix.rstrip('/')}"
            self._wait_healthy(time.monotonic() + spec.startup_timeout_s)
            self._deploying = False
        except BaseException:
            self.stop()
            raise

    def _catch_signals(self) -> None:
        # ray.init installs a handler that logs SIGTERM and then aborts the process, which would
        # skip our clean-up: ours must come after it.
        # serve.run(blocking=False) still waits until the application runs (minutes while a
        # real checkpoint loads), so during deployment the handler raises to cut it short.
        event = self.stop_requested
        if event is None or threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: object) -> None:
            event.set()
            if self._deploying:
                self._deploying = False
                raise Interrupted

        self._deploying = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    def deploy(self, deployment: MoEDeployment | None = None) -> None:
        """(Re)deploy; a spec differing only in pool sizes just adds or removes groups."""
        from ray import serve

        from moeserve.deploy.ray_app import build_app

        self.dep = deployment or self.dep
        app = build_app(self.dep, self.spec.num_kv_blocks, self.spec.startup_timeout_s,
                        self.spec.insecure_worker_plane, self.spec.router_argv)
        serve.run(app, name=self.app_name, route_prefix=self.spec.route_prefix, blocking=False)

    def _wait_healthy(self, deadline: float) -> None:
        from ray import serve

        while time.monotonic() < deadline:
            if self.stop_requested is not None and self.stop_requested.is_set():
                raise Interrupted
            app = serve.status().applications.get(self.app_name)
            if app is not None and app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"Serve could not deploy {self.app_name}: {app.message}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self._served = True
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.app_name} did not become healthy in time")

    def stop(self, budget_s: float = STOP_BUDGET_S) -> None:
        """Delete the app (replicas drain), then stop the Ray instance if we started it; all
        within ``budget_s``. serve.delete and serve.shutdown wait for replicas without bound
        (one still constructing holds them for its whole start-up), so neither is waited on
        past the budget: ray.shutdown and ``reap`` end what is left."""
        self._deploying = False  # a second signal must not cut the clean-up short
        if "ray" not in sys.modules:  # never imported: nothing was started
            return
        import ray

        if not ray.is_initialized():
            return
        deadline = time.monotonic() + budget_s
        # Still deploying: replicas are loading, not serving; waiting for them only delays.
        self._delete_app(min(_DELETE_WAIT_S, budget_s / 2) if self._served else 0.0)
        ours = {}
        if self._started_ray:
            ours = {p: c for p, c in descendants(os.getpid()).items() if "ray" in c}
        ray.shutdown()  # stops the local instance's processes when this driver started it
        # Ray 2.x leaves the raylet's agents (DashboardAgent, RuntimeEnvAgent) running after
        # the raylet is gone; what we started, we stop.
        # reap waits up to three times its grace (wait, SIGTERM, SIGKILL).
        reap(list(ours), grace_s=max((deadline - time.monotonic()) / 3, 1.0))

    def _delete_app(self, wait_s: float) -> None:
        from ray import serve

        deadline = time.monotonic() + wait_s
        with contextlib.suppress(Exception):
            serve.delete(self.app_name, _blocking=False)
            while time.monotonic() < deadline:
                if self.app_name not in serve.status().applications:
                    return
                time.sleep(0.2)


@contextlib.contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Ctrl-C signals the terminal's whole process group, the Ray instance we start included:
    its processes would die in any order and print each other's tracebacks while this driver
    stops them in order. An ignored SIGINT is inherited through exec, so the instance's
    processes (and the workers they start) leave Ctrl-C to us. Ours is back right after; one
    arriving meanwhile is lost (press again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def connect(address: str, namespace: str, **kwargs: Any) -> Any:
    """ray.init(address=...) for a second driver. A local instance that `ray.init()` started
    requires its token (~/.ray/auth_token) but a connecting driver sends it only in token
    mode; Ray's own `ray start` turns that mode on when the token exists, and so do we."""
    import ray

    with contextlib.suppress(ImportError):
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return ray.init(address=address, namespace=namespace, **kwargs)


def _serve_http_port(asked: int) -> int:
    """The proxy's real port: a Serve instance that was already running keeps its own."""
    with contextlib.suppress(Exception):
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    return asked


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid``, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                out[child] = cmd.decode(errors="replace")
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def reap(pids: list[int], grace_s: float = 5.0) -> None:
    """Wait for ``pids`` to exit; SIGTERM, then SIGKILL, whatever outlives the grace period."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        for p in pids if sig is not None else []:
            if alive(p):
                with contextlib.suppress(OSError):
                    os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while any(alive(p) for p in pids):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            return


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pool_status(app_name: str | None = None) -> list[dict[str, Any]]:
    """Per pool: Serve's replica states and the groups whose every rank actor answers."""
    import ray
    from ray import serve

    from moeserve.deploy.ray_workers import NAMESPACE, list_rank_actors

    rows = []
    for name, app in serve.status().applications.items():
        if app_name is not None and name != app_name:
            continue
        dep_name = name.removeprefix("moeserve-")
        ranks: dict[tuple[str, str], list[bool]] = {}
        for actor in list_rank_actors(dep_name):
            _, role, group, _rank = actor.split("/")
            try:
                ray.get(ray.get_actor(actor, namespace=NAMESPACE).info.remote(), timeout=2)
                ok = True
            except Exception:
                ok = False
            ranks.setdefault((role, group), []).append(ok)
        for dname, d in app.deployments.items():
            groups = [all(v) for (role, _), v in ranks.items() if role == dname]
            rows.append({
                "app": name, "pool": dname, "status": str(d.status),
                "replicas": dict(d.replica_states), "groups": len(groups),
                "ready_groups": sum(groups),
            })  # fmt: skip
    return rows


def run_up_ray(args: argparse.Namespace) -> int:
    from moeserve.deploy.ray_app import load_deployment

    require("ray.serve", _RAY_NEEDED_FOR)  # before any work: one line naming the extra
    dep = load_deployment(args.file, args.model, args.prefill, args.decode)
    dep = with_served_name(dep, getattr(args, "served_model_name", None))
    engine_argv, router_argv = forwarded_argv(args)
    dep = with_engine_args(dep, engine_argv)
    stop = threading.Event()
    if not args.route_prefix.startswith("/"):
        raise ValueError(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    cluster = RayCluster(RayClusterSpec(dep, args.address, args.host, args.port,
                                        num_kv_blocks=args.num_kv_blocks,
                                        route_prefix=args.route_prefix,
                                        insecure_worker_plane=args.insecure_worker_plane,
                                        router_argv=tuple(router_argv)),
                         stop)  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):  # until ray.init; RayCluster re-installs them
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        try:
            cluster.start()
        except Interrupted:
            return 0
        except SystemExit as e:
            # SIGTERM inside ray.init: Ray's own handler exits with the signal's number.
            if e.code == signal.SIGTERM:
                return 0
            raise
        except Exception:
            # Ctrl-C reaches Ray's own processes too: a start-up they fail is the stop asked for.
            if stop.is_set():
                return 0
            raise
        print(f"\nmoeserve is up on Ray: {cluster.url}/v1  (app {cluster.app_name}, "
              f"Ray {cluster.gcs_address})")
        print(f"  curl {cluster.url}/v1/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"prompt\": \"Hello, MoE world\", \"max_tokens\": 16}}'")
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        cluster.stop()


def _run_status(args: argparse.Namespace) -> int:
    ray = require("ray", _RAY_NEEDED_FOR)

    address = args.address or "auto"
    try:
        connect(address, "moeserve-status", log_to_driver=False)
    except ConnectionError as e:
        raise UnavailableError(f"no Ray cluster at {address}: {e}") from None
    try:
        rows = pool_status(args.app)
    finally:
        ray.shutdown()
    if not rows:
        print("no moeserve application on this Ray cluster")
        return 1
    print(f"{'APP':<24} {'POOL':<8} {'STATUS':<10} {'GROUPS':>6} {'READY':>6}  REPLICAS")
    for r in rows:
        status = r["status"].rsplit(".", 1)[-1]
        print(f"{r['app']:<24} {r['pool']:<8} {status:<10} {r['groups']:>6} "
              f"{r['ready_groups']:>6}  {r['replicas']}")
    return 0


def add_ray_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ray", help="moeserve applications on a Ray cluster")
    sub = p.add_subparsers(dest="ray_command", required=True)
    st = sub.add_parser("status", help="pools, replicas and ready EP groups")
    st.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    st.add_argument("--app", default=None, help="only this Serve application")
    st.set_defaults(func=_run_status)
    return p


if __name__ == "__main__":  # pragma: no cover - convenience for debugging
    sys.exit(0)
