"""One request's state inside the worker engine: tokens, progress, blocks, status."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence

from moeserve.common.block_hash import ROOT_PARENT_HASH, hash_block
from moeserve.common.sampling import SamplingParams

__all__ = ["FINISH_REASONS", "Request", "RequestStatus"]

# Arrival order breaks ties between requests; a process-wide counter like nano-vllm's.
_ARRIVALS = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # Blocks allocated, the prompt's KV being read from a prefill worker (not schedulable).
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in FINISH_REASONS


FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """Tokens and progress of one request; mutated only by the scheduler.

    ``block_hashes`` is the hash chain of every full block of ``all_token_ids`` and grows as
    tokens are appended; it stays empty when ``block_size`` is None (prefix caching off).
    ``num_computed_tokens`` counts tokens whose KV is in ``block_ids``' blocks.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        *,
        block_size: int | None = None,
        model_id: str = "",
        arrival_index: int | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.block_size = block_size
        self.model_id = model_id
        self.arrival_index = next(_ARRIVALS) if arrival_index is None else arrival_index

        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.block_hashes: list[int] = []
        self.status = RequestStatus.WAITING
        # Prefill-only requests (disaggregated serving) keep their blocks after finishing,
        # until the decode worker has read them (Scheduler.release_pinned).
        self.pin_on_finish = False
        self._extend_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.all_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """ "stop", "length", "abort", or None while the request is unfinished."""
        return FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._extend_block_hashes()

    def tokens_to_suppress(self, ahead: int = 0) -> tuple[int, ...]:
        """Token ids the sampler must not pick now: EOS and stop ids before ``min_tokens``.

        ahead: output tokens already sampled but not yet appended (a step scheduled ahead).
        """
        params = self.sampling_params
        if self.num_output_tokens + ahead >= params.min_tokens:
            return ()
        eos = () if self.eos_token_id is None or params.ignore_eos else (self.eos_token_id,)
        return eos + params.stop_token_ids

    def _extend_block_hashes(self) -> None:
        # Incremental: only blocks that became full since the last call are hashed.
        size = self.block_size
        if size is None:
            return
        while (len(self.block_hashes) + 1) * size <= len(self.all_token_ids):
            start = len(self.block_hashes) * size
            parent = self.block_hashes[-1] if self.block_hashes else ROOT_PARENT_HASH
            tokens = self.all_token_ids[start : start + size]
            self.block_hashes.append(hash_block(parent, tokens, self.model_id))

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
