"""Start `moeserve up` as a user would, signal it, and report how it stopped (for
tests/test_clean_stop.py and tests/ray/test_ray_clean_stop.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from moeserve.deploy.ray_cli import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
# What a clean stop never prints.
DIRTY = ("Traceback", "terminate called", " ERROR ", " WARNING ", "exited with")


@dataclass
class Up:
    proc: subprocess.Popen
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    def wait_for(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.out + self.err):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def stop(self, sig: signal.Signals, timeout_s: float) -> Stopped:
        """SIGINT goes to the whole process group, as a terminal's Ctrl-C does; SIGTERM to
        `moeserve up` alone, as Kubernetes or systemd send it."""
        below = list(descendants(self.proc.pid))
        start = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            code: int | None = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - start
        time.sleep(0.5)  # the pipes' last lines
        left = [p for p in below if alive(p)]
        if code is None or left:  # leave nothing behind for the next test
            for pid in [self.proc.pid, *left]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        return Stopped(code, elapsed, "".join(self.err), "".join(self.out), left)


@dataclass
class Stopped:
    code: int | None
    elapsed_s: float
    stderr: str
    stdout: str
    left: list[int]

    def dirt(self) -> list[str]:
        return [line for line in (self.stderr + self.stdout).splitlines()
                if any(d in line for d in DIRTY)]  # fmt: skip


def start_up(*argv: str) -> Up:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.cli", "up", "--port", "0", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,  # its own process group: the SIGINT of a terminal's Ctrl-C
    )  # fmt: skip
    up = Up(proc)
    for stream, sink in ((proc.stdout, up.out), (proc.stderr, up.err)):
        threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()
    return up


def _pump(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
