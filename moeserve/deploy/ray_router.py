"""The router as a Serve deployment: `moeserve router`'s code with workers found through Ray.

``RayWorkerPool`` is the router's ``WorkerPool`` with one more source of truth for *which*
workers exist: the named rank actors of the deployment (ray_workers.list_rank_actors), polled
every ``discovery_interval_s``. Everything else is unchanged: each worker gets one gRPC watcher
(health + KV events feed the prefix index), and a broken stream marks it down at once. A rank
actor that Ray restarted comes back on a new port; the old address leaves the pool and the new
one joins it on the next poll.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from moeserve.common.errors import UnavailableError
from moeserve.common.launch_plan import STARTUP_TIMEOUT_S
from moeserve.common.worker_auth import ENV_INSECURE, WorkerAuth, worker_auth_from_env
from moeserve.router.metrics import RouterMetrics
from moeserve.router.prefix_index import PrefixIndex
from moeserve.router.workers import WorkerPool

__all__ = ["RAY_REFUSED_ROUTER_FLAGS", "RayWorkerPool", "RouterDeployment", "parse_router_argv"]

logger = logging.getLogger(__name__)


class RayWorkerPool(WorkerPool):
    def __init__(self, deployment: str, index: PrefixIndex, metrics: RouterMetrics,
                 discovery_interval_s: float = 0.5, auth: WorkerAuth | None = None,
                 **probes: float):  # fmt: skip
        """``probes``: WorkerPool's probe_interval_s / eject_base_s / eject_max_s."""
        super().__init__([], [], index, metrics, auth=auth, **probes)
        self.deployment = deployment
        self.discovery_interval_s = discovery_interval_s
        self._known: dict[str, tuple[str, str]] = {}  # actor name -> (address, role)
        self._handles: dict[str, Any] = {}
        self._discovery: asyncio.Task | None = None

    def start(self) -> None:
        super().start()
        self._discovery = asyncio.create_task(self._discover_forever(), name="ray discovery")

    async def close(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._discovery
        await super().close()

    async def _discover_forever(self) -> None:
        while True:
            try:
                await self.discover()
            except asyncio.CancelledError:
                raise
            except Exception:  # the GCS may be briefly unreachable; the next poll retries
                logger.exception("worker discovery through Ray failed")
            await asyncio.sleep(self.discovery_interval_s)

    async def discover(self) -> None:
        """One poll: add new or moved rank actors, drop the ones that are gone."""
        import ray

        from moeserve.deploy.ray_workers import NAMESPACE, list_rank_actors

        names = await asyncio.to_thread(list_rank_actors, self.deployment)
        for name in names:
            if name not in self._handles:
                with contextlib.suppress(ValueError):  # died between list and lookup
                    self._handles[name] = await asyncio.to_thread(
                        ray.get_actor, name, namespace=NAMESPACE)

        async def ask(name: str) -> tuple[str, Any]:
            try:
                return name, await asyncio.wait_for(self._handles[name].info.remote(), 2.0)
            except Exception:  # restarting or dead: keep what we knew until it answers again
                return name, None

        answers = await asyncio.gather(*(ask(n) for n in names if n in self._handles))
        for name, info in answers:
            if info is not None:
                self._known[name] = (info.address, info.role)
        for name in list(self._known):
            if name not in names:
                del self._known[name]
                self._handles.pop(name, None)
        # The seam every discovery source feeds (Kubernetes too: router/discovery_k8s.py).
        self.set_workers({address: role for address, role in self._known.values()})

    async def wait_for_decode(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.healthy("decode") or self.model_info() is None:
            if loop.time() > deadline:
                raise UnavailableError(f"no decode worker became healthy in {timeout_s} s")
            await asyncio.sleep(0.2)


# `moeserve router` flags that mean nothing inside Serve: its proxy owns the HTTP server and
# the port; workers are found through Ray. Given anyway, they are refused, never ignored.
RAY_REFUSED_ROUTER_FLAGS = ("--header-timeout-s", "--keep-alive-timeout-s", "--config",
                            "--prefill", "--decode")


def parse_router_argv(argv: list[str]) -> argparse.Namespace:
    """The router's own parser over ``argv`` (one reading of every flag for both targets);
    a flag it does not know, or one Serve cannot honour, is a ValueError naming it."""
    from moeserve.router.config import fill_flag_defaults
    from moeserve.router.server import add_router_parser

    for flag in argv:
        if flag.split("=", 1)[0] in RAY_REFUSED_ROUTER_FLAGS:
            raise ValueError(f"router flag {flag.split('=', 1)[0]} does not apply on Ray "
                             "(Serve's proxy serves HTTP; workers are found through Ray)")
    parser = add_router_parser(argparse.ArgumentParser(prog="moeserve").add_subparsers())
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"router flags {' '.join(argv)!r}: {e}") from None
    if unknown:
        raise ValueError(f"unknown router flags: {' '.join(unknown)}")
    fill_flag_defaults(args)  # as resolve_router_config does (no --config file here)
    return args


class RouterDeployment:
    """Serve ingress replica: builds the pool, Router and Frontend on the replica's loop, then
    serves the same FastAPI app as `moeserve router`, configured by the same flags
    (``router_argv``: the manifest's spec.router and `moeserve up --ray`'s router flags; see
    ray_app for the Serve options)."""

    async def __init__(self, deployment: str, model_dir: str, router_argv: list[str],
                 startup_timeout_s: float = STARTUP_TIMEOUT_S, **pools: Any):  # fmt: skip
        from moeserve.router.chat import chat_options, prepare_tokenizer
        from moeserve.router.frontend import Frontend
        from moeserve.router.serving import Router
        from moeserve.router.settings import settings_from_args
        from moeserve.router.tokenizer import load_tokenizer

        # ``pools`` are the worker deployments' handles: bound here only so that Serve deploys
        # them with the router as one application; traffic goes to the workers over gRPC.
        self.pools = pools
        self.args = args = parse_router_argv(router_argv)
        self.chat = chat_options(args)
        tokenizer = load_tokenizer(model_dir)
        prepare_tokenizer(tokenizer, args, self.chat)
        self.metrics = RouterMetrics()
        # Its worker-plane token (or the opt-out) is in the replica's runtime_env (ray_app).
        auth = worker_auth_from_env("router", os.environ.get(ENV_INSECURE, "") == "1")
        self.pool = RayWorkerPool(deployment, PrefixIndex(), self.metrics, auth=auth,
                                  probe_interval_s=args.probe_interval_s,
                                  eject_base_s=args.eject_base_s, eject_max_s=args.eject_max_s)
        self.pool.start()
        await self.pool.wait_for_decode(startup_timeout_s)
        info = self.pool.model_info()
        vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        router = self.router = Router(self.pool, self.metrics, settings_from_args(args),
                                      info.model_id, info.block_size)  # fmt: skip
        self.frontend = Frontend(router, tokenizer, args.served_model_name or info.model_id,
                                 info.max_model_len, vocab_size, self.metrics)  # fmt: skip

    def __serve_build_asgi_app__(self) -> Any:
        from moeserve.router.auth import ApiKeyMiddleware, ApiKeys, keys_from_sources
        from moeserve.router.http_app import create_app
        from moeserve.router.openapi import install_openapi
        from moeserve.router.server import http_limits

        app = create_app(self.frontend,
                         lambda: bool(self.pool.healthy("decode")) and not self.router.draining,
                         http_limits(self.args), self.chat)  # fmt: skip
        # Keys as for `moeserve router`: --api-key, MOESERVE_API_KEY(S) in the replica's
        # runtime_env.
        keys = ApiKeys(keys_from_sources(self.args.api_key))
        app.add_middleware(ApiKeyMiddleware, keys=keys, protect_metrics=self.args.api_key_metrics)
        install_openapi(app, auth=keys.enabled)
        return app

    async def workers(self) -> dict[str, list[str]]:
        """Healthy worker addresses per role, as this router replica sees them."""
        return {role: sorted(c.address for c in self.pool.healthy(role))
                for role in ("prefill", "decode")}  # fmt: skip

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self.pool.close()
