"""KV events and load reports a worker streams to routers.

Routers may subscribe late or reconnect, so each subscription starts with a snapshot (AllCleared
plus one BlockStored holding every cached block hash) and then follows the live events. The
worker mirrors the set of cached hashes from the engine's events to build that snapshot.

A block's token ids are the prompt's text in all but name, so only a router's subscription
gets them; a peer worker's (``tokens=False``) gets block hashes only (common.worker_auth).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from moeserve.api import worker_pb2
from moeserve.worker.block_pool import AllBlocksCleared, BlockRemoved, BlockStored
from moeserve.worker.engine import EngineStats

__all__ = ["EventHub", "to_proto_event"]

_HEARTBEAT_S = 0.5
_MAX_BACKLOG = 10_000  # a subscriber this far behind is dropped and must resubscribe


def to_proto_event(event: object) -> worker_pb2.KVEvent:
    if isinstance(event, BlockStored):
        stored = worker_pb2.BlockStored(
            block_hashes=event.block_hashes,
            token_ids=event.token_ids,
            block_size=event.block_size,
        )
        if event.parent_block_hash is not None:
            stored.parent_hash = event.parent_block_hash
        return worker_pb2.KVEvent(stored=stored)
    if isinstance(event, BlockRemoved):
        return worker_pb2.KVEvent(removed=worker_pb2.BlockRemoved(block_hashes=event.block_hashes))
    if isinstance(event, AllBlocksCleared):
        return worker_pb2.KVEvent(cleared=worker_pb2.AllCleared())
    raise TypeError(f"unknown KV event {event!r}")


def _hashes_only(event: worker_pb2.KVEvent) -> worker_pb2.KVEvent:
    if not event.HasField("stored") or not event.stored.token_ids:
        return event
    out = worker_pb2.KVEvent()
    out.CopyFrom(event)
    out.stored.ClearField("token_ids")
    return out


def _load(stats: EngineStats) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(
        num_running=stats.num_running, num_waiting=stats.num_waiting, kv_usage=stats.kv_usage
    )


class EventHub:
    """Fan-out of KV events and load to StreamEvents subscribers (lives on the event loop)."""

    def __init__(self) -> None:
        self._cached: set[int] = set()
        self._subs: dict[asyncio.Queue, bool] = {}  # queue -> gets token ids
        self._load = worker_pb2.LoadReport()
        self._last_sent = 0.0
        # Set by the drain on SIGTERM; the next tick tells every router at once.
        self.draining = False
        self._closed = False

    def publish_threadsafe(
        self, loop: asyncio.AbstractEventLoop, events: list, stats: EngineStats
    ) -> None:
        """From the engine thread; quiet ticks only send a load heartbeat now and then."""
        load = _load(stats)
        load.draining = self.draining
        now = time.monotonic()
        if not events and load == self._load and now - self._last_sent < _HEARTBEAT_S:
            return
        self._last_sent = now
        self._load = load
        loop.call_soon_threadsafe(self._publish, events, load)

    def _publish(self, events: list, load: worker_pb2.LoadReport) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._cached.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._cached.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._cached.clear()
        protos = [to_proto_event(e) for e in events]
        hashes = None
        for q, tokens in list(self._subs.items()):
            if q.qsize() > _MAX_BACKLOG:
                self._subs.pop(q, None)
                q.put_nowait(None)  # ends that stream
            elif tokens:
                q.put_nowait((protos, load))
            else:
                if hashes is None:
                    hashes = [_hashes_only(p) for p in protos]
                q.put_nowait((hashes, load))

    def close(self) -> None:
        """End every stream now and refuse new ones (the worker is stopping)."""
        self._closed = True
        for q in list(self._subs):
            q.put_nowait(None)
        self._subs.clear()

    async def subscribe(self, tokens: bool = True) -> AsyncIterator[worker_pb2.WorkerEvent]:
        """The snapshot, then live events; ``tokens=False``: BlockStored without token ids."""
        if self._closed:
            return
        q: asyncio.Queue = asyncio.Queue()
        self._subs[q] = tokens
        try:
            snapshot = [
                worker_pb2.KVEvent(cleared=worker_pb2.AllCleared()),
                worker_pb2.KVEvent(
                    stored=worker_pb2.BlockStored(block_hashes=sorted(self._cached))
                ),
            ]
            yield worker_pb2.WorkerEvent(sequence=0, kv_events=snapshot, load=self._load)
            seq = 1
            while True:
                item = await q.get()
                if item is None:
                    return
                events, load = item
                yield worker_pb2.WorkerEvent(sequence=seq, kv_events=events, load=load)
                seq += 1
        finally:
            self._subs.pop(q, None)

