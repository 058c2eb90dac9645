"""`moeserve up`'s engine and router flags: the same flags as `moeserve worker` (one per
EngineConfig field, engine_args.py) and `moeserve router` (its parser), taken over from those
parsers so they cannot drift. Only the flags the user gives are passed on: engine flags onto
every pool's ``extraArgs`` (so local processes and Ray launch the same workers), router flags
onto the router's command line. Nothing given: nothing changes.

Also the default memory split when `up` puts several workers on one GPU (``shared_gpu_args``).
"""

from __future__ import annotations

import argparse

from moeserve.common.spec import MoEDeployment

__all__ = ["add_forwarded_args", "forwarded_argv", "with_engine_args", "shared_gpu_args",
           "UTILIZATION_FLAG", "DEFAULT_GPU_UTILIZATION"]

UTILIZATION_FLAG = "--gpu-memory-utilization"
DEFAULT_GPU_UTILIZATION = 0.9  # EngineConfig's default, split between workers sharing a GPU
# The topology and the names are `up`'s own (--prefill/--decode, -f, --served-model-name...);
# these flags of the worker and router parsers would contradict it.
_ENGINE_SKIP = {"model", "model_id", "dp", "ep", "num_kv_blocks"}
_ROUTER_SKIP = {"config", "model", "served_model_name", "prefill", "decode", "host", "port",
                "grpc_port", "policy", "disagg_threshold", "metrics_port", "startup_timeout_s",
                "insecure_worker_plane", "func", "tls_cert", "tls_key", "tls_ca", "tls_server_name"}
_ENGINE = "up_engine_flags"
_ROUTER = "up_router_flags"


def _source_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from moeserve.router.server import add_router_parser
    from moeserve.worker.engine_args import add_engine_args

    engine = argparse.ArgumentParser(add_help=False)
    add_engine_args(engine, model_required=False)
    router = add_router_parser(argparse.ArgumentParser().add_subparsers())
    return engine, router


def add_forwarded_args(p: argparse.ArgumentParser) -> None:
    """Copy the worker's and router's flags onto ``p`` (default: absent from the namespace)."""
    engine, router = _source_parsers()
    taken = {s for a in p._actions for s in a.option_strings}
    forwarded: dict[str, list[argparse.Action]] = {_ENGINE: [], _ROUTER: []}
    for key, src, skip, title in (
            (_ENGINE, engine, _ENGINE_SKIP, "engine flags (every worker)"),
            (_ROUTER, router, _ROUTER_SKIP, "router flags")):  # fmt: skip
        group = p.add_argument_group(title)
        for a in src._actions:
            if not a.option_strings or a.dest in skip or a.dest == "help" \
                    or taken & set(a.option_strings):  # fmt: skip
                continue
            # the source's default, in words: absent here (only given flags are passed on)
            text = (a.help or "").replace("%(default)r", repr(a.default)).replace(
                "%(default)s", str(a.default))
            kwargs = {"dest": a.dest, "default": argparse.SUPPRESS, "help": text}
            if isinstance(a, argparse.BooleanOptionalAction):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif a.nargs == 0:  # store_true
                kwargs["action"] = "store_true"
            else:
                kwargs.update(type=a.type, choices=a.choices, metavar=a.metavar,
                              action="append" if isinstance(a, argparse._AppendAction)
                              else "store")
            flags = [s for s in a.option_strings if s.startswith("--")]
            if isinstance(a, argparse.BooleanOptionalAction):  # it adds the --no- form itself
                flags = flags[:1]
            group.add_argument(*flags, **kwargs)
            taken.update(flags)
            forwarded[key].append(a)
    p.set_defaults(**{key: tuple(actions) for key, actions in forwarded.items()})


def forwarded_argv(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(engine argv, router argv) of the forwarded flags the user gave."""
    out: list[list[str]] = []
    for key in (_ENGINE, _ROUTER):
        argv: list[str] = []
        for a in getattr(args, key, ()):
            if not hasattr(args, a.dest):
                continue
            value, flag = getattr(args, a.dest), a.option_strings[0]
            if isinstance(a, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif a.nargs == 0:
                argv += [flag] if value else []
            elif isinstance(value, list):
                argv += [x for v in value for x in (flag, str(v))]
            else:
                argv += [flag, str(value)]
        out.append(argv)
    return out[0], out[1]


def with_engine_args(dep: MoEDeployment, argv: list[str]) -> MoEDeployment:
    """``dep`` with ``argv`` after each pool's own extraArgs (the last flag wins)."""
    if not argv:
        return dep
    pools = {role: dep.spec.pool(role) for role in ("prefill", "decode")}
    spec = dep.spec.model_copy(update={role: pool.model_copy(
        update={"extra_args": [*pool.extra_args, *argv]}) for role, pool in pools.items()})
    return dep.model_copy(update={"spec": spec})


def shared_gpu_args(argvs: list[list[str]]) -> tuple[list[str], str | None]:
    """Flags for worker processes that share one GPU (``argvs``: each one's launch argv): with
    more than one and no utilization given, each gets an equal part of the default. Returns the
    flags and the line to log (None: nothing to split)."""
    if len(argvs) < 2 or any(_names(argv, UTILIZATION_FLAG) for argv in argvs):
        return [], None
    share = round(DEFAULT_GPU_UTILIZATION / len(argvs), 4)
    return [UTILIZATION_FLAG, str(share)], (
        f"{len(argvs)} workers share one GPU: {UTILIZATION_FLAG} {share:g} each "
        f"({DEFAULT_GPU_UTILIZATION:g} / {len(argvs)}; pass {UTILIZATION_FLAG} to choose)")


def _names(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)
