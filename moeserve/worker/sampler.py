"""Batched token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Sampling uses the exponential race: ``argmax(probs / q)`` with ``q ~ Exponential(1)`` i.i.d.
picks token i with probability ``probs[i]``. It needs no cumulative sums or multinomial kernel
(no host sync), and a seeded row draws its ``q`` from its own generator in vocabulary order, so
its tokens depend only on its seed and its own logits, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeserve.common.sampling import SamplingParams, TokenLogprobs
from moeserve.worker.grammar import apply_token_bitmask
from moeserve.worker.host_to_device import to_device
from moeserve.worker.logits_processors import (
    LogprobsOutput,
    PenaltyInputs,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
)

__all__ = ["SampledTokens", "Sampler", "advance_generator", "feed_back", "make_generator"]


class SampledTokens:
    """One launched step's sampled tokens, on their way to the host.

    On CUDA the device-to-host copy is queued behind the step and `result` waits for it, so
    the host can schedule and launch the next step in between. The step's logprobs (when a
    row asked for them) travel in the same copy, behind the same event: ``top_k[i]`` is how
    many alternatives row i asked for (None: no logprobs).
    """

    def __init__(self, request_ids: list[str], tokens: torch.Tensor | None,
                 logprobs: LogprobsOutput | None = None,
                 top_k: list[int | None] | None = None):
        self.request_ids = request_ids
        self._event = None
        self._top_k = top_k or []
        parts = [tokens]
        if logprobs is not None:
            parts += [logprobs.chosen, logprobs.top_logprobs, logprobs.top_ids]
        if tokens is not None and tokens.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts]
            for h, t in zip(host, parts, strict=True):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            parts = host
        self._host = parts[0]
        self._logprobs = parts[1:] if logprobs is not None else None

    @property
    def rows(self) -> dict[str, int]:
        """request id -> its row among the sampled tokens (and in the runner's last_sampled)."""
        return {request_id: row for row, request_id in enumerate(self.request_ids)}

    def result(self) -> dict[str, int]:
        """request id -> sampled token id; waits for the step to finish."""
        if self._host is None:
            return {}
        if self._event is not None:
            self._event.synchronize()
        return dict(zip(self.request_ids, self._host.tolist(), strict=True))

    def logprobs(self) -> dict[str, TokenLogprobs]:
        """request id -> its token's logprobs, for the rows that asked; call after `result`."""
        if self._logprobs is None or self._host is None:
            return {}
        chosen, top_lp, top_ids = (t.tolist() for t in self._logprobs)
        tokens = self._host.tolist()
        out = {}
        for row, (rid, k) in enumerate(zip(self.request_ids, self._top_k, strict=True)):
            if k is not None:
                top = tuple(zip(top_ids[row][:k], top_lp[row][:k], strict=True))
                out[rid] = TokenLogprobs(tokens[row], chosen[row], top)
        return out


def feed_back(input_ids: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with each negative entry ``-1 - r`` replaced by ``sampled[r]``: the
    token row r of the step before sampled, which the host has not seen yet. No host sync,
    so it also runs inside a captured decode graph."""
    rows = (-1 - input_ids).clamp_(min=0)
    return torch.where(input_ids < 0, sampled[rows], input_ids)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``; keep one per request across steps."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def advance_generator(generator: torch.Generator, vocab_size: int, steps: int) -> None:
    """Consume the draws `steps` sampled tokens took, so a request whose first tokens were
    sampled elsewhere (a prefill worker) continues the same random stream here."""
    scratch = torch.empty(vocab_size, device=generator.device)
    for _ in range(steps):
        scratch.exponential_(generator=generator)


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        suppress_token_ids: Sequence[Sequence[int]] | None = None,
        penalties: PenaltyInputs | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pick one token per row.

        Args:
            logits: [N, V] float32 (other float dtypes are upcast), one row per request.
            params: N sampling params, row-aligned with ``logits``.
            generators: N generators (on ``logits.device``) or None; a row with a generator
                draws its noise from it, others from the global RNG.
            suppress_token_ids: optional N lists of token ids masked out before sampling
                (EOS / stop ids before ``min_tokens``; see ``Request.tokens_to_suppress``).
            penalties: the seen tokens of rows with penalties (logits_processors.py).
            allowed: optional [N, ceil(V/32)] int32 token bitmask on ``logits.device``
                (structured outputs, worker/grammar.py); clear bits are never sampled.
        ``logits`` itself is never modified (the runner reads the raw logprobs from it).
        Returns:
            [N] int64 token ids on ``logits.device``.
        """
        num_rows, vocab = logits.shape
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(
                f"{num_rows} logits rows but {len(params)} params, {len(generators)} generators"
            )
        logits = logits.float()
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits.clone(), params)
        if suppress_token_ids is not None and any(suppress_token_ids):
            logits = _suppress(logits, suppress_token_ids)
        if penalties is not None:
            logits = apply_penalties(logits.clone(), params, penalties)
        if allowed is not None:  # last: no bias or penalty can lift a masked token
            logits = apply_token_bitmask(logits, allowed)
        greedy_tokens = logits.argmax(dim=-1)
        greedy = [p.greedy for p in params]
        if all(greedy):
            return greedy_tokens

        device = logits.device
        # Greedy rows get neutral values so the batched math stays finite; their result is
        # replaced by the argmax at the end.
        temperature = to_device(
            [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
            device, torch.float32,
        )
        logits = logits / temperature.unsqueeze(1)
        if any(p.min_p > 0 and not g for p, g in zip(params, greedy, strict=True)):
            logits = apply_min_p(logits, [0.0 if g else p.min_p
                                          for p, g in zip(params, greedy, strict=True)])
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        # A zero draw would turn a masked token's 0/0 into NaN, which argmax picks.
        noise = _exponential_noise(probs, generators, greedy).clamp_(min=1e-20)
        sampled = probs.div_(noise).argmax(dim=-1)
        is_greedy = to_device(greedy, device, torch.bool)
        return torch.where(is_greedy, greedy_tokens, sampled)


def _suppress(logits: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Copy of ``logits`` [N, V] with the listed ids of each row set to -inf."""
    vocab = logits.shape[1]
    flat = [row * vocab + tok for row, ids in enumerate(token_ids) for tok in ids]
    # index_fill_ takes the value as a kernel argument; `t[i, j] = v` would copy a CPU
    # scalar to the device and wait for it.
    return logits.clone().view(-1).index_fill_(
        0, to_device(flat, logits.device, torch.int64), float("-inf")).view_as(logits)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """Mask ``logits`` [N, V] outside each row's top-k and top-p nucleus with -inf (one sort)."""
    device = logits.device
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    k = to_device(top_k, device, torch.int64).clamp_(max=vocab).unsqueeze(1)
    sorted_logits.masked_fill_(rank >= k, float("-inf"))

    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token while the mass before it is below p; the top token is always kept. Rows
    # with p == 1 skip the test so float rounding in cumsum cannot drop tail tokens.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    p = to_device([q if q < 1.0 else 2.0 for q in top_p], device, torch.float32).unsqueeze(1)
    drop = (mass_before >= p) & (rank > 0)
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(
    probs: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    skip: Sequence[bool],
) -> torch.Tensor:
    """[N, V] Exponential(1) noise: seeded rows from their generator, the rest in one draw."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        return noise.exponential_()
    if unseeded:
        idx = to_device(unseeded, probs.device, torch.int64)
        noise[idx] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for row, generator in enumerate(generators):
        # Greedy rows keep their generator untouched; their noise is never used.
        if generator is not None:
            if skip[row]:
                noise[row].fill_(1.0)
            else:
                noise[row].exponential_(generator=generator)
    return noise
