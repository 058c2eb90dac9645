"""LLMEngine: the loop schedule -> run -> update, and the API the server and CLI use.

Not thread-safe: one thread owns an engine and calls every method.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moeserve.common.errors import InvalidRequestError
from moeserve.common.model_config import ModelConfig, load_model_config
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.kv_cache_manager import KVCacheManager
from moeserve.worker.parallel.group import ParallelContext
from moeserve.worker.request import Request
from moeserve.worker.runner import ModelRunner, PendingSample, resolve_device
from moeserve.worker.sampler import SampledTokens
from moeserve.worker.scheduler import (
    EngineCoreOutput,
    RemoteKVBlocks,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

__all__ = ["LLMEngine", "EngineStats", "EngineCoreOutput", "RemoteKVBlocks",
           "freeze_startup_heap"]

logger = logging.getLogger(__name__)

_MAX_MODEL_LEN_DEFAULT_CAP = 32768


def freeze_startup_heap() -> None:
    """Take every object alive now (modules, the model's Python objects, captured graphs)
    out of the garbage collector's sight, once start-up is done, in a serving process.

    Python's full collections walk all of them: ~100 ms with torch and Triton loaded
    (measured on the 2-core CI machine), a pause that the step running at the time absorbs
    (it showed as 50-130 ms outliers in prefill timings). Afterwards a full collection only
    walks what serving itself allocates."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_kv_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_computed: int
    generation_tokens: int
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None):
        """parallel: this rank's EP group; with ep > 1 and none given, the group is joined from
        the environment (moeserve.worker.parallel.launch sets it for each local rank)."""
        # The step budget's default depends on the device: resolved once, before anything
        # (runner, scheduler, warm-up) reads the config.
        config = dataclasses.replace(config, max_num_batched_tokens=config.step_budget(
            resolve_device(config.device).type))
        self.config = config
        if parallel is None and config.ep > 1:
            from moeserve.worker.parallel.launch import join_group_from_env

            parallel = join_group_from_env(config)
        self.parallel = parallel
        self.model_config: ModelConfig = load_model_config(config.model)
        c = self.model_config
        self.max_model_len = config.max_model_len or min(
            c.max_position_embeddings, _MAX_MODEL_LEN_DEFAULT_CAP
        )
        if self.max_model_len > c.max_position_embeddings:
            raise InvalidRequestError(
                f"max_model_len={self.max_model_len} exceeds the checkpoint's "
                f"max_position_embeddings={c.max_position_embeddings}",
                param="max_model_len",
            )
        self.runner = ModelRunner(config, c, self.max_model_len, parallel)
        self.kv_manager = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.model_id,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            self.kv_manager,
        )
        self.max_model_len = self.scheduler.max_model_len
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._prompt_computed = 0
        self._generated = 0
        self._preemptions = 0
        self._async = parallel is None and (
            config.async_scheduling == "on"
            or (config.async_scheduling == "auto" and self.runner.device.type == "cuda")
        )
        # The step launched ahead by the previous `step` call, its tokens not yet applied.
        self._in_flight: tuple[SchedulerOutput, SampledTokens | PendingSample] | None = None
        logger.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
            config.model_id, self.runner.device, self.runner.dtype, self.runner.num_blocks,
            config.block_size, self.max_model_len,
        )

    @property
    def kv_cache(self):
        """[num_blocks, num_layers, block_size, kv_dim] tensor (register it once for NIXL)."""
        return self.runner.kv_cache

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request; raises InvalidRequestError naming the problem (engine unaffected).

        prefill_only: the request finishes after its first token and keeps its KV blocks
        pinned (`pinned_blocks`) until `release_pinned`, so a decode worker can read them.
        """
        req = self._new_request(request_id, prompt_token_ids, params)
        req.pin_on_finish = prefill_only
        self.scheduler.add_request(req)
        self._prefix_queries += len(prompt_token_ids)

    def _new_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Request:
        self._validate(prompt_token_ids, params)
        if request_id in self.scheduler.pinned:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="id")
        return Request(
            request_id, prompt_token_ids, params, self.model_config.eos_token_id,
            block_size=self.config.block_size if self.config.enable_prefix_caching else None,
            model_id=self.config.model_id,
        )

    def pinned_blocks(self, request_id: str) -> list[int]:
        """KV block ids of a finished prefill-only request (empty when none are pinned)."""
        req = self.scheduler.pinned.get(request_id)
        return list(req.block_ids) if req is not None else []

    def release_pinned(self, request_id: str) -> bool:
        return self.scheduler.release_pinned(request_id)

    def add_remote_kv_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> RemoteKVBlocks | None:
        """Queue a request whose prompt KV another worker computed: it waits, unscheduled,
        while that KV is read into the blocks returned (`finish_remote_kv` ends the wait).
        None when the pool is full; then nothing was queued (add it normally: recompute)."""
        req = self._new_request(request_id, prompt_token_ids, params)
        blocks = self.scheduler.add_remote_kv_request(req)
        if blocks is not None:
            self._prefix_queries += req.num_tokens
            self._prefix_hits += req.num_cached_tokens
        return blocks

    def finish_remote_kv(
        self, request_id: str, first_token_id: int | None
    ) -> list[EngineCoreOutput]:
        """The READ for ``request_id`` ended: with the prefill worker's first token the request
        joins the batch as a decode; with None (the transfer failed) it is recomputed here."""
        vocab = self.model_config.vocab_size
        bad = first_token_id is not None and not 0 <= first_token_id < vocab
        out = self.scheduler.finish_remote_kv(request_id, None if bad else first_token_id)
        if bad:
            raise InvalidRequestError(
                f"first token id {first_token_id} is outside the vocabulary; recomputing",
                param="first_token_id",
            )
        if out is None:
            return []
        self._generated += 1
        return [out]

    def _validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams", param="params")
        if len(prompt) == 0:
            raise InvalidRequestError("prompt must contain at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})", param="prompt"
            )
        for t, _ in params.logit_bias:
            if not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"logit_bias token id {t} is outside the vocabulary [0, {vocab})",
                    param="logit_bias",
                )
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"stop token id {t} is outside the vocabulary [0, {vocab})",
                    param="stop_token_ids",
                )
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"request needs {total} ({len(prompt)} prompt + {params.max_tokens} max_tokens)",
                param="max_tokens" if len(prompt) < self.max_model_len else "prompt",
            )

    def abort_request(self, request_id: str) -> list[EngineCoreOutput]:
        """Stop a request wherever it is (queued, running, waiting for remote KV or pinned);
        frees its blocks."""
        self.scheduler.release_pinned(request_id)
        return self.scheduler.abort_requests([request_id])

    def has_unfinished_requests(self) -> bool:
        """With expert parallelism this is a collective over the group (every rank calls it
        in the same order): true while any rank has work, so idle ranks keep stepping in
        lockstep and relay the others' tokens through their experts."""
        local = self.scheduler.has_unfinished_requests() or self._in_flight is not None
        if self.parallel is None:
            return local
        return self.parallel.any_rank_busy(local)

    def step(self) -> list[EngineCoreOutput]:
        """One batch: schedule, run the model, apply the sampled tokens.

        With async scheduling a decode step is launched before the previous step's tokens
        are applied (the pair overlaps the host's bookkeeping with the device's work); each
        call still returns the outputs of exactly one step, in order.
        """
        if self._in_flight is not None:
            out, sampled = self._in_flight
            self._in_flight = None
        else:
            out = self.scheduler.schedule()
            self._preemptions += len(out.preempted_req_ids)
            if out.is_empty and self.parallel is None:
                self.runner.forget(out.finished_req_ids)
                return []
            self._count_prompt_tokens(out)
            sampled = self.runner.launch(out)
        if self._async:
            ahead = self.scheduler.schedule_ahead(out, sampled.rows)
            if ahead is not None:
                self._in_flight = (ahead, self.runner.launch(ahead))
        outputs = self.scheduler.update_from_output(out, sampled.result())
        if self._in_flight is not None and isinstance(self._in_flight[1], PendingSample):
            # constrained rows: their masks needed the tokens just applied
            self._in_flight = (self._in_flight[0], self.runner.sample_pending(self._in_flight[1]))
        self._generated += sum(len(o.new_token_ids) for o in outputs)
        logprobs = sampled.logprobs()
        if logprobs:
            outputs = [dataclasses.replace(o, new_logprobs=[logprobs[o.request_id]])
                       if o.request_id in logprobs and o.new_token_ids else o for o in outputs]
        return outputs

    def _count_prompt_tokens(self, out: SchedulerOutput) -> None:
        for request_id in out.new_req_ids:
            req = self.scheduler.requests[request_id]
            if req.num_preemptions == 0:
                self._prefix_hits += req.num_cached_tokens
        for req in out.scheduled:
            start = req.num_computed_tokens
            end = min(start + out.num_scheduled_tokens[req.request_id], req.num_prompt_tokens)
            self._prompt_computed += max(0, end - start)

    def take_kv_events(self) -> list:
        return self.kv_manager.take_events()

    @property
    def prompt_tokens_computed(self) -> int:
        """Prompt tokens run through the model so far (not cached, not transferred)."""
        return self._prompt_computed

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.kv_manager.usage,
            num_kv_blocks=self.runner.num_blocks,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            prompt_tokens_computed=self._prompt_computed,
            generation_tokens=self._generated,
            num_preemptions=self._preemptions,
        )

    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[list[int]]:
        """Run prompts to completion in one continuous batch; returns generated token ids."""
        prompts = list(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(request_id, prompt, p)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished_requests():
            for o in self.step():
                tokens[o.request_id].extend(o.new_token_ids)
        return [tokens[i] for i in ids]
