"""The worker environment as defaults of `moeserve worker`'s flags: the one parser from the
environment contract to flags (rank processes and Ray rank actors parse it the same way).

The launch plan (``moeserve/common/launch_plan.py``) renders the engine settings as environment
variables only, for every target (the command stays `moeserve worker --role R --model M --dp N
--ep N` plus the target's addresses). Here each variable becomes the default of its flag, so a
flag given on the command line (or in ``extraArgs``) still wins. A value that does not parse
fails the worker with the variable's name, before anything is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from moeserve.common import spec as s
from moeserve.common.errors import ConfigError
from moeserve.common.truth import parse_bool

__all__ = ["ENV_FLAGS", "env_defaults", "apply_env_defaults"]

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def _str(text: str) -> str:
    return text


# variable -> (flag dest, parser). MOESERVE_POD_IP is handled below (two flags).
ENV_FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    s.ENV_ROLE: ("role", _str),
    s.ENV_MODEL: ("model_id", _str),
    s.ENV_BLOCK_SIZE: ("block_size", _int),
    s.ENV_METRICS_PORT: ("metrics_port", _int),
    s.ENV_EPLB_ENABLED: ("enable_eplb", parse_bool),
    s.ENV_EPLB_REDUNDANT_EXPERTS: ("eplb_redundant_experts", _int),
    s.ENV_DBO_ENABLED: ("enable_dbo", parse_bool),
}


def env_defaults(env: Mapping[str, str], choices: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    """Flag defaults from ``env``; raises ConfigError naming the variable on a bad value."""
    out: dict[str, Any] = {}
    for var, (dest, parse) in ENV_FLAGS.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = parse(raw)
        except ValueError as e:
            raise ConfigError(f"{var}={raw!r}: {e}") from None
        allowed = (choices or {}).get(dest)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{var}={raw!r}: expected one of {', '.join(allowed)}")
        out[dest] = value
    tp = env.get(s.ENV_TP, "1") or "1"
    if tp != "1":
        raise ConfigError(f"{s.ENV_TP}={tp!r}: this worker runs attention data-parallel only "
                          "(tp 1); use dp = ep")  # fmt: skip
    pod_ip = env.get(s.ENV_POD_IP)
    if pod_ip:
        # In a pod the kubelet's probes and the routers dial the pod IP, not loopback; peers
        # learn this worker's address (KV handles) as the pod IP.
        out["host"] = "::" if ":" in pod_ip else "0.0.0.0"
        out["advertise_host"] = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return out


def apply_env_defaults(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Make the variables in ``env`` the defaults of ``parser``'s flags. A bad value does not
    break building the parser (other subcommands share it): `moeserve worker` fails with it."""
    choices = {a.dest: a.choices for a in parser._actions if a.choices is not None}
    try:
        parser.set_defaults(**env_defaults(env, choices))
    except ConfigError as e:
        error = e

        def fail(_args: argparse.Namespace) -> int:
            raise error

        parser.set_defaults(func=fail)
