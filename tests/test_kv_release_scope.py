"""Issue 22 (c): a peer's token releases only the KV handed to it.

Was: ReleaseKV with the peer token freed any request id's pinned blocks, so any worker of the
deployment (or whoever stole its token) could drop another request's KV before its decode
worker READ it. Now the router releases anything; a peer must present the handle id it was
given and its own agent name, and a READ's release notification counts only from the agent the
handle named. (Live processes: tests/test_e2e_security.py.)
"""

from __future__ import annotations

from moeserve.worker.kv_handoff.prefill import PrefillHandoff, release_metadata
from moeserve.worker.metrics import WorkerMetrics


class _Engine:
    def __init__(self) -> None:
        self.pinned = {"r1": [4, 5], "r2": [6]}

    def pinned_blocks(self, rid: str) -> list[int]:
        return list(self.pinned[rid])

    def release_pinned(self, rid: str) -> bool:
        return self.pinned.pop(rid, None) is not None


class _Agent:
    name = "prefill-agent"

    def __init__(self) -> None:
        self.notifs: list[tuple[str, str]] = []

    def take_released_requests(self) -> list[tuple[str, str]]:
        out, self.notifs = self.notifs, []
        return out


def _handoff() -> tuple[PrefillHandoff, _Engine, _Agent, dict[str, str]]:
    agent, engine = _Agent(), _Engine()
    kv = PrefillHandoff(agent, "127.0.0.1:1", "fp", WorkerMetrics())  # type: ignore[arg-type]
    handles = {}
    for rid, decode in (("r1", "decode-A"), ("r2", "decode-B")):
        blocks = kv.pin(engine, rid, finished=False)  # type: ignore[arg-type]
        handles[rid] = kv.handle(rid, blocks, 70, decode).handle_id
    return kv, engine, agent, handles


def test_a_peer_releases_only_a_handle_issued_to_it() -> None:
    kv, engine, _, handles = _handoff()
    release = kv.release_requested
    # The request id alone (what any peer knows from logs or events): refused.
    assert not release(engine, "r1", False, ())
    # Another handle's id, or the right id from another agent: refused.
    assert not release(engine, "r1", False, release_metadata(handles["r2"], "decode-A"))
    assert not release(engine, "r1", False, release_metadata(handles["r1"], "decode-B"))
    assert not release(engine, "r1", False, release_metadata("x" * 43, "decode-A"))
    assert engine.pinned.keys() == {"r1", "r2"} and len(kv.leases) == 2
    # The decode worker it was handed to: released, once.
    assert release(engine, "r1", False, release_metadata(handles["r1"], "decode-A"))
    assert not release(engine, "r1", False, release_metadata(handles["r1"], "decode-A"))
    assert engine.pinned.keys() == {"r2"}
    # The router's token releases any request id.
    assert release(engine, "r2", True, ())
    assert not engine.pinned and len(kv.leases) == 0


def test_a_read_notification_releases_only_from_the_agent_the_handle_named() -> None:
    kv, engine, agent, _ = _handoff()
    agent.notifs = [("decode-B", "r1"), ("someone", "r2")]
    kv.sweep(engine, now=0.0)  # type: ignore[arg-type]
    assert engine.pinned.keys() == {"r1", "r2"}
    agent.notifs = [("decode-A", "r1"), ("decode-B", "r2")]
    kv.sweep(engine, now=0.0)  # type: ignore[arg-type]
    assert not engine.pinned

