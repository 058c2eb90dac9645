"""The router's tunables: policy, admission limits, deadlines, migration and wake-up, as
`moeserve.router.config` builds them from flags and files and `serving.Router` reads them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from moeserve.common.launch_plan import ROUTER_DRAIN_GRACE_S
from moeserve.router.policy import Policy

__all__ = ["RouterSettings", "settings_from_args"]


@dataclass
class RouterSettings:
    policy: Policy = Policy.PREFIX
    disagg_threshold: int = 0
    max_inflight: int = 256
    """requests in flight before new ones get 429"""
    max_inflight_tokens: int = 1 << 20
    """prompt + max_tokens summed over requests in flight before new ones get 429"""
    max_prompt_tokens: int = 0
    """longest prompt accepted (0: the model's context length)"""
    max_tokens_limit: int = 0
    """largest max_tokens accepted (0: whatever fits the context)"""
    max_body_bytes: int = 4 << 20
    """HTTP request bodies above this get 413"""
    request_timeout_s: float = 600.0
    prefill_timeout_s: float = 60.0
    first_token_timeout_s: float = 60.0
    """decode worker's first message, KV transfer or recompute included"""
    stall_timeout_s: float = 20.0
    """longest gap between two streamed messages before the decode worker counts as stalled"""
    max_migrations: int = 3
    no_worker_wait_s: float = 5.0
    """how long a request waits for a decode worker to come back before failing"""
    wake_hold_s: float = 0.0
    """with no decode worker known (scaled to zero), how long a request is held while one
    wakes (0: off); see moeserve/router/wake.py"""
    retry_after_s: int = 1
    drain_grace_s: float = float(ROUTER_DRAIN_GRACE_S)  # the operator's grace period adds to it
    queue_weight: float = 1.0
    kv_weight: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        # A plain string ("round_robin") compared unequal by identity with the enum, and the
        # policy silently fell through to random.
        self.policy = Policy(self.policy)


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    """The settings `moeserve router`'s flags give (its parser's namespace, after
    ``resolve_router_config``): one reading for the process and for the Ray replica."""
    return RouterSettings(
        policy=Policy(args.policy), disagg_threshold=args.disagg_threshold,
        max_inflight=args.max_inflight, request_timeout_s=args.request_timeout_s,
        prefill_timeout_s=args.prefill_timeout_s, first_token_timeout_s=args.first_token_timeout_s,
        stall_timeout_s=args.stall_timeout_s, max_migrations=args.max_migrations,
        max_inflight_tokens=args.max_inflight_tokens, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
        drain_grace_s=args.drain_grace_s, wake_hold_s=args.wake_hold_s,
    )  # fmt: skip
