"""The listen line that `moeserve up` reads ports from, written by the ranks of one expert-
parallel worker onto one pipe at once (CI: two ranks' lines interleaved, and the start waited
out its timeout for a second address it had been sent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moeserve.common.listen_line import LISTEN_LINE

_RANK = """
import sys
from moeserve.common.listen_line import announce_listening
rank = int(sys.argv[1])
for i in range(400):
    print("log line", i, "of rank", rank)  # ordinary output around it, as a worker's logs
    announce_listening("worker", f"127.0.0.1:{40000 + rank}",
                       metrics=f"http://127.0.0.1:{50000 + rank}/metrics")
"""


def test_ranks_sharing_a_pipe_never_interleave_their_listen_lines() -> None:
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as `moeserve up` starts its children
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(r)], stdout=write, env=env,
                              cwd=Path(__file__).resolve().parents[1]) for r in (0, 1)]
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = [ln for ln in pipe if "listening" in ln]
    assert all(p.wait(60) == 0 for p in ranks)
    # As `moeserve up` reads them: searched (another rank's unfinished print may come first),
    # and nothing of anyone else's between the line and its end.
    found = [(LISTEN_LINE.search(ln), ln) for ln in lines]
    bad = [ln for m, ln in found if not m or m.end() != len(ln.rstrip("\n"))]
    assert len(lines) == 800 and not bad, bad[:3]
    got = {(m.group(2), m.group(4)) for m, _ in found if m}
    assert got == {(f"127.0.0.1:{40000 + r}", f"http://127.0.0.1:{50000 + r}/metrics")
                   for r in (0, 1)}


def test_router_line_carries_http_and_grpc() -> None:
    line = "moeserve router listening on http://127.0.0.1:8000 grpc 127.0.0.1:9000"
    m = LISTEN_LINE.fullmatch(line)
    assert m and m.group(1, 2, 3) == ("router", "http://127.0.0.1:8000", "127.0.0.1:9000")


def test_a_stdout_without_a_descriptor_still_gets_the_line(capsys) -> None:  # noqa: ANN001
    from moeserve.common.listen_line import announce_listening

    announce_listening("worker", "127.0.0.1:1", metrics="http://127.0.0.1:2/metrics")
    out = capsys.readouterr().out
    m = LISTEN_LINE.fullmatch(out.rstrip("\n"))
    assert m and m.group(2, 4) == ("127.0.0.1:1", "http://127.0.0.1:2/metrics")
