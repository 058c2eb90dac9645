"""Component boundaries, checked on moeserve's import graph.

The graph is read with ``ast`` from every file under moeserve/: imports at module level and
inside functions (a lazy import still runs when its function does); imports under
``if TYPE_CHECKING:`` are skipped (they never run). The generated code under
moeserve/api/moeserve/ is a node others may import, not read itself.

Layering, bottom to top (a layer imports only from the layers below it and itself):

    moeserve.common     the bottom: imports nothing else from moeserve
    moeserve.api        generated messages, and wire.py (conversions to and from them): common
    moeserve.ops        plain-torch math the model runs and the kernels are checked against
    moeserve.kernels    Triton kernels: common, ops; never the model or the rest of the worker
    moeserve.worker     the engine and its process: common, api, ops, kernels
    moeserve.router     control plane: common, api; never the worker, the kernels, torch, triton
    moeserve.operator     or nixl, not even through another module (router and operator run
                          from the base install, which has no torch)
    cli, deploy, bench  wire components into processes: anything

and no import cycle between files. The commands the control plane runs are also run here with
torch, triton and nixl made unimportable.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moeserve"
GENERATED = "moeserve.api.moeserve"
HEAVY = ("torch", "triton", "nixl")  # what the worker extra (and nixl's) brings

# What each layer may import directly (module-name prefixes; its own package is always allowed).
ALLOWED = {
    "moeserve.common": (),
    "moeserve.api": ("moeserve.common",),
    "moeserve.ops": ("moeserve.common",),
    "moeserve.kernels": ("moeserve.common", "moeserve.ops"),
    "moeserve.worker": ("moeserve.common", "moeserve.api", "moeserve.ops", "moeserve.kernels"),
    "moeserve.router": ("moeserve.common", "moeserve.api"),
    "moeserve.operator": ("moeserve.common", "moeserve.api"),
}
CONTROL_PLANE = ("moeserve.router", "moeserve.operator")
FORBIDDEN_FOR_CONTROL_PLANE = ("moeserve.worker", "moeserve.kernels", "moeserve.ops", *HEAVY)

# Import edges that close a known cycle, each removed by a named piece of work. The cycle test
# ignores exactly these edges; an entry whose edge is gone fails, so the list only shrinks.
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, module_level_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for n in node.orelse for n in _import_nodes(ast.Module([n], []),
                                                                     module_level_only))
        elif module_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                              | ast.Lambda):
            continue
        else:
            yield from _import_nodes(node, module_level_only)


def _resolve(name: str) -> str:
    """The module file an import of ``name`` runs (the longest known prefix), or the top-level
    name of a package outside moeserve."""
    if not name.startswith("moeserve"):
        return name.split(".", 1)[0]
    modules = _modules()
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield _resolve(alias.name)
        return
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    for alias in node.names:  # `from pkg import submodule` imports the submodule
        full = f"{base}.{alias.name}"
        yield _resolve(full) if full in _modules() else _resolve(base)


@cache
def import_graph(module_level_only: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module or external top-level package: first line importing it}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in _modules().items():
        edges: dict[str, int] = {}
        if not module.startswith(GENERATED):
            tree = ast.parse(path.read_text(), str(path))
            for node in _import_nodes(tree, module_level_only):
                for target in _targets(module, path, node):
                    if target != module:
                        edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _ancestors(module: str) -> Iterator[str]:
    """The packages whose __init__ runs before ``module`` does."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def reach(start: str, graph: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Every module or package importing ``start`` runs -> one import chain leading to it."""
    chains = {start: [start]}
    todo = deque([start])  # breadth first: each chain is a shortest one
    while todo:
        current = todo.popleft()
        for nxt in [*graph.get(current, {}), *_ancestors(current)]:
            if nxt not in chains:
                chains[nxt] = [*chains[current], nxt]
                todo.append(nxt)
    return chains


def _layer(module: str) -> str | None:
    return next((p for p in ALLOWED if _within(module, [p])), None)


def test_each_layer_imports_only_the_layers_below_it() -> None:
    graph = import_graph()
    breaches = []
    for module, edges in graph.items():
        layer = _layer(module)
        if layer is None:
            continue
        allowed = (layer, *ALLOWED[layer])
        for target, line in edges.items():
            if target.startswith("moeserve") and target != "moeserve" \
                    and not _within(target, allowed):  # fmt: skip
                breaches.append(f"{module}:{line} imports {target} (layer {layer} may import "
                                f"only {', '.join(allowed)})")
    assert not breaches, "\n".join(breaches)


