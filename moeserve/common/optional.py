"""Optional dependencies (pyproject extras): import one, or fail with the command that installs it.

The engine (`moeserve worker`, `generate`, `make-checkpoint`, `up`) needs PyTorch (the
``worker`` extra; the router and the operator run without it), `moeserve up` needs NIXL (the
``nixl`` extra) for the KV hand-off between prefill and decode workers, and `moeserve up --ray`
needs Ray Serve (the ``ray`` extra). Without them a bare ModuleNotFoundError names a module,
not what to install; ``require`` turns it into a :class:`MissingExtraError` that the CLI prints
as one line.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from moeserve.common.errors import MoeServeError

__all__ = ["EXTRAS", "MissingExtraError", "install_command", "require"]

# Top-level module -> (extra in pyproject.toml, what users know it as).
EXTRAS: dict[str, tuple[str, str]] = {
    "nixl": ("nixl", "NIXL"),
    "ray": ("ray", "Ray Serve"),
    "torch": ("worker", "PyTorch (the engine)"),
}


class MissingExtraError(MoeServeError):
    """An optional dependency is not installed (or does not import); names the extra."""

    error_type = "missing_dependency"

    def __init__(self, message: str, extra: str):
        super().__init__(message)
        self.extra = extra


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` to this installation.

    From a source checkout (an editable install, as `make install` does) the package on PyPI is
    not the one in use, so the command names the checkout instead.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        where = "." if root == Path.cwd().resolve() else str(root)
        return f"pip install -e '{where}[{extra}]'"
    return f"pip install 'moeserve[{extra}]'"


def require(module: str, needed_for: str = "") -> ModuleType:
    """``importlib.import_module(module)``; a missing optional dependency raises
    :class:`MissingExtraError` naming its extra and the install command."""
    top = module.split(".", 1)[0]
    extra, label = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f" ({needed_for})" if needed_for else ""
        missing = e.name or ""
        if missing == top or missing.startswith(top + "."):
            problem = f"{label} is not installed{why}"
        else:  # installed, but something it needs is not: a broken or partial install
            problem = f"{label} is installed but does not import ({e}){why}"
        raise MissingExtraError(f"{problem}: {install_command(extra)}", extra) from None
