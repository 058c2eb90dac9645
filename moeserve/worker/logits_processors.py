"""Per-request logits processing on the device: logit_bias, penalties, min_p, and logprobs.

Every function takes the batch's per-row parameters as host lists, moves them with
``to_device`` (an asynchronous copy in stream order) and works on whole tensors, so a step
never waits for the device. The runner calls ``penalty_inputs`` when it builds a step; the
Sampler applies the rest. The semantics follow vLLM's sampler:

- ``logit_bias`` is added to the raw logits;
- ``repetition_penalty`` divides a positive logit (multiplies a negative one) of every token
  seen in the prompt or the output; ``frequency_penalty`` subtracts ``count * penalty`` and
  ``presence_penalty`` subtracts ``penalty`` once for each token generated so far;
- ``min_p`` (after temperature) drops tokens whose probability is below ``min_p`` times the
  most likely token's;
- logprobs are of the raw model distribution, before all of the above (vLLM's default
  ``logprobs_mode=raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.host_to_device import to_device

__all__ = ["LogprobsOutput", "PenaltyInputs", "apply_logit_bias", "apply_min_p",
           "apply_penalties", "gather_logprobs", "penalty_inputs"]


@dataclass
class PenaltyInputs:
    """The tokens each penalized row has seen, on the device.

    ``rows``: batch rows with penalties. ``output_ids`` [R, L] and ``prompt_ids`` [R, P]:
    their generated and prompt tokens, padded with the vocabulary size (a column that is
    dropped). ``prompt_ids`` is None when no row has a repetition penalty (the only penalty
    that looks at the prompt).
    """

    rows: torch.Tensor
    row_list: list[int]
    output_ids: torch.Tensor
    prompt_ids: torch.Tensor | None


def _padded(lists: Sequence[Sequence[int]], pad: int) -> list[list[int]]:
    width = max(1, max(len(x) for x in lists))
    return [list(x) + [pad] * (width - len(x)) for x in lists]


def penalty_inputs(
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    prompt_ids: Sequence[Sequence[int]],
    vocab: int,
    device: torch.device | str,
    last_sampled: torch.Tensor | None = None,
) -> PenaltyInputs | None:
    """What ``apply_penalties`` needs for the rows of ``params`` that have penalties.

    An output id ``-1 - r`` stands for the token row r of the step before sampled, still on
    the device (a step scheduled ahead): it is read from ``last_sampled`` there, no sync.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return None
    out = to_device(_padded([output_ids[i] for i in rows], vocab), device, torch.int64)
    if last_sampled is not None:
        ahead = (-1 - out).clamp_(min=0)
        out = torch.where(out < 0, last_sampled[ahead], out)
    prompt = None
    if any(params[i].repetition_penalty != 1.0 for i in rows):
        prompt = to_device(_padded([prompt_ids[i] for i in rows], vocab), device, torch.int64)
    return PenaltyInputs(to_device(rows, device, torch.int64), rows, out, prompt)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``logits`` [N, V] (modified in place) plus each row's bias; ids past V are ignored."""
    vocab = logits.shape[1]
    flat, values = [], []
    for row, p in enumerate(params):
        for token_id, bias in p.logit_bias:
            if token_id < vocab:
                flat.append(row * vocab + token_id)
                values.append(bias)
    if flat:
        logits.view(-1).index_add_(0, to_device(flat, logits.device, torch.int64),
                                   to_device(values, logits.device, torch.float32))
    return logits


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    inputs: PenaltyInputs) -> torch.Tensor:
    """``logits`` [N, V] float32 with the rows of ``inputs`` penalized (in place)."""
    n, vocab = logits.shape
    device = logits.device
    sub = [params[i] for i in inputs.row_list]
    rows = logits.index_select(0, inputs.rows)
    counts = torch.zeros(len(sub), vocab + 1, device=device)
    counts.scatter_add_(1, inputs.output_ids, torch.ones_like(inputs.output_ids,
                                                              dtype=counts.dtype))
    counts = counts[:, :vocab]
    seen_output = counts > 0
    # One copy for the three per-row coefficients.
    coef = to_device([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                      for p in sub], device, torch.float32)
    rp, freq, pres = coef[:, 0:1], coef[:, 1:2], coef[:, 2:3]
    if inputs.prompt_ids is not None:
        seen = torch.zeros(len(sub), vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, inputs.prompt_ids, True)
        seen = seen[:, :vocab] | seen_output
        penalized = torch.where(rows > 0, rows / rp, rows * rp)
        rows = torch.where(seen, penalized, rows)
    rows = rows - freq * counts - pres * seen_output
    return logits.index_copy_(0, inputs.rows, rows)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """``logits`` [N, V] (after temperature) with tokens below ``min_p * max prob`` masked."""
    probs = torch.softmax(logits, dim=-1)
    threshold = to_device(list(min_p), logits.device, torch.float32).unsqueeze(1)
    drop = probs < threshold * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(drop, float("-inf"))


@dataclass
class LogprobsOutput:
    """One step's logprobs on the device: ``chosen`` [N], ``top_logprobs`` / ``top_ids``
    [N, k] (k the batch's largest request)."""

    chosen: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor


def gather_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobsOutput:
    """The chosen tokens' log-probabilities and the top ``k`` of each row, from the raw
    logits (log_softmax over the vocabulary in float32)."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if k > 0:
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    else:
        top_logprobs = logprobs.new_empty(logprobs.shape[0], 0)
        top_ids = tokens.new_empty(tokens.shape[0], 0)
    return LogprobsOutput(chosen, top_logprobs, top_ids)