def test_the_generated_api_is_read_as_a_target_only() -> None:
    graph = import_graph()
    generated = [m for m in graph if m.startswith(GENERATED)]
    assert generated, "no generated code under moeserve/api/moeserve: run make proto"
    assert "moeserve.api.wire" in graph and "moeserve.api.moeserve.v1.worker_pb2" in graph


@pytest.mark.parametrize("package", CONTROL_PLANE)
def test_control_plane_never_reaches_worker_code_or_torch(package: str) -> None:
    graph = import_graph()
    breaches: dict[tuple[str, str], str] = {}  # (importer, first forbidden module) -> chain
    for module in (m for m in graph if _within(m, [package])):
        for target, chain in reach(module, graph).items():
            first = next((i for i, m in enumerate(chain)
                          if _within(m, FORBIDDEN_FOR_CONTROL_PLANE)), None)
            if first is not None and first == len(chain) - 1:
                breaches.setdefault((chain[-2], target), " -> ".join(chain))
    assert not breaches, "\n".join(sorted(breaches.values()))


def _parser_modules() -> list[str]:
    """moeserve.cli and the modules whose parsers `moeserve --help` registers."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == \
                "_EXTERNAL_PARSERS":  # fmt: skip
            return ["moeserve.cli", *(mod for mod, _func in ast.literal_eval(node.value))]
    raise AssertionError("moeserve/cli.py no longer has _EXTERNAL_PARSERS")


def test_building_the_command_line_imports_no_torch() -> None:
    # What runs at import time (module level only): every parser module `moeserve` loads.
    graph = import_graph(module_level_only=True)
    modules = _parser_modules()
    assert "moeserve.router.server" in modules and "moeserve.operator.cli" in modules
    breaches = []
    for module in modules:
        assert module in graph, f"{module} (in cli._EXTERNAL_PARSERS) does not exist"
        for target, chain in reach(module, graph).items():
            if target in HEAVY:
                breaches.append(" -> ".join(chain))
    assert not breaches, "\n".join(breaches)
    cli_top = reach("moeserve.cli", graph)
    assert not [m for m in cli_top if _within(m, ("moeserve.worker", "moeserve.kernels"))]


def _cycle_graph() -> dict[str, set[str]]:
    graph = import_graph()
    return {module: {t for t in edges if t in graph} for module, edges in graph.items()}


def test_no_import_cycle_between_files() -> None:
    graph = import_graph()
    try:
        graphlib.TopologicalSorter(_cycle_graph()).prepare()
    except graphlib.CycleError as e:
        cycle = e.args[1][::-1]  # graphlib lists it against the import direction
        steps = [f"{a}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
        pytest.fail("import cycle:\n  " + "\n  ".join(steps))


# Made unimportable for the subprocess tests below, as if the worker extra were not installed.
_BLOCKER = """\
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in ("torch", "triton", "nixl"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
"""


def _without_torch(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("argv", [
    ["router", "--help"],
    ["operator", "--help"],
    ["operator", "render", "-f", "examples/tiny-cpu.yaml"],
    ["--help"],
])  # fmt: skip
def test_control_plane_commands_run_without_torch(tmp_path: Path, argv: list[str]) -> None:
    proc = _without_torch(tmp_path, "-m", "moeserve.cli", *argv)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if argv[-1] == "--help":
        assert "usage: moeserve" in proc.stdout
    else:
        assert "kind: StatefulSet" in proc.stdout


def test_router_and_operator_modules_import_without_torch(tmp_path: Path) -> None:
    code = ("import sys, moeserve.router.server, moeserve.router.http_app, moeserve.operator.cli,"
            " moeserve.operator.render, moeserve.api.wire; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    proc = _without_torch(tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["worker", "--model", "nowhere", "--no-nixl"],
    ["generate", "--prompt-token-ids", "1,2"],
    ["make-checkpoint", "--out", "nowhere"],
])  # fmt: skip
def test_engine_commands_without_torch_name_the_worker_extra(tmp_path: Path,
                                                             argv: list[str]) -> None:
    proc = _without_torch(tmp_path, "-m", "moeserve.cli", *argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "PyTorch (the engine) is not installed" in proc.stderr, proc.stderr
    assert "[worker]'" in proc.stderr and "pip install" in proc.stderr, proc.stderr
