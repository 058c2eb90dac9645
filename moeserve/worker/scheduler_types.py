"""What the scheduler takes and returns: its limits, one step's work, one request's output.

Plain data, apart from the scheduler's logic so that the runner, the engine and the KV hand-off
can name these types without the scheduler (and so that scheduler.py stays small).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.common.errors import ConfigError
from moeserve.common.sampling import TokenLogprobs
from moeserve.worker.request import Request

__all__ = ["EngineCoreOutput", "RemoteKVBlocks", "SchedulerConfig", "SchedulerOutput",
           "merge_outputs"]


@dataclass
class SchedulerConfig:
    """Limits of one engine step.

    ``long_prefill_token_threshold`` caps one request's tokens per step (0 = only the budget
    caps it). ``max_model_len`` None means limited by KV capacity alone.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError("long_prefill_token_threshold must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not self.enable_chunked_prefill and (
            self.max_model_len is None or self.max_model_len > self.max_num_batched_tokens
        ):
            # Without chunking a whole prompt must fit one step's budget.
            raise ConfigError(
                "enable_chunked_prefill=False needs max_model_len <= max_num_batched_tokens, "
                f"got max_model_len={self.max_model_len}, "
                f"max_num_batched_tokens={self.max_num_batched_tokens}"
            )


@dataclass
class SchedulerOutput:
    """One step's work. ``scheduled`` is in batch order: running requests, then admitted ones.

    For each scheduled request the runner computes tokens
    ``all_token_ids[num_computed_tokens : num_computed_tokens + num_scheduled_tokens[id]]``
    into ``block_ids`` and samples a token when ``Scheduler.needs_sampling`` says so.
    """

    scheduled: list[Request] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    new_req_ids: list[str] = field(default_factory=list)  # admitted (or resumed) this step
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)  # since the previous step
    # Rows whose input token is still being sampled by the step before (schedule_ahead):
    # request id -> its row among that step's sampled tokens. Such a row computes position
    # num_computed_tokens + 1, as that step's token will have been applied by update time.
    ahead_rows: dict[str, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    # One per new token when the request asked for logprobs and they were computed here
    # (None for a first token sampled by a prefill worker).
    new_logprobs: list[TokenLogprobs] | None = None


def merge_outputs(first: EngineCoreOutput, later: object) -> EngineCoreOutput | None:
    """``first`` and the next output of the same request as one (tokens in order, the later
    one's end), or None where they do not merge: ``later`` is not an output (an error), or
    only one of them carries logprobs (a prefill worker's first token has none here)."""
    if (not isinstance(later, EngineCoreOutput) or first.finished
            or (first.new_logprobs is None) != (later.new_logprobs is None)):
        return None
    logprobs = None
    if first.new_logprobs is not None and later.new_logprobs is not None:
        logprobs = first.new_logprobs + later.new_logprobs
    return EngineCoreOutput(first.request_id, first.new_token_ids + later.new_token_ids,
                            later.finished, later.finish_reason, first.num_cached_tokens,
                            logprobs)


@dataclass(frozen=True)
class RemoteKVBlocks:
    """Blocks allocated for a prompt whose KV another worker computed (WAITING_FOR_REMOTE_KV).

    The first ``num_cached_blocks`` of ``block_ids`` already hold that prefix here (prefix
    cache), so only ``block_ids[num_cached_blocks:]`` must be read from the prefill worker.
    """

    block_ids: list[int]
    num_cached_blocks: int
