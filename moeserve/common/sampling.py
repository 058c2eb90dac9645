"""Per-request sampling parameters, shared by the router (validation) and the worker (sampling).

No torch here: the router imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.common.errors import InvalidRequestError
from moeserve.common.structured import StructuredOutput

__all__ = ["GREEDY_TEMPERATURE_EPS", "MAX_LOGPROBS", "MAX_SEED", "SamplingParams",
           "TokenLogprobs"]

# Below this temperature logits / T overflows float32 for realistic logits, and the
# distribution is a point mass anyway, so such requests are sampled greedily.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_SEED = 2**63 - 1
# What the worker protocol carries (proto/moeserve/v1/common.proto: uint32 max_tokens and
# stop ids, int32 top_k); larger values would fail in the router's encoder, not as a 400.
_MAX_UINT32 = 2**32 - 1
_MAX_INT32 = 2**31 - 1
# Top alternatives per token: OpenAI's chat limit (vLLM's default --max-logprobs is 20 too).
MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a token id or a length is a caller bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the ``top`` (token id, logprob) pairs,
    most likely first (as many as the request's ``logprobs`` asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    ``top_k`` of -1 or 0 disables top-k; ``top_p`` of 1.0 disables top-p. ``min_tokens``
    suppresses EOS and ``stop_token_ids`` until that many tokens were generated.
    ``stop_token_ids`` may be given as any iterable of ints; it is stored as a tuple.

    Penalties follow OpenAI (``presence_penalty``, ``frequency_penalty`` in [-2, 2], on the
    tokens generated so far) and vLLM (``repetition_penalty`` > 0 on prompt and generated
    tokens, 1 disables). ``logit_bias`` maps token id -> bias in [-100, 100] added to the
    logits (a dict is stored as sorted pairs). ``min_p`` in [0, 1] drops tokens whose
    probability is below ``min_p`` times the top one's. ``logprobs`` None returns none; k
    returns the chosen token's logprob and the k most likely tokens' (the raw model
    distribution, before any of the processing above: vLLM's default ``raw_logprobs``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    logprobs: int | None = None
    # The output must match this (common/structured.py); None: unconstrained.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, dict):
            try:
                bias = tuple(sorted((int(k), v) for k, v in self.logit_bias.items()))
            except (TypeError, ValueError):
                raise InvalidRequestError(
                    "logit_bias keys must be token ids", param="logit_bias"
                ) from None
            object.__setattr__(self, "logit_bias", bias)
        elif not isinstance(self.logit_bias, tuple):
            raise InvalidRequestError("logit_bias must map token ids to numbers",
                                      param="logit_bias")
        if not isinstance(self.stop_token_ids, tuple):
            try:
                stop = tuple(self.stop_token_ids)
            except TypeError:
                raise InvalidRequestError(
                    "stop_token_ids must be a list of token ids", param="stop_token_ids"
                ) from None
            # Frozen dataclass: normalising the container is the one write we allow.
            object.__setattr__(self, "stop_token_ids", stop)
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first offending field."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= _MAX_UINT32:
            raise InvalidRequestError(
                f"max_tokens must be an integer in [1, 2**32 - 1], got {self.max_tokens!r}",
                param="max_tokens",
            )
        if (
            not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}",
                param="temperature",
            )
        if (
            not isinstance(self.top_p, int | float)
            or math.isnan(self.top_p)
            or not 0 < self.top_p <= 1
        ):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= _MAX_INT32:
            raise InvalidRequestError(
                f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}",
                param="top_k",
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}", param="seed"
            )
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or not 0 <= token_id <= _MAX_UINT32:
                raise InvalidRequestError(
                    f"stop_token_ids must be integers in [0, 2**32 - 1], got {token_id!r}",
                    param="stop_token_ids",
                )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(
                f"ignore_eos must be a boolean, got {self.ignore_eos!r}", param="ignore_eos"
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}",
                param="min_tokens",
            )
        self._validate_processing()
        self._validate_structured()

    def _validate_structured(self) -> None:
        s = self.structured
        if s is None:
            return
        if not isinstance(s, StructuredOutput):
            raise InvalidRequestError("structured must be a StructuredOutput", param="structured")
        # The grammar ends the output by forcing EOS (worker/grammar.py); these would keep
        # it going past the grammar's end.
        if self.ignore_eos:
            raise InvalidRequestError("ignore_eos cannot be combined with a structured output "
                                      "(the grammar decides where the output ends)",
                                      param="ignore_eos")
        if self.min_tokens:
            raise InvalidRequestError("min_tokens cannot be combined with a structured output "
                                      "(the grammar decides where the output ends)",
                                      param="min_tokens")

    def _validate_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be a number in [-2, 2], got {value!r}",
                                          param=name)
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0 < rp <= 2.0:
            raise InvalidRequestError(
                f"repetition_penalty must be a number in (0, 2], got {rp!r}",
                param="repetition_penalty",
            )
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}",
                                      param="min_p")
        for pair in self.logit_bias:
            if (not isinstance(pair, tuple) or len(pair) != 2 or not _is_int(pair[0])
                    or not 0 <= pair[0] <= _MAX_UINT32):
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids, got {pair!r}", param="logit_bias")
            if not _is_number(pair[1]) or not -100.0 <= pair[1] <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias values must be in [-100, 100], got {pair[1]!r} for token "
                    f"{pair[0]}", param="logit_bias",
                )
        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise InvalidRequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}",
                param="logprobs",
            )

    @property
    def has_penalties(self) -> bool:
        """True when the tokens seen so far change this request's logits."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token (temperature ~0 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
