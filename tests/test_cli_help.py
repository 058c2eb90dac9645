"""`--help` works on `moeserve` and on every subcommand, nested ones and those registered by
other packages (cli._EXTERNAL_PARSERS) included: argparse %-formats help text, so one stray `%`
in a docstring-derived help string used to crash `moeserve generate --help`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeserve import cli


def _walk(parser: argparse.ArgumentParser,
          path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


COMMANDS = [path for path, _ in _walk(cli.build_parser())]


def test_walk_reaches_every_registered_command() -> None:
    """The parametrized test below is only as good as the tree it walks: a component whose
    parser silently stopped registering would drop out of it."""
    top = {p[0] for p in COMMANDS if len(p) == 1}
    assert {"generate", "make-checkpoint", "operator", "worker", "router", "up", "ray", "bench",
            "preflight"} <= top
    assert len(top) == 2 + len(cli._EXTERNAL_PARSERS)
    assert ("operator", "render") in COMMANDS and ("operator", "run") in COMMANDS
    assert ("ray", "status") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "moeserve")
def test_help_exits_zero_with_usage(path: tuple[str, ...],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: " + " ".join(("moeserve", *path)))
    assert "-h, --help" in out


def test_engine_flag_help_keeps_literal_percent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(experts + this) % ep == 0" in out
    assert "--max-num-seqs MAX_NUM_SEQS most requests in one batch (default: 256)" in out


def test_generate_help_through_console_script() -> None:
    exe = Path(sys.executable).with_name("moeserve")
    if not exe.is_file():
        pytest.skip(f"no console script next to {sys.executable} (package not installed)")
    proc = subprocess.run([str(exe), "generate", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: moeserve generate")
    assert "--prompt-token-ids" in proc.stdout
