"""SLA planner: size the prefill and decode pools together from latency targets and load.

Pure functions. A pool's group serves at most ``capacity`` tokens/s; with a simple queueing
model its latency grows as ``base / (1 - utilisation)``, so meeting a target latency ``T`` allows
a utilisation of ``1 - base / T`` at most. Prefill is sized on prompt tokens/s plus the queued
prompt tokens that must clear within the TTFT target; decode on generated tokens/s against the
ITL target. Measured latencies above target add a group (the model was optimistic).

Rules that are not arithmetic:
- never a prefill-only deployment: decode is at least 1 whenever anything runs (a decode worker
  can prefill locally, a prefill worker alone serves nothing);
- scale to zero only after ``idle_s`` without load, and wake on held requests at the router;
- hysteresis: up at once, down only when the smaller size would still run below
  ``down_utilisation`` of the SLA utilisation, and only ``down_delay_s`` after the last change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moeserve.common.spec_ops import ScaleToZeroSpec, SlaAutoscalingSpec

__all__ = ["SlaTargets", "GroupCapacity", "LoadSample", "PlannerConfig", "PlannerState",
           "Decision", "plan_groups", "needed_groups", "fixed_ratio_groups", "predicted_latency"]


@dataclass(frozen=True)
class SlaTargets:
    ttft_s: float
    itl_s: float


@dataclass(frozen=True)
class GroupCapacity:
    """One EP group's throughput ceiling and unloaded latency, per pool (from benchmarks)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_base_s: float = 0.2  # TTFT of a lone request
    decode_base_s: float = 0.02  # ITL of a lone request


@dataclass(frozen=True)
class LoadSample:
    """What the metrics say now (rates over the last window, summed over the deployment)."""

    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    queued_prompt_tokens: float = 0.0  # waiting prompt tokens: they must clear within TTFT
    held_requests: int = 0  # requests the router holds while the deployment is at zero
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None


@dataclass(frozen=True)
class PlannerConfig:
    # Group bounds default to the spec's (spec.autoscaling), the one place they are set.
    min_prefill: int = SlaAutoscalingSpec.model_fields["min_prefill"].default
    max_prefill: int = SlaAutoscalingSpec.model_fields["max_prefill"].default
    min_decode: int = SlaAutoscalingSpec.model_fields["min_decode"].default
    max_decode: int = SlaAutoscalingSpec.model_fields["max_decode"].default
    down_utilisation: float = 0.7
    down_delay_s: float = SlaAutoscalingSpec.model_fields["scale_down_delay_seconds"].default
    scale_to_zero: bool = ScaleToZeroSpec.model_fields["enabled"].default
    idle_s: float = ScaleToZeroSpec.model_fields["idle_seconds"].default
    # wake a prefill group along with the decode group
    wake_prefill: bool = ScaleToZeroSpec.model_fields["wake_prefill"].default


@dataclass(frozen=True)
class PlannerState:
    prefill: int
    decode: int
    last_change: float = 0.0
    idle_since: float | None = None


@dataclass(frozen=True)
class Decision:
    state: PlannerState
    reason: str


def _sla_utilisation(base: float, target: float) -> float:
    return max(0.05, 1.0 - base / target)


def needed_groups(load: LoadSample, cap: GroupCapacity, sla: SlaTargets,
                  utilisation_scale: float = 1.0) -> tuple[int, int]:
    """Groups that carry ``load`` within the SLA (each pool on its own, no bounds)."""
    u_p = _sla_utilisation(cap.prefill_base_s, sla.ttft_s) * utilisation_scale
    u_d = _sla_utilisation(cap.decode_base_s, sla.itl_s) * utilisation_scale
    prefill_rate = load.prefill_tokens_per_s + load.queued_prompt_tokens / sla.ttft_s
    prefill = math.ceil(prefill_rate / (cap.prefill_tokens_per_s * u_p) - 1e-9)
    decode = math.ceil(load.decode_tokens_per_s / (cap.decode_tokens_per_s * u_d) - 1e-9)
    return max(prefill, 0), max(decode, 0)


