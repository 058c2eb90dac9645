"""Without an optional extra (nixl, ray) the CLI names the extra and the command that installs
it, in one line on stderr, and exits non-zero: no traceback.

"Not installed" is simulated without uninstalling anything: a sitecustomize on PYTHONPATH puts
``None`` into sys.modules for the blocked packages, which makes every import of them fail as a
missing module does (ModuleNotFoundError naming the package).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moeserve.common.optional import EXTRAS, MissingExtraError, install_command, require

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

_SITECUSTOMIZE = """\
import os, sys
for name in os.environ.get("MOESERVE_TEST_BLOCK", "").split(","):
    if name:
        sys.modules[name] = None
"""


def _moeserve(tmp_path: Path, block: str, *argv: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {**os.environ, "MOESERVE_TEST_BLOCK": block,
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "moeserve.cli", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=100)  # fmt: skip


def _assert_named(proc: subprocess.CompletedProcess, label: str, extra: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{label} is not installed" in proc.stderr, proc.stderr
    assert f"[{extra}]'" in proc.stderr and "pip install" in proc.stderr, proc.stderr


def test_up_without_nixl_names_the_extra(tmp_path: Path) -> None:
    proc = _moeserve(tmp_path, "nixl", "up", "--port", "0")
    _assert_named(proc, "NIXL", "nixl")
    assert "listening" not in proc.stdout + proc.stderr  # failed before starting any child


def test_worker_without_nixl_names_the_extra_and_the_way_around(tmp_path: Path) -> None:
    # The check comes before the model loads: the directory need not even exist.
    # A worker started by hand has no worker-plane tokens; the opt-out gets it to the NIXL check.
    proc = _moeserve(tmp_path, "nixl", "worker", "--model", str(tmp_path / "nowhere"),
                     "--insecure-worker-plane")
    _assert_named(proc, "NIXL", "nixl")
    assert "--no-nixl" in proc.stderr


@pytest.mark.parametrize("argv", [["up", "--ray", "--port", "0"], ["ray", "status"]])
def test_ray_commands_without_ray_name_the_extra(tmp_path: Path, argv: list[str]) -> None:
    proc = _moeserve(tmp_path, "ray", *argv)
    _assert_named(proc, "Ray Serve", "ray")


def test_every_named_extra_exists_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra, _label in EXTRAS.values():
        assert extra in extras, f"{extra} is not an extra of pyproject.toml"
        assert f"[{extra}]" in install_command(extra)


def test_a_broken_install_is_told_apart_from_a_missing_one(monkeypatch) -> None:
    # nixl present but one of its own imports missing: still the extra's install command.
    def fail(name: str):
        raise ModuleNotFoundError("No module named '_nixl_bindings'", name="_nixl_bindings")

    monkeypatch.setattr("importlib.import_module", fail)
    with pytest.raises(MissingExtraError) as e:
        require("nixl._api")
    assert "NIXL is installed but does not import" in str(e.value)
    assert "_nixl_bindings" in str(e.value) and e.value.extra == "nixl"
