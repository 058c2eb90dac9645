"""A worker whose configured kernel cache (spec.compileCache, TRITON_CACHE_DIR) it cannot
write still starts: it compiles into a private directory and says why (worker/cli.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeserve.worker.cli import usable_kernel_cache


def test_writable_cache_is_kept(tmp_path: Path) -> None:
    env = {"TRITON_CACHE_DIR": str(tmp_path / "triton")}
    assert usable_kernel_cache(env) is None
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton") and (tmp_path / "triton").is_dir()
    assert list((tmp_path / "triton").iterdir()) == []  # the probe file is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_unwritable_cache_falls_back_with_a_warning(tmp_path: Path) -> None:
    locked = tmp_path / "node-cache"
    locked.mkdir(mode=0o555)
    env = {"TRITON_CACHE_DIR": str(locked)}
    warning = usable_kernel_cache(env)
    assert warning and str(locked) in warning and "not writable" in warning
    assert env["TRITON_CACHE_DIR"] != str(locked)


def test_a_cache_path_that_cannot_exist_falls_back(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"TRITON_CACHE_DIR": str(blocker / "triton")}  # under a regular file
    warning = usable_kernel_cache(env)
    assert warning and "not writable" in warning
    assert env["TRITON_CACHE_DIR"] != str(blocker / "triton")


def test_no_cache_configured_changes_nothing() -> None:
    env: dict[str, str] = {}
    assert usable_kernel_cache(env) is None and env == {}
