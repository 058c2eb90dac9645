"""Issue 22 (d), found by the soak: the router's RSS climbed with every huge prompt it
tokenized and never came down (glibc kept the Rust tokenizer's freed memory in fragmented
arenas: +140 MiB over 8 prompts of 3 MiB). Tokenizing threads now trim the heap after a prompt
of at least TRIM_ABOVE_CHARS characters."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from moeserve.common.heap import TRIM_ABOVE_CHARS, trim_heap
from moeserve.router.frontend import Frontend
from moeserve.router.metrics import RouterMetrics
from moeserve.router.serving import RouterSettings
from moeserve.router.tokenizer import load_tokenizer
from moeserve.worker.tokenizer_files import write_tokenizer
from tests.reliability_helpers import rss_mib

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class _Router:
    settings = RouterSettings()


def test_rss_comes_back_after_huge_prompts(tmp_path: Path) -> None:
    if not trim_heap():
        pytest.skip("no malloc_trim in this C library")
    write_tokenizer(tmp_path, vocab_size=512, bos_id=0, eos_id=1)
    frontend = Frontend(_Router(), load_tokenizer(tmp_path), "m", 10**8, 512,  # type: ignore[arg-type]
                        RouterMetrics())  # fmt: skip
    text = "hello world " * (2 * TRIM_ABOVE_CHARS // 12)

    async def tokenize(n: int) -> list[float]:
        out = []
        for _ in range(n):
            ids = await frontend.prompt_ids_async(text)
            assert len(ids) > 100_000
            del ids
            out.append(rss_mib(os.getpid()))
        return out

    rss = asyncio.run(tokenize(6))
    # The first one sizes the pools; after it, no climb.
    assert max(rss[1:]) - rss[1] < 30, rss
