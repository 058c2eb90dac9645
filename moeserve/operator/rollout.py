"""Rolling updates of the worker pools, group by group: a pure planner over observed groups.

A pool's EP groups live in fixed slots ``<name>-<role>-<i>`` (i < desired); a roll replaces the
group in a slot (delete, then create at the new revision) and may add surge groups in slots
``>= desired`` that are removed once every slot runs the new revision. Counting is in whole
groups: a group with one unready pod serves nothing.

Order: **decode first**. The router picks a decode worker first and then only prefill workers
whose compatibility fingerprint matches it; with no matching prefill worker the decode worker
prefills locally (``router/serving.py``). So a new decode group serves at once next to old
prefill groups, while a new prefill group next to only old decode groups is dead capacity.
Prefill therefore starts once a new decode group is ready. Throughout, the planner never deletes
a group if that would leave no ready prefill/decode pair of one revision (old+old or new+new)
where one existed. Pairing is judged on a compatibility key stamped on each group: a hash of what
feeds the workers' fingerprint (model, both pools' images, engine flags and layouts); a change to
it rolls both pools, a change elsewhere (env, resources) rolls one pool and keeps pairs valid.
When that guard and the budgets leave nothing to do, one extra "bridge" group is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moeserve.common.spec import ROLES, Role, RolloutSpec

__all__ = ["GroupState", "PoolPlan", "plan_rollout", "pair_ready", "ROLL_ORDER", "Progress",
           "track_progress"]

ROLL_ORDER: tuple[Role, ...] = ("decode", "prefill")


@dataclass(frozen=True)
class GroupState:
    """One observed EP group (a StatefulSet): its slot, template revision and readiness."""

    index: int
    revision: str
    ready: bool = False
    terminating: bool = False  # being deleted: occupies its slot, serves nothing
    compat: str = ""  # KV-compatibility key: prefill and decode pair only when equal


@dataclass(frozen=True)
class PoolPlan:
    """What to do with a pool now. ``apply``: slots rendered at the target revision (existing
    or created); ``keep``: old-revision groups left as they are; ``delete``: groups to remove."""

    role: Role
    revision: str
    apply: tuple[int, ...]
    keep: tuple[int, ...] = ()
    delete: tuple[int, ...] = ()
    rolling: bool = False  # groups of another revision remain (or surge groups to remove)
    waiting: str = ""  # why the roll cannot move now, for status messages


@dataclass
class _Pool:
    role: Role
    desired: int
    target: str
    spec: RolloutSpec
    groups: dict[int, GroupState] = field(default_factory=dict)
    created: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)

    def live(self) -> list[GroupState]:
        return [g for i, g in self.groups.items() if i not in self.deleted]

    def old(self) -> list[GroupState]:
        return [g for g in self.live() if g.revision != self.target and not g.terminating]

    def ready(self, revision: str | None = None) -> int:
        return sum(g.ready and not g.terminating and (revision is None or g.revision == revision)
                   for g in self.live())

    def revisions_ready(self) -> set[str]:
        """Compatibility keys of the ready groups (what pairing across pools is about)."""
        return {g.compat for g in self.live() if g.ready and not g.terminating}


def pair_ready(prefill: set[str], decode: set[str]) -> bool:
    """A ready prefill group and a ready decode group of one compatibility key exist."""
    return bool(prefill & decode)


def _pair_after(pools: Mapping[Role, _Pool], role: Role, index: int) -> bool:
    revs = {r: p.revisions_ready() for r, p in pools.items()}
    pool = pools[role]
    g = pool.groups[index]
    same = [o for o in pool.live() if o.ready and not o.terminating and o.compat == g.compat]
    if g.ready and len(same) == 1:
        revs[role] = revs[role] - {g.compat}
    return pair_ready(revs["prefill"], revs["decode"])


def _step(pools: dict[Role, _Pool], role: Role, may_start: bool, frozen: bool,
          bridge: int) -> None:
    pool = pools[role]
    n, spec = pool.desired, pool.spec
    occupied = {g.index for g in pool.live()}
    pool.created.extend(i for i in range(n) if i not in occupied)
    if frozen or not may_start:
        return
    # Surge: new groups in slots >= desired while old groups remain, within the budget.
    # The bridge only goes to a pool with no ready group of the new revision: that is the pool
    # whose new group would complete a new prefill/decode pair.
    bridge = bridge if pool.ready(pool.target) == 0 else 0
    budget = n + spec.max_surge + bridge - len(pool.live()) - len(pool.created)
    slot = n
    while budget > 0 and pool.old():
        while slot in occupied or slot in pool.created:
            slot += 1
        pool.created.append(slot)
        budget -= 1
    had_pair = pair_ready(pools["prefill"].revisions_ready(), pools["decode"].revisions_ready())
    _remove(pools, role, pool.old(), had_pair)
    # Surge groups out once no old group is left.
    if not pool.old():
        _remove(pools, role, [g for g in pool.live() if g.index >= n and not g.terminating],
                had_pair)


def _remove(pools: dict[Role, _Pool], role: Role, candidates: Sequence[GroupState],
            had_pair: bool) -> None:
    """Delete ``candidates``, unready ones first (they serve nothing), then from the highest
    slot, never dropping below desired - maxUnavailable ready groups or losing the last ready
    prefill/decode pair."""
    pool = pools[role]
    floor = pool.desired - pool.spec.max_unavailable
    for g in sorted(candidates, key=lambda g: (g.ready, -g.index)):
        if g.ready and pool.ready() - 1 < floor:
            continue
        if had_pair and not _pair_after(pools, role, g.index):
            continue
        pool.deleted.append(g.index)


def plan_rollout(desired: Mapping[Role, int], revisions: Mapping[Role, str],
                 observed: Mapping[Role, Sequence[GroupState]],
                 specs: Mapping[Role, RolloutSpec],
                 frozen: Sequence[Role] = ()) -> dict[Role, PoolPlan]:
    """The next actions for both pools, decode first. ``frozen`` pools (past their progress
    deadline) only keep their slots filled: no deletions, no surge."""
    plans: dict[Role, PoolPlan] = {}
    for bridge in (0, 1):
        pools = {r: _Pool(r, desired[r], revisions[r], specs[r],
                          {g.index: g for g in observed.get(r, ())}) for r in ROLES}
        for role in ROLL_ORDER:
            decode = pools["decode"]
            may_start = role == "decode" or not decode.old() or \
                decode.ready(decode.target) > 0
            _step(pools, role, may_start, role in frozen, bridge)
        plans = {r: _plan(p) for r, p in pools.items()}
        in_flight = any(not g.ready or g.terminating for p in pools.values() for g in p.live()
                        if g.revision == p.target)
        acted = any(p.created or p.deleted for p in pools.values())
        if acted or in_flight or not any(p.rolling for p in plans.values()) or frozen:
            break  # else: deadlocked by the pair guard; allow one bridge group and replan
    return plans


def _plan(pool: _Pool) -> PoolPlan:
    live = pool.live()
    apply = sorted({g.index for g in live if g.revision == pool.target and not g.terminating}
                   | set(pool.created))
    keep = sorted(g.index for g in live if g.revision != pool.target or g.terminating)
    # A slot emptied now is refilled on the next pass: the roll is not over before that.
    rolling = bool(pool.old()) or bool(pool.deleted) or \
        any(g.index >= pool.desired for g in live) or any(i >= pool.desired for i in pool.created)
    waiting = ""
    pending = [g.index for g in live if g.revision == pool.target and not g.ready]
    if rolling and pending:
        waiting = "waiting for group(s) " + ", ".join(map(str, sorted(pending))) + " to be ready"
    return PoolPlan(role=pool.role, revision=pool.target, apply=tuple(apply), keep=tuple(keep),
                    delete=tuple(sorted(pool.deleted)), rolling=rolling, waiting=waiting)


@dataclass(frozen=True)
class Progress:
    """Roll bookkeeping kept in the pool's status between reconciles."""

    revision: str
    progress_time: float  # epoch seconds of the last change in what the roll has achieved
    marker: str  # what counted as progress: ready/updated/old counts
    stalled: bool = False


def track_progress(previous: Progress | None, plan: PoolPlan, observed: Sequence[GroupState],
                   now: float, deadline_s: float) -> Progress:
    """Progress moves when the target revision changes or the counts of updated-ready and old
    groups change; a roll with no progress for ``deadline_s`` is stalled."""
    updated_ready = sum(g.ready for g in observed if g.revision == plan.revision)
    old = sum(g.revision != plan.revision for g in observed)
    marker = f"{updated_ready}/{old}"
    if previous is None or previous.revision != plan.revision or previous.marker != marker:
        return Progress(plan.revision, now, marker)
    # Only a roll with old groups left can stall (a scale-down is not a roll); the time is kept
    # while nothing moves, so a steady pool's status is not rewritten on every resync.
    stalled = plan.rolling and old > 0 and now - previous.progress_time > deadline_s
    return Progress(plan.revision, previous.progress_time, marker, stalled)
