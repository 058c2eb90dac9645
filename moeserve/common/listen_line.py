"""The line a worker or router prints once it serves: ``moeserve up``, benchmarks and tests
read the real ports from it (0 asks the OS for free ones)."""

from __future__ import annotations

import os
import re
import sys

__all__ = ["LISTEN_LINE", "announce_listening"]

LISTEN_LINE = re.compile(
    r"moeserve (worker|router) listening on (\S+)(?: grpc (\S+))?(?: metrics (\S+))?"
)


def announce_listening(kind: str, address: str, *, grpc: str | None = None,
                       metrics: str | None = None) -> None:
    """Write the line with one ``write(2)``: the ranks of an expert-parallel worker share the
    launcher's stdout pipe, and ``print`` writes the text and its newline separately, so two
    ranks' lines interleaved ("...metricsmoeserve worker listening...") and ``moeserve up``
    never saw the second rank (CI: a start that timed out). Pipe writes of a line this short
    are atomic."""
    line = f"moeserve {kind} listening on {address}"
    line += f" grpc {grpc}" if grpc else ""
    line += f" metrics {metrics}" if metrics else ""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured in-process (a test, an embedder)
        print(line, flush=True)
        return
    sys.stdout.flush()  # what was printed before goes first
    os.write(fd, (line + "\n").encode())
