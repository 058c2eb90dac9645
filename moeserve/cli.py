"""`moeserve` command line: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, NoReturn

from moeserve.common.errors import MoeServeError
from moeserve.common.spec import ENV_LOG_LEVEL

__all__ = ["main", "configure_logging"]

# Subcommands owned by other packages: (module, function that registers the parser).
_EXTERNAL_PARSERS = [
    ("moeserve.operator.cli", "add_operator_parser"),
    ("moeserve.worker.cli", "add_worker_parser"),
    ("moeserve.router.server", "add_router_parser"),
    ("moeserve.deploy.up_cli", "add_up_parser"),
    ("moeserve.deploy.ray_cli", "add_ray_parser"),
    ("moeserve.bench", "add_bench_parser"),
    ("moeserve.worker.preflight", "add_preflight_parser"),
]


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-token-ids must be comma-separated integers, got {text!r}"
        ) from None


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    from moeserve.worker.engine_args import add_engine_args

    p = sub.add_parser("generate", help="offline generation on one engine")
    add_engine_args(p, model_required=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompt-token-ids", type=_token_ids, action="append",
                     help="comma-separated token ids (repeatable)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from moeserve.common.sampling import SamplingParams
    from moeserve.worker.cli import require_engine
    from moeserve.worker.engine_args import engine_config_from_args

    require_engine("moeserve generate")
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint
    from moeserve.worker.engine import LLMEngine

    if args.model is None:
        args.model = str(ensure_tiny_checkpoint())
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    tokenizer = _load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise MoeServeError(f"{args.model} has no tokenizer.json: use --prompt-token-ids")
        prompts = [tokenizer.encode(t).ids for t in args.prompt]
    else:
        prompts = args.prompt_token_ids
    engine = LLMEngine(engine_config_from_args(args))
    start = time.perf_counter()
    if engine.parallel is not None:
        from moeserve.worker.parallel.launch import generate_sharded

        outputs = generate_sharded(engine, prompts, params)
        engine.parallel.close()  # before exit, so no rank leaves while peers still talk
        if outputs is None:  # not rank 0: rank 0 prints every rank's results
            _end_rank_process(0)
    else:
        outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        record: dict[str, Any] = {"prompt_token_ids": prompt, "token_ids": out}
        if tokenizer is not None:
            record["text"] = tokenizer.decode(out)
        if args.json:
            print(json.dumps(record))
        else:
            print(record.get("text", out))
    n = sum(len(o) for o in outputs)
    logging.getLogger("moeserve").info(
        "generated %d tokens in %.3f s (%.1f tokens/s)", n, elapsed, n / max(elapsed, 1e-9))
    if engine.parallel is not None:
        _end_rank_process(0)
    return 0


def _end_rank_process(code: int) -> NoReturn:
    """End a rank process whose group is closed and whose output is written, without the
    interpreter's teardown: torch.distributed's C++ objects destroyed there aborted about one
    run in 20 on a loaded machine ("terminate called without an active exception", SIGABRT
    with no Python frame left, after every output was written), which the launcher rightly
    reports as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _load_tokenizer(model_dir: str) -> Any:
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def _add_make_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    from moeserve.common.model_presets import PRESETS

    p = sub.add_parser("make-checkpoint", help="write a random checkpoint in HuggingFace layout")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--experts", type=int, default=None, help="override n_routed_experts")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--fp8", action="store_true", help="fp8 e4m3 weights with 128x128 scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where random tensors are drawn")
    p.add_argument("--config-layout", choices=["deepseek", "transformers"], default="deepseek")
    p.set_defaults(func=_run_make_checkpoint)


def _run_make_checkpoint(args: argparse.Namespace) -> int:
    from moeserve.worker.cli import require_engine

    require_engine("moeserve make-checkpoint")
    from moeserve.worker.checkpoint import make_checkpoint

    out = make_checkpoint(args.out, args.preset, layers=args.layers, experts=args.experts,
                          dtype=args.dtype, fp8=args.fp8, seed=args.seed, device=args.device,
                          config_layout=args.config_layout)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)
    _add_make_checkpoint_parser(sub)
    for module, func in _EXTERNAL_PARSERS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # that component is not part of this build
            raise
        getattr(mod, func)(sub)
    return parser


# Libraries that log every request or connection at INFO / DEBUG (httpx: one line per bench
# request); their warnings and errors still show.
QUIET_LOGGERS = ("httpx", "httpcore", "hpack", "h2", "urllib3", "asyncio", "grpc",
                 "kubernetes.client.rest", "multipart", "filelock")


def configure_logging(level: str) -> None:
    """The one logging set-up of every `moeserve` command: `level` for our own loggers (and
    any library not listed), WARNING for the chatty libraries in QUIET_LOGGERS."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = max(logging.WARNING, logging.getLevelName(level.upper()))  # ERROR stays ERROR
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def _pop_log_level(argv: list[str]) -> tuple[list[str], str]:
    """--log-level is accepted anywhere on the line, before or after the subcommand; without
    it, $MOESERVE_LOG_LEVEL (how the operator sets it in pods), else INFO."""
    level, rest, it = os.environ.get(ENV_LOG_LEVEL) or "INFO", [], iter(argv)
    for arg in it:
        if arg == "--log-level":
            level = next(it, level)
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, level


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    argv, level = _pop_log_level(raw_argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not isinstance(logging.getLevelName(level.upper()), int):
        parser.error(f"--log-level / ${ENV_LOG_LEVEL} {level!r}: expected DEBUG, INFO, "
                     "WARNING or ERROR")  # fmt: skip
    configure_logging(level)
    try:
        if getattr(args, "ep", 1) > 1:  # --ep N: one process per local rank
            from moeserve.worker.parallel.launch import maybe_spawn_ranks

            code = maybe_spawn_ranks(args, raw_argv)
            if code is not None:
                return code
        return args.func(args) or 0
    except (MoeServeError, ValueError, FileNotFoundError) as e:
        print(f"moeserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
