"""Per-request sampling parameters, shared by the router (validation) and the worker (sampling).

No torch here: the router imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.common.errors import InvalidRequestError

__all__ = ["GREEDY_TEMPERATURE_EPS", "MAX_SEED", "SamplingParams"]

# Below this temperature logits / T overflows float32 for realistic logits, and the
# distribution is a point mass anyway, so such requests are sampled greedily.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_SEED = 2**63 - 1
# What the worker protocol carries (proto/moeserve/v1/common.proto: uint32 max_tokens and
# stop ids, int32 top_k); larger values would fail in the router's encoder, not as a 400.
_MAX_UINT32 = 2**32 - 1
_MAX_INT32 = 2**31 - 1


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a token id or a length is a caller bug.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    ``top_k`` of -1 or 0 disables top-k; ``top_p`` of 1.0 disables top-p. ``min_tokens``
    suppresses EOS and ``stop_token_ids`` until that many tokens were generated.
    ``stop_token_ids`` may be given as any iterable of ints; it is stored as a tuple.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
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

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token (temperature ~0 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
