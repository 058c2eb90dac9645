"""The pure roll planner on simulated pools: every layout and budget converges to the new
revision, a ready compatible prefill/decode pair exists after every step, decode leads."""

from __future__ import annotations

import pytest

from moeserve.common.spec import RolloutSpec
from moeserve.operator.rollout import GroupState, plan_rollout

pytestmark = pytest.mark.timeout(30)


def _simulate(prefill: int, decode: int, surge: int, unavailable: int) -> list[dict]:
    observed = {"prefill": [GroupState(i, "A", True, compat="A") for i in range(prefill)],
                "decode": [GroupState(i, "A", True, compat="A") for i in range(decode)]}
    spec = RolloutSpec(max_surge=surge, max_unavailable=unavailable)
    history = []
    for _ in range(100):
        plans = plan_rollout({"prefill": prefill, "decode": decode},
                             {"prefill": "B", "decode": "B"}, observed,
                             {"prefill": spec, "decode": spec})
        for role, plan in plans.items():
            groups = {g.index: g for g in observed[role] if g.index not in plan.delete}
            for i in plan.apply:
                groups.setdefault(i, GroupState(i, "B", False, compat="B"))
            observed[role] = sorted(groups.values(), key=lambda g: g.index)
        history.append({r: list(v) for r, v in observed.items()})
        ready = {r: {g.compat for g in v if g.ready} for r, v in observed.items()}
        assert ready["prefill"] & ready["decode"], history
        assert len(observed["decode"]) <= decode + max(surge, 1)
        done = all(g.ready and g.revision == "B" for v in observed.values() for g in v)
        if done and not any(p.rolling for p in plans.values()):
            return history
        # The kubelet: one unready group becomes ready per step, decode first.
        for role in ("decode", "prefill"):
            pending = [g for g in observed[role] if not g.ready]
            if pending:
                g = pending[0]
                observed[role] = [GroupState(x.index, x.revision, True, compat=x.compat)
                                  if x is g else x for x in observed[role]]
                break
    raise AssertionError(f"no convergence: {history[-3:]}")


@pytest.mark.parametrize("layout", [(1, 1, 1, 0), (1, 1, 0, 1), (1, 2, 0, 1), (2, 3, 1, 0),
                                    (2, 2, 2, 1), (3, 1, 0, 2), (4, 4, 0, 4), (2, 2, 0, 2)])
def test_roll_converges_keeping_a_pair(layout: tuple[int, int, int, int]) -> None:
    history = _simulate(*layout)
    prefill, decode = layout[:2]
    final = history[-1]
    assert [g.index for g in final["prefill"]] == list(range(prefill))
    assert [g.index for g in final["decode"]] == list(range(decode))
    first = next(h for h in history if any(g.revision == "B" for v in h.values() for g in v))
    assert any(g.revision == "B" for g in first["decode"])  # decode leads


def test_frozen_pool_only_fills_slots() -> None:
    spec = RolloutSpec(max_surge=1)
    observed = {"prefill": [GroupState(0, "A", True, compat="A")],
                "decode": [GroupState(0, "A", True, compat="A"),
                           GroupState(1, "B", False, compat="B")]}
    plans = plan_rollout({"prefill": 1, "decode": 1}, {"prefill": "A", "decode": "B"},
                         observed, {"prefill": spec, "decode": spec}, frozen=["decode"])
    assert plans["decode"].delete == () and plans["decode"].keep == (0,)
    assert plans["decode"].apply == (1,) and plans["decode"].rolling


def test_progress_deadline_only_for_a_roll_with_old_groups() -> None:
    from moeserve.operator.rollout import PoolPlan, Progress, track_progress

    steady = [GroupState(0, "A", True, compat="A")]
    plan = PoolPlan("decode", "A", apply=(0,))
    first = track_progress(None, plan, steady, now=0, deadline_s=10)
    later = track_progress(first, plan, steady, now=100, deadline_s=10)
    assert later.progress_time == 0 and not later.stalled  # kept: no status churn, no stall
    rolling = PoolPlan("decode", "B", apply=(1,), keep=(0,), rolling=True)
    started = track_progress(later, rolling, steady, now=200, deadline_s=10)
    assert started.progress_time == 200 and not started.stalled  # new revision: clock starts
    stuck = track_progress(started, rolling, steady, now=215, deadline_s=10)
    assert stuck.stalled and isinstance(stuck, Progress)
    shrink = PoolPlan("decode", "A", apply=(0,), delete=(1,), rolling=True)
    assert not track_progress(first, shrink, steady, now=500, deadline_s=10).stalled
