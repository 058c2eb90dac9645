"""Text <-> tokens around Router.generate, shared by the HTTP and gRPC front ends.

Tokenizes prompts, checks them against the model (vocabulary, context length) so errors name
the client's field, detokenizes incrementally, applies stop strings, and records TTFT/ITL.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from moeserve.common.errors import InvalidRequestError
from moeserve.common.heap import TRIM_ABOVE_CHARS, DeferredTrim, trim_heap
from moeserve.common.sampling import SamplingParams, TokenLogprobs
from moeserve.router.metrics import RouterMetrics
from moeserve.router.serving import Router
from moeserve.router.tokenizer import ModelTokenizer

__all__ = ["Delta", "Frontend", "TOKENIZE_THREADS", "Usage"]

# Tokenizing runs beside the event loop; more threads than cores would only queue in the GIL.
TOKENIZE_THREADS = max(1, min(4, os.cpu_count() or 1))
_INLINE_IDS = 4096  # token-id prompts shorter than this are checked on the loop (microseconds)


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when asked for
    index: int = 0  # the choice (n > 1: router/choices.py)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Frontend:
    def __init__(
        self,
        router: Router,
        tokenizer: ModelTokenizer,
        model_id: str,
        max_model_len: int,
        vocab_size: int,
        metrics: RouterMetrics,
    ):
        self.router = router
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = metrics
        metrics.bind_model(model_id)  # the served name labels the request series
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
        # The tokenizing thread trims at once; what the request frees after (its ids, its
        # body's chunks) and what concurrent huge prompts left (each thread trimmed while
        # another still held memory) goes with a second trim a moment later.
        self._trim_after_prompt = DeferredTrim(what="huge prompts")

    async def prompt_ids_async(self, prompt: str | list[int]) -> list[int]:
        """``prompt_ids`` on the tokenizer threads: the event loop keeps serving meanwhile."""
        if isinstance(prompt, list) and len(prompt) < _INLINE_IDS:
            return self.prompt_ids(prompt)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, self._prompt_ids_trimmed, prompt)
        finally:
            if len(prompt) >= TRIM_ABOVE_CHARS:
                self._trim_after_prompt.soon(len(prompt))

    def _prompt_ids_trimmed(self, prompt: str | list[int]) -> list[int]:
        try:
            return self.prompt_ids(prompt)
        finally:  # a huge prompt's freed tokenizer memory goes back to the OS (common/heap.py)
            if len(prompt) >= TRIM_ABOVE_CHARS:
                trim_heap()

    async def chat_ids_async(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
    ) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self.chat_ids, messages, add_generation_prompt, tools, extra)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("prompt has no tokens", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        return ids

    def chat_ids(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
    ) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, tools, extra)

    def check_length(self, prompt: list[int], params: SamplingParams, param: str) -> None:
        """Context length and the router's admission bounds on prompt and max_tokens."""
        s = self.router.settings
        if s.max_prompt_tokens and len(prompt) > s.max_prompt_tokens:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; this router accepts at most "
                f"{s.max_prompt_tokens} (--max-prompt-tokens)",
                param=param,
            )
        if s.max_tokens_limit and params.max_tokens > s.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} is above this router's limit of "
                f"{s.max_tokens_limit} (--max-tokens-limit)",
                param="max_tokens",
            )
        total = len(prompt) + params.max_tokens
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; this model's context is "
                f"{self.max_model_len} tokens",
                param=param,
            )
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"request needs {total} ({len(prompt)} prompt + {params.max_tokens} max_tokens)",
                param="max_tokens",
            )

    def default_max_tokens(self, prompt: list[int]) -> int:
        return max(self.max_model_len - len(prompt), 1)

    async def run(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        stop: Sequence[str],
        usage: Usage,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Delta]:
        """Deltas of text and token ids; ``usage`` is filled in as tokens arrive.

        ``timeout_s`` (the client's, capped by the router's) bounds the whole request.
        """
        detok = self.tokenizer.detokenizer(stop) if self.tokenizer.available else None
        usage.prompt_tokens = len(prompt)
        self.metrics.prompt_tokens.inc(len(prompt))
        start = last = time.perf_counter()
        gen = self.router.generate(rid, prompt, params, timeout_s)
        try:
            async for chunk in gen:
                now = time.perf_counter()
                # Router.generate's Chunk; stand-ins for it may leave logprobs out.
                logprobs = getattr(chunk, "logprobs", None)
                token_ids = list(chunk.token_ids)
                text = ""
                if detok is not None:  # a message may carry several tokens (a worker that
                    # fell behind coalesces): a stop string ends the text at its own token
                    for i, token in enumerate(token_ids):
                        text += detok.push([token])
                        if detok.stopped:
                            token_ids = token_ids[: i + 1]
                            logprobs = logprobs[: i + 1] if logprobs else logprobs
                            break
                if token_ids:
                    if usage.completion_tokens == 0:
                        self.metrics.time_to_first_token.observe(now - start)
                        usage.cached_tokens = chunk.num_cached_tokens
                    else:
                        self.metrics.inter_token_latency.observe(now - last)
                    last = now
                usage.completion_tokens += len(token_ids)
                self.metrics.generation_tokens.inc(len(token_ids))
                if detok is not None and detok.stopped:
                    self._done(start, "stop")
                    yield Delta(text, token_ids, True, "stop", logprobs)
                    return  # closing the generator aborts the request on the workers
                if chunk.finished:
                    text += detok.flush() if detok is not None else ""
                    reason = chunk.finish_reason or "stop"
                    if detok is not None and detok.stopped:
                        reason = "stop"
                    self._done(start, reason)
                    yield Delta(text, token_ids, True, reason, logprobs)
                    return
                yield Delta(text, token_ids, logprobs=logprobs)
        finally:
            await gen.aclose()

    def _done(self, start: float, reason: str) -> None:
        self.metrics.e2e_request_latency.observe(time.perf_counter() - start)
        self.metrics.request_success.labels(reason).inc()
