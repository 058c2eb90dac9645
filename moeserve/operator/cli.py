"""`moeserve operator run` (the kopf operator), `moeserve operator render -f FILE` and
`moeserve operator plan -f FILE`.

``render`` prints what the operator would create, as multi-document YAML, without a cluster
(like `helm template`). An invalid manifest, or one whose pools' GPUs cannot hold the model
(the memory plan, moeserve/operator/memory_check.py), prints one line per offending field,
naming it, on stderr and exits 2. ``plan`` prints each pool's memory plan as Markdown.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from moeserve.common.spec import MoEDeployment, SpecError, parse_manifest

__all__ = ["add_operator_parser", "render_documents"]

EXIT_INVALID = 2


def add_operator_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("operator", help="the Kubernetes operator")
    sub = parser.add_subparsers(dest="operator_command", required=True)

    run = sub.add_parser("run", help="run the operator (kopf) against the current cluster")
    run.add_argument("--namespace", "-n", action="append", default=[],
                     help="watch only this namespace (repeatable); default: all namespaces")
    run.add_argument("--resync-seconds", type=float, default=60.0,
                     help="full reconcile of every MoEDeployment this often (restores edits)")
    run.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                     help="liveness endpoint URL, '' to disable")
    run.set_defaults(func=_run)

    render = sub.add_parser("render", help="print the manifests for a MoEDeployment file")
    render.add_argument("-f", "--filename", required=True,
                        help="MoEDeployment YAML ('-' for stdin); several documents allowed")
    render.add_argument("--namespace", "-n", default="default",
                        help="namespace for manifests that do not set one")
    render.set_defaults(func=_render)

    plan = sub.add_parser("plan", help="print the per-GPU memory plan of a MoEDeployment file")
    plan.add_argument("-f", "--filename", required=True,
                      help="MoEDeployment YAML ('-' for stdin); several documents allowed")
    plan.set_defaults(func=_plan)


def render_documents(text: str, namespace: str = "default") -> list[dict[str, Any]]:
    """Every child manifest of every MoEDeployment in ``text``; SpecError names bad fields
    (MemoryPlanError where a pool's GPUs cannot hold the model)."""
    from moeserve.operator.memory_check import check_memory
    from moeserve.operator.render import render

    out: list[dict[str, Any]] = []
    for dep in _deployments(text, namespace):
        check_memory(dep)  # before anything is rendered, as the operator does
        out.extend(render(dep))
    return out


def _deployments(text: str, namespace: str = "default") -> list[MoEDeployment]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError([("(file)", f"not valid YAML: {exc}")]) from None
    out: list[MoEDeployment] = []
    for index, doc in enumerate(docs):
        try:
            out.append(parse_manifest(doc, default_namespace=namespace))
        except SpecError as exc:
            if len(docs) == 1:
                raise
            raise SpecError([(f"document {index}: {f}", m) for f, m in exc.problems]) from None
    return out


def _read(args: argparse.Namespace) -> str | None:
    try:
        return sys.stdin.read() if args.filename == "-" else open(args.filename).read()
    except OSError as exc:
        print(f"moeserve operator {args.operator_command}: {exc}", file=sys.stderr)
        return None


def _report(args: argparse.Namespace, exc: SpecError) -> int:
    from moeserve.operator.memory_check import MemoryPlanError

    what = "MoEDeployment does not fit its GPUs" if isinstance(exc, MemoryPlanError) else \
        "invalid MoEDeployment"
    print(f"moeserve operator {args.operator_command}: {what} in {args.filename}:",
          file=sys.stderr)
    for field, message in exc.problems:
        print(f"  {field}: {message}", file=sys.stderr)
    return EXIT_INVALID


def _render(args: argparse.Namespace) -> int:
    text = _read(args)
    if text is None:
        return EXIT_INVALID
    try:
        manifests = render_documents(text, args.namespace)
    except SpecError as exc:
        return _report(args, exc)
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, width=100))
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Exits 2 when a pool does not fit (the table says why), as render would refuse it."""
    from moeserve.operator.memory_check import plan_deployment, plan_markdown

    text = _read(args)
    if text is None:
        return EXIT_INVALID
    try:
        deps = _deployments(text)
        tables = [plan_markdown(dep) for dep in deps]
        fits = all(p.plan is None or p.plan.fits
                   for dep in deps for p in plan_deployment(dep).values())
    except SpecError as exc:
        return _report(args, exc)
    sys.stdout.write("\n".join(tables))
    return 0 if fits else EXIT_INVALID


def _run(args: argparse.Namespace) -> int:
    import asyncio

    import kopf

    from moeserve.operator.handlers import OperatorConfig, build_registry

    config = OperatorConfig(resync_seconds=args.resync_seconds,
                            namespaces=tuple(args.namespace))
    registry = build_registry(config)
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        standalone=True,
        liveness_endpoint=args.liveness or None,
    ))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m moeserve.operator.cli` (the image's operator command)."""
    parser = argparse.ArgumentParser(prog="moeserve")
    add_operator_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
