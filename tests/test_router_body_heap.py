"""Issue 22's soak, the router's RSS between attacks: 20 partial 1 MiB bodies held open until
their timeout left their chunks (tens of KiB each, from the C heap) resident under whatever the
router allocated meanwhile: 20 MiB per attack, returned only when that later allocation went
(quiet RSS 105-136 MiB across windows). The body budget now trims the heap once such a burst
has drained."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moeserve.common import heap
from moeserve.router.limits import BodyBudget

# One process per mode: the C heap's state is the process's own, so the suite's earlier tests
# must not decide whether chunks are fresh or reused.
_HELD_BODIES = """
import asyncio, gc, os, sys
from moeserve.router.limits import BodyBudget, BodyTimeoutError, read_json_body
from tests.reliability_helpers import rss_mib

CHUNK = 64 << 10  # what uvicorn hands the app at a time, about


class HeldBody:  # a client that announced 2 MiB, sent 1 MiB and stopped
    headers = {"content-length": str(2 << 20)}

    in_full = 0  # bodies whose 1 MiB the reader has taken

    async def stream(self):
        for _ in range((1 << 20) // CHUNK):
            yield b" " * CHUNK
            await asyncio.sleep(0)
        HeldBody.in_full += 1
        await asyncio.Event().wait()


async def main() -> None:
    budget = BodyBudget(256 << 20, trim_after=int(sys.argv[1]))
    kept = []

    async def one() -> None:
        try:
            await read_json_body(HeldBody(), 4 << 20, budget, 0.3)
        except BodyTimeoutError:
            pass

    async def meanwhile() -> None:  # the router allocates while the bodies are held
        # Once every body is in, and larger than a chunk (below the mmap threshold): it comes
        # from the heap's top, above the chunks. A small one after a fixed sleep could land in
        # a hole below them on a loaded machine, and then nothing was kept even untrimmed.
        while HeldBody.in_full < 20:
            await asyncio.sleep(0.005)
        kept.append(bytearray(100_000))

    gc.collect()
    before = rss_mib(os.getpid())
    for _ in range(3):
        HeldBody.in_full = 0
        await asyncio.gather(*(one() for _ in range(20)), meanwhile())
    await asyncio.sleep(budget.trim.delay_s + 0.3)
    gc.collect()
    print(rss_mib(os.getpid()) - before, budget.used, budget.trim.trims)


asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("trim", [True, False])
def test_held_bodies_leave_no_memory_behind(trim: bool) -> None:
    if not heap.trim_heap():
        pytest.skip("no malloc_trim in this C library")
    trim_after = 4 << 20 if trim else 1 << 40  # the router's default / never
    out = subprocess.run([sys.executable, "-c", _HELD_BODIES, str(trim_after)],
                         capture_output=True, text=True, timeout=50,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr
    kept_mib, used, trims = out.stdout.split()
    assert int(used) == 0
    if trim:
        assert float(kept_mib) < 5, out.stdout  # 60 MiB of bodies were held, 20 at a time
        assert int(trims) >= 1
    else:  # the retention being fixed, still there without the trim
        assert float(kept_mib) > 15, out.stdout


def test_trim_follows_a_large_burst_once_half_has_drained(monkeypatch) -> None:  # noqa: ANN001
    calls = []  # the threads the trim ran on
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(threading.get_ident()) or True)

    async def run() -> BodyBudget:
        budget = BodyBudget(64 << 20, trim_after=4 << 20)
        for _ in range(20):
            budget.take(1 << 20)
        for _ in range(9):
            budget.give(1 << 20)
        assert budget.trim._pending is None  # 11 of 20 MiB still held
        for _ in range(11):  # half drained: one trim, a moment later, for the whole burst
            budget.give(1 << 20)
        assert budget.trim._pending is not None and not calls
        await asyncio.sleep(budget.trim.delay_s + 0.2)
        return budget

    budget = asyncio.run(run())
    assert len(calls) == 1 and budget.used == 0
    assert calls[0] != threading.get_ident()  # off the event loop: a trim can take 20+ ms


def test_ordinary_bodies_never_trim(monkeypatch) -> None:  # noqa: ANN001
    calls = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(1) or True)
    budget = BodyBudget(64 << 20, trim_after=4 << 20)
    for _ in range(10_000):  # 10k requests of 20 KB, a few at a time: 200 MB in all
        for _ in range(3):
            budget.take(20_000)
        for _ in range(3):
            budget.give(20_000)
    assert not calls and budget.used == 0


def test_huge_prompt_is_followed_by_a_trim_off_the_loop(monkeypatch) -> None:  # noqa: ANN001
    """Concurrent huge prompts left freed memory after the tokenizing threads' own trims (four
    at a time kept +12 MiB a round in the router); a second trim follows each a moment later."""
    from moeserve.common.heap import TRIM_ABOVE_CHARS
    from moeserve.router.frontend import Frontend
    from moeserve.router.metrics import RouterMetrics

    calls = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(threading.get_ident()) or True)
    # Only the tokenizing path runs, with the tokenizer stubbed.
    frontend = Frontend(None, None, "m", 10**8, 512, RouterMetrics())  # type: ignore[arg-type]
    monkeypatch.setattr(frontend, "prompt_ids", lambda prompt: [1, 2, 3])

    async def run() -> None:
        await frontend.prompt_ids_async("short")
        await asyncio.sleep(frontend._trim_after_prompt.delay_s + 0.2)
        assert not calls  # an ordinary prompt: no trim
        for _ in range(3):  # a burst: one trim for all of it
            await frontend.prompt_ids_async("x" * TRIM_ABOVE_CHARS)
        await asyncio.sleep(frontend._trim_after_prompt.delay_s + 0.2)

    asyncio.run(run())
    assert len(calls) == 1 and calls[0] != threading.get_ident(), calls
