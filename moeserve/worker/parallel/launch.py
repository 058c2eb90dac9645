"""Start the ranks of an EP group: one process per local rank, each joining the group.

`moeserve worker --dp N --ep N` and `moeserve generate --dp N --ep N` re-run themselves once
per local rank with ENV_LOCAL_RANK set; the parent only supervises (if one rank dies the others
are stopped: a partial EP group cannot serve). Under Kubernetes the pod's environment
(moeserve.common.spec: rank = pod index, ranks per pod, world size, rendezvous) places the local
ranks in the group; on a laptop the group is all local and rendezvous picks a free port. Each
worker rank serves on its own port (base + local rank) so the router addresses each KV cache.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import torch

from moeserve.common import spec
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.parallel.group import (
    ENV_LOCAL_RANK,
    ParallelContext,
    RankInfo,
    init_parallel,
)

__all__ = [
    "join_group_from_env", "is_rank_process", "rank_environments", "spawn_local_ranks",
    "maybe_spawn_ranks", "generate_sharded",
]

logger = logging.getLogger(__name__)


def join_group_from_env(config: EngineConfig, env: Mapping[str, str] | None = None
                        ) -> ParallelContext:
    """Join this process's EP group as the environment describes it."""
    info = RankInfo.from_env(config.ep, env)
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    return init_parallel(info, backend=backend, timeout_s=config.dist_timeout_s)


def is_rank_process(env: Mapping[str, str] | None = None) -> bool:
    return ENV_LOCAL_RANK in (os.environ if env is None else env)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_environments(ep: int, env: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each local rank process (pure apart from picking a free port)."""
    per_node = int(env.get(spec.ENV_RANKS_PER_POD, str(ep)))
    base = dict(env)
    base.setdefault(spec.ENV_WORLD_SIZE, str(ep))
    base.setdefault(spec.ENV_RANKS_PER_POD, str(per_node))
    base.setdefault(spec.ENV_RENDEZVOUS, f"127.0.0.1:{_free_port()}")
    return [{**base, ENV_LOCAL_RANK: str(i)} for i in range(per_node)]


def spawn_local_ranks(argv: Sequence[str], ep: int, env: Mapping[str, str] | None = None,
                      grace_s: float = 5.0) -> int:
    """Run `moeserve <argv>` once per local rank and supervise; returns the first failure's
    exit code (after stopping the other ranks) or 0 when all exit cleanly.

    SIGTERM / SIGINT are forwarded to the ranks, which stop together (the EP group agrees on
    the step to stop at: group.ParallelContext.request_stop); a rank ending on such a signal
    then is part of the stop, not a failure, and the launcher exits 0."""
    envs = rank_environments(ep, os.environ if env is None else env)
    cmd = [sys.executable, "-m", "moeserve.cli", *argv]
    procs = [subprocess.Popen(cmd, env=e, preexec_fn=_die_with_parent) for e in envs]
    logger.info("started %d ranks of an EP group of %d (rendezvous %s)", len(procs), ep,
                envs[0][spec.ENV_RENDEZVOUS])
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = 0
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if stopping and rc in _STOPPED_CODES:
                    continue
                if rc != 0 and code == 0:
                    code = rc
                    logger.error("rank process %d exited with %d; stopping the group", p.pid, rc)
                    _stop(procs, grace_s)
            time.sleep(0.05)
        return code
    finally:
        for s, h in old.items():
            # After a stop, a late signal must not kill the interpreter's teardown (see
            # worker.stop_signals.ignore_stop_signals).
            signal.signal(s, signal.SIG_IGN if stopping else h)


# Exit codes of a rank that a forwarded stop signal ended (or that exited cleanly on it).
_STOPPED_CODES = {0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT}


def _die_with_parent() -> None:
    # Linux only: a rank outliving its launcher (killed outright) gets SIGTERM and drains.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def maybe_spawn_ranks(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """CLI hook: in the launching process start the ranks and return their exit code; in a
    rank process give it its own ports and return None (the command then runs normally)."""
    ep = getattr(args, "ep", 1)
    if ep <= 1:
        return None
    if not is_rank_process():
        return spawn_local_ranks(argv, ep)
    # The pool's switches (MOESERVE_EPLB_ENABLED, ...) reached ``args`` already: this process
    # built its parser from the same environment (moeserve.worker.env_defaults, the one parser).
    local = int(os.environ[ENV_LOCAL_RANK])
    for name in ("port", "metrics_port"):
        base = getattr(args, name, None)
        if base:  # 0 / None: each rank asks the OS for a free port anyway
            setattr(args, name, base + local)
    return None


def generate_sharded(engine, prompts: list[list[int]],
                     params: SamplingParams) -> list[list[int]] | None:
    """Offline generation over a DP group: prompt i runs on rank i % world (so with fewer
    prompts than ranks some ranks only relay experts). Rank 0 gets every output, in order;
    the other ranks get None."""
    ctx: ParallelContext = engine.parallel
    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    with torch.inference_mode():
        outs = engine.generate([prompts[i] for i in mine], params)
    gathered = ctx.all_gather_object(list(zip(mine, outs, strict=True)))
    if ctx.rank != 0:
        return None
    result: list[list[int]] = [[] for _ in prompts]
    for part in gathered:
        for i, tokens in part:  # type: ignore[union-attr]
            result[i] = tokens
    return result
