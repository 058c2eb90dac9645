"""``n > 1``: the choices of one request, each its own request to the workers, sharing the
prompt's KV through the prefix cache.

The first choice runs alone until its first token: by then the decode worker that serves it
holds the prompt's KV in its prefix cache, and the other choices, routed by the same prompt
(the prefix policy's overlap), find it there and compute only the prompt's last partial block.
Started together, every choice would prefill the whole prompt in the same step. Seeded
choices get seed + index, so they differ from each other and each is reproducible.

Usage is summed as OpenAI does: the prompt once, the completion tokens of every choice.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from moeserve.common.sampling import MAX_SEED, SamplingParams
from moeserve.router.frontend import Delta, Frontend, Usage

__all__ = ["choice_params", "run_choices"]

_DONE = object()


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Each choice's parameters: its own seed when the request has one."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i) % (MAX_SEED + 1))
            for i in range(n)]


async def run_choices(
    frontend: Frontend,
    rid: str,
    prompt: list[int],
    params: SamplingParams,
    n: int,
    stop: Sequence[str],
    usage: Usage,
    timeout_s: float | None = None,
) -> AsyncIterator[Delta]:
    """The deltas of ``n`` choices as they come, each tagged with its ``index``. The first
    error of any choice ends them all and is raised."""
    queue: asyncio.Queue = asyncio.Queue()
    usages = [Usage() for _ in range(n)]
    per_choice = choice_params(params, n)
    tasks: list[asyncio.Task] = []

    async def pump(i: int) -> None:
        try:
            async for d in frontend.run(rid, prompt, per_choice[i], stop, usages[i], timeout_s):
                d.index = i
                queue.put_nowait(d)
                if i == 0 and len(tasks) == 1:
                    start_rest()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which ends every choice
            queue.put_nowait(e)
        finally:
            if i == 0 and len(tasks) == 1:  # ended before its first token
                start_rest()
            queue.put_nowait(_DONE)

    def start_rest() -> None:
        tasks.extend(asyncio.ensure_future(pump(i)) for i in range(1, n))

    tasks.append(asyncio.ensure_future(pump(0)))
    done = 0
    try:
        while done < n:
            item = await queue.get()
            if item is _DONE:
                done += 1
                continue
            if isinstance(item, Exception):
                raise item
            _sum(usage, usages)
            yield item
        _sum(usage, usages)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sum(total: Usage, usages: list[Usage]) -> None:
    total.prompt_tokens = usages[0].prompt_tokens
    total.cached_tokens = usages[0].cached_tokens
    total.completion_tokens = sum(u.completion_tokens for u in usages)