def predicted_latency(load: LoadSample, cap: GroupCapacity, prefill: int,
                      decode: int) -> tuple[float, float]:
    """(TTFT, ITL) the queueing model predicts for a size; inf when a pool is overloaded.
    With no prefill group the decode groups prefill locally and carry both loads."""
    def lat(base: float, demand: float, capacity: float) -> float:
        if demand <= 0:
            return base
        u = demand / capacity if capacity > 0 else math.inf
        return base / (1 - u) if u < 1 else math.inf

    if decode == 0:
        return math.inf, math.inf
    prompt = load.prefill_tokens_per_s
    if prefill == 0:
        # Local prefill shares the decode groups' time: both rates load one resource.
        u = prompt / (decode * cap.prefill_tokens_per_s) + \
            load.decode_tokens_per_s / (decode * cap.decode_tokens_per_s)
        if u >= 1:
            return math.inf, math.inf
        return cap.prefill_base_s / (1 - u), cap.decode_base_s / (1 - u)
    return (lat(cap.prefill_base_s, prompt, prefill * cap.prefill_tokens_per_s),
            lat(cap.decode_base_s, load.decode_tokens_per_s, decode * cap.decode_tokens_per_s))


def fixed_ratio_groups(load: LoadSample, cap: GroupCapacity, sla: SlaTargets,
                       ratio: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """What per-pool HPAs tied to one fixed prefill:decode ratio would run: both pools scale
    by the factor the busier one needs (the baseline the planner is compared with)."""
    prefill, decode = needed_groups(load, cap, sla)
    factor = max(math.ceil(prefill / ratio[0]), math.ceil(decode / ratio[1]), 1)
    return factor * ratio[0], factor * ratio[1]


def _clamp(value: int, low: int, high: int) -> int:
    return min(max(value, low), high)


def plan_groups(load: LoadSample, cap: GroupCapacity, sla: SlaTargets, cfg: PlannerConfig,
                state: PlannerState, now: float) -> Decision:
    """The next (prefill, decode) size and why."""
    busy = load.prefill_tokens_per_s > 0 or load.decode_tokens_per_s > 0 or \
        load.queued_prompt_tokens > 0 or load.held_requests > 0
    idle_since = None if busy else (state.idle_since if state.idle_since is not None else now)
    if state.decode == 0:
        if not load.held_requests and not busy:
            return Decision(replace(state, idle_since=idle_since), "at zero, no demand")
        wake = (1 if cfg.wake_prefill else 0, 1)
        want = needed_groups(load, cap, sla)
        prefill = _clamp(max(want[0], wake[0], cfg.min_prefill), 0, cfg.max_prefill)
        decode = _clamp(max(want[1], wake[1], cfg.min_decode, 1), 1, cfg.max_decode)
        return Decision(PlannerState(prefill, decode, now, None), "wake: demand at zero")
    if cfg.scale_to_zero and idle_since is not None and now - idle_since >= cfg.idle_s:
        return Decision(PlannerState(0, 0, now, idle_since), f"idle for {int(now - idle_since)}s")

    up_p, up_d = needed_groups(load, cap, sla)
    if load.ttft_p90_s is not None and load.ttft_p90_s > sla.ttft_s:
        up_p = max(up_p, state.prefill + 1)  # the model was optimistic: measured wins
    if load.itl_p90_s is not None and load.itl_p90_s > sla.itl_s:
        up_d = max(up_d, state.decode + 1)
    # A lower size is taken only if it would still run well below the SLA utilisation.
    down_p, down_d = needed_groups(load, cap, sla, cfg.down_utilisation)
    may_shrink = now - state.last_change >= cfg.down_delay_s

    def next_size(current: int, up: int, down: int) -> int:
        if up > current:
            return up
        if may_shrink and down < current:
            return down
        return current

    prefill = _clamp(next_size(state.prefill, up_p, down_p), cfg.min_prefill, cfg.max_prefill)
    decode = _clamp(next_size(state.decode, up_d, down_d), max(cfg.min_decode, 1),
                    cfg.max_decode)
    if (prefill, decode) == (state.prefill, state.decode):
        return Decision(replace(state, idle_since=idle_since), "steady")
    return Decision(PlannerState(prefill, decode, now, idle_since),
                    f"load needs prefill {up_p}, decode {up_d}")
