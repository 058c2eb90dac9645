"""Continuous batching with a per-step token budget (vLLM v1 style, no prefill/decode phases).

Each step ``schedule()`` picks ``{request_id: num_tokens}`` so that every request's
``num_computed_tokens`` catches up with its ``num_tokens``: a decode gets 1 token, a prompt gets
its uncached remainder, chunked when it exceeds the budget. Running requests go first, then
waiting ones in arrival order. When blocks run out the most recently admitted running request
is preempted (its KV dropped, recomputed later). ``update_from_output()`` applies one step's
sampled tokens, checks stop conditions and frees finished requests.

``schedule_ahead()`` builds decode step N+1 while step N still runs on the device (async
scheduling): each row's input token is the one step N samples, named by its row there, so the
host never waits between steps. Requests that step N finishes by a stop token still compute
one wasted row in N+1; their blocks are freed only once N+1 is done, so the wasted KV write
cannot land in a block that was handed to someone else.

A request whose prompt KV another worker computed (disaggregated serving) enters as
``WAITING_FOR_REMOTE_KV`` (``add_remote_kv_request``): its blocks are allocated at once, as for
any request, but it is never scheduled while the KV is read into them. ``finish_remote_kv``
ends the wait: with the prefill worker's first token it waits first in line, holding its blocks,
and is admitted like any request, so ``max_num_seqs`` (which sizes the runner's buffers) holds;
without (the READ failed) its blocks go back and the prompt waits to be prefilled here. An abort
during the READ finishes the request but keeps its blocks until ``finish_remote_kv`` says the
READ is over, so no block the READ may still write is handed to another request.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from moeserve.common.errors import InvalidRequestError
from moeserve.worker.kv_cache_manager import KVCacheManager
from moeserve.worker.request import Request, RequestStatus
from moeserve.worker.scheduler_types import (
    EngineCoreOutput,
    RemoteKVBlocks,
    SchedulerConfig,
    SchedulerOutput,
)

__all__ = ["EngineCoreOutput", "RemoteKVBlocks", "Scheduler", "SchedulerConfig",
           "SchedulerOutput"]

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        capacity = kv_manager.num_usable_blocks * kv_manager.block_size
        if config.max_model_len is not None and config.max_model_len > capacity:
            # A lone request must always fit, or preemption could never make room for it.
            logger.warning(
                "max_model_len=%d exceeds the KV cache (%d tokens); capping it",
                config.max_model_len,
                capacity,
            )
        self.max_model_len = min(config.max_model_len or capacity, capacity)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the tail is preempted first
        self._finished_req_ids: set[str] = set()
        self.pinned: dict[str, Request] = {}  # finished prefill-only requests holding blocks
        # Blocks allocated, KV being read from a prefill worker: in `requests`, never scheduled.
        self.waiting_for_remote_kv: dict[str, Request] = {}
        # Aborted while their READ runs: finished, blocks held until finish_remote_kv.
        self._aborted_reading: dict[str, Request] = {}
        self._ahead: list[SchedulerOutput] = []  # from schedule_ahead, not applied yet
        self._free_later: list[Request] = []  # finished, but a step in `_ahead` writes their KV

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        """True while a step has work; a request waiting for remote KV needs none (the READ
        runs outside the engine step), so the engine thread does not spin on it."""
        return len(self.requests) > len(self.waiting_for_remote_kv)

    @staticmethod
    def needs_sampling(req: Request, num_scheduled_tokens: int) -> bool:
        """True when this step's chunk reaches the end of ``req``'s known tokens."""
        return req.num_computed_tokens + num_scheduled_tokens == req.num_tokens

    def add_request(self, req: Request) -> None:
        self._check_new(req)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def _check_new(self, req: Request) -> None:
        if req.request_id in self.requests or req.request_id in self._aborted_reading:
            raise InvalidRequestError(f"duplicate request id {req.request_id!r}", param="id")
        if req.num_tokens == 0:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if req.num_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {req.num_tokens} tokens, more than the context limit "
                f"max_model_len={self.max_model_len}",
                param="prompt",
            )

    def add_remote_kv_request(self, req: Request) -> RemoteKVBlocks | None:
        """Admit ``req`` as WAITING_FOR_REMOTE_KV with blocks for its whole prompt, reusing what
        the prefix cache holds; None (nothing admitted) when the pool cannot hold the prompt."""
        self._check_new(req)
        computed, num_cached = self.kv.get_computed_blocks(req)
        blocks = self.kv.allocate(req, req.num_tokens - num_cached, computed)
        if blocks is None:
            return None
        req.block_ids.extend(blocks)
        req.num_cached_tokens = num_cached
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.requests[req.request_id] = req
        self.waiting_for_remote_kv[req.request_id] = req
        return RemoteKVBlocks(list(req.block_ids), len(computed))

    def finish_remote_kv(
        self, request_id: str, first_token_id: int | None
    ) -> EngineCoreOutput | None:
        """The READ is over (done, failed or cancelled). With the prefill worker's first token
        the request waits, first in line, to run from its next token; with None its blocks go
        back and it waits to be prefilled here (None). Aborted meanwhile: blocks freed (None)."""
        if (aborted := self._aborted_reading.pop(request_id, None)) is not None:
            self.kv.free(aborted)
            aborted.block_ids.clear()
            return None
        req = self.waiting_for_remote_kv.pop(request_id, None)
        if req is None:
            raise InvalidRequestError(f"no KV reservation for request {request_id!r}",
                                      param="request_id")  # fmt: skip
        if first_token_id is None:
            self.kv.free(req)
            req.block_ids.clear()
            req.num_cached_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.append(req)
            return None
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.cache_full_blocks(req, req.num_computed_tokens)
        req.append_output_token(first_token_id)
        status = self._check_stop(req, first_token_id)
        if status is not None:
            self._finish(req, status)
        else:
            # Admitted by _schedule_waiting like any request: max_num_seqs holds for it too.
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        return self._output(req, [first_token_id])

    def release_pinned(self, request_id: str) -> bool:
        """Free a finished prefill-only request's blocks; False when none are pinned for it."""
        req = self.pinned.pop(request_id, None)
        if req is None:
            return False
        self.kv.free(req)
        req.block_ids.clear()
        return True

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish the named requests as "abort"; unknown or finished ids are ignored."""
        outputs = []
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                del self.waiting_for_remote_kv[request_id]
                self._aborted_reading[request_id] = req
            else:
                self.waiting.remove(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(req, []))
        return outputs

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = set()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        # Admitting right after preempting would only thrash the cache.
        if not out.preempted_req_ids:
            self._schedule_waiting(out, budget)
        return out

    def schedule_ahead(
        self, prev: SchedulerOutput, sampled_rows: dict[str, int]
    ) -> SchedulerOutput | None:
        """The next decode step, built before ``prev``'s sampled tokens are known.

        ``sampled_rows``: request id -> row of its token among ``prev``'s sampled tokens.
        Every running request gets one token: those ``prev`` samples for read it from there,
        the others (admitted since, e.g. KV from a prefill worker) have theirs already.
        Requests ``prev`` finishes for certain (max_tokens, max_model_len) are left out. None
        when this step is not a plain continuation (waiting requests to admit, a prompt
        chunk in flight, no blocks without preempting): then apply ``prev`` and ``schedule``.
        """
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return None
        if len(self.running) > self.config.max_num_batched_tokens:
            return None
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids)
        rows = []
        for req in self.running:
            row = sampled_rows.get(req.request_id)
            if row is not None:
                if prev.num_scheduled_tokens.get(req.request_id) != 1:
                    return None  # a prompt's last chunk: its first decode waits for it
                if self._finishes_on_next_token(req):
                    continue
                out.ahead_rows[req.request_id] = row
            elif req.request_id in prev.num_scheduled_tokens or (
                req.num_computed_tokens + 1 != req.num_tokens
            ):
                return None  # a prompt chunk, not a decode: its next tokens are not settled
            rows.append(req)
        if not rows:
            return None
        for req in rows:
            ahead = 1 if req.request_id in out.ahead_rows else 0
            new_blocks = self.kv.allocate(req, 1 + ahead)
            if new_blocks is None:
                return None  # blocks taken so far stay with their requests for later steps
            req.block_ids.extend(new_blocks)
            self._add_to_batch(out, req, 1)
        self._finished_req_ids = set()
        self._ahead.append(out)
        return out

    def _finishes_on_next_token(self, req: Request) -> bool:
        """True when the token being sampled for ``req`` ends it whatever its value."""
        return req.pin_on_finish or self._at_length_limit(req, pending=1)

    def _at_length_limit(self, req: Request, pending: int = 0) -> bool:
        """``req`` has reached max_tokens or max_model_len once ``pending`` more tokens are
        appended (the length half of `_check_stop`)."""
        return (req.num_output_tokens + pending >= req.sampling_params.max_tokens
                or req.num_tokens + pending >= self.max_model_len)

    def _chunk(self, req: Request, num_cached: int, budget: int) -> int:
        num_new = req.num_tokens - req.num_computed_tokens - num_cached
        if self.config.enable_chunked_prefill and self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return min(num_new, budget)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req, 0, budget)
            while (new_blocks := self.kv.allocate(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_req_ids.append(victim.request_id)
                if victim is req:
                    break
            if new_blocks is None:
                break  # req itself was preempted; everything after it already was
            req.block_ids.extend(new_blocks)
            self._add_to_batch(out, req, num_new)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.block_ids:  # its prompt KV arrived from a prefill worker: a decode
                if not self._admit_with_kv(out, req):
                    break
                budget -= 1
                continue
            computed_blocks, num_cached = self.kv.get_computed_blocks(req)
            num_new = self._chunk(req, num_cached, budget)
            if not self.config.enable_chunked_prefill and num_new < req.num_tokens - num_cached:
                break  # strict arrival order: nobody overtakes a prompt that does not fit
            new_blocks = self.kv.allocate(req, num_new, computed_blocks)
            if new_blocks is None:
                break
            self.waiting.popleft()
            req.block_ids.extend(new_blocks)
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.new_req_ids.append(req.request_id)
            self._add_to_batch(out, req, num_new)
            budget -= num_new

    def _admit_with_kv(self, out: SchedulerOutput, req: Request) -> bool:
        """Admit a request whose prompt KV is in its blocks already; False: no block free."""
        num_new = req.num_tokens - req.num_computed_tokens
        if (new_blocks := self.kv.allocate(req, num_new)) is None:
            return False
        req.block_ids.extend(new_blocks)
        req.status = RequestStatus.RUNNING
        self.running.append(self.waiting.popleft())
        self._add_to_batch(out, req, num_new)
        return True

    @staticmethod
    def _add_to_batch(out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.scheduled.append(req)
        out.num_scheduled_tokens[req.request_id] = num_new

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.block_ids.clear()
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: dict[str, int]
    ) -> list[EngineCoreOutput]:
        """Apply one step: advance progress, append sampled tokens, finish what stopped.

        ``sampled_token_ids`` holds exactly the requests whose chunk reached their last token.
        Returns an output for every request that got a token or finished.
        """
        outputs = []
        if any(step is output for step in self._ahead):  # it has run: free what it held
            self._ahead = [step for step in self._ahead if step is not output]
            held = [r for r in self._free_later if self._in_ahead_step(r)]
            for req in self._free_later:
                if not self._in_ahead_step(req):
                    self.kv.free(req)
                    req.block_ids.clear()
            self._free_later = held
        for req in output.scheduled:
            if req.is_finished:
                continue  # aborted, or stopped by the step before, after it was scheduled
            n = output.num_scheduled_tokens[req.request_id]
            sampled = self.needs_sampling(req, n)
            if sampled != (req.request_id in sampled_token_ids):
                raise ValueError(
                    f"request {req.request_id!r}: a sampled token is expected exactly when "
                    f"the chunk reaches the last token (needs_sampling={sampled})"
                )
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req, req.num_computed_tokens)
            if not sampled:
                continue
            token_id = sampled_token_ids[req.request_id]
            req.append_output_token(token_id)
            status = self._check_stop(req, token_id)
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            outputs.append(self._output(req, [token_id]))
        return outputs

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens and (
            (token_id == req.eos_token_id and not params.ignore_eos)
            or token_id in params.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if req.pin_on_finish:  # prefill-only: the decode worker takes it from here
            return RequestStatus.FINISHED_LENGTH
        if self._at_length_limit(req):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.pin_on_finish and status != RequestStatus.FINISHED_ABORTED:
            self.pinned[req.request_id] = req
        elif req.request_id in self._aborted_reading:
            pass  # its READ may still write into its blocks: freed by finish_remote_kv
        elif self._in_ahead_step(req):
            self._free_later.append(req)
        else:
            self.kv.free(req)
            req.block_ids.clear()
        req.status = status
        del self.requests[req.request_id]
        self._finished_req_ids.add(req.request_id)

    def _in_ahead_step(self, req: Request) -> bool:
        return any(req.request_id in step.num_scheduled_tokens for step in self._ahead)

    @staticmethod
    def _output(req: Request, new_token_ids: list[int]) -> EngineCoreOutput:
        return EngineCoreOutput(
            request_id=req.request_id,
            new_token_ids=new_token_ids,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_cached_tokens=req.num_cached_tokens,
        )
