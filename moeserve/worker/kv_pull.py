"""Decode side of disaggregation: take a KV handle, READ the blocks with NIXL, join the batch.

A fingerprint mismatch is refused with ``IncompatibleKVError`` naming the differing fields (the
router then stops pairing the two workers and retries without the handle). Every other failure
(unreachable peer, full pool, failed or slow READ) ends in the same place: the request is
recomputed here and the prefill worker is told to release its blocks. The client never sees a
transfer error, only a slower first token.

Before any READ the handle is claimed from its issuer (moeserve.worker.kv_handles): the blocks
read are the ones the issuer recorded for this decode worker, never the ones the handle lists, and
a refused handle (forged, replayed, expired, foreign) is recomputed without touching the peer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from moeserve.api import worker_pb2, worker_pb2_grpc
from moeserve.common.errors import IncompatibleKVError
from moeserve.common.kv_compat import fingerprint_mismatch
from moeserve.common.sampling import SamplingParams
from moeserve.common.tls import TlsConfig, open_channel
from moeserve.worker.engine import LLMEngine
from moeserve.worker.engine_loop import EngineLoop
from moeserve.worker.faults import FaultPlan
from moeserve.worker.kv_transfer import (
    KVTransferAgent,
    KVTransferError,
    TransferState,
    encode_release_notif,
)
from moeserve.worker.metrics import WorkerMetrics

__all__ = ["KVPuller"]

logger = logging.getLogger(__name__)


class KVPuller:
    def __init__(
        self, agent: KVTransferAgent, metrics: WorkerMetrics, timeout_s: float = 10.0,
        faults: FaultPlan | None = None, tls: TlsConfig | None = None,
    ):  # fmt: skip
        self.tls = tls
        self.agent = agent
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.faults = faults or FaultPlan()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.tls)
        return worker_pb2_grpc.WorkerStub(channel)

    async def _ensure_peer(self, handle: worker_pb2.KVHandle) -> str:
        """The prefill agent's metadata, fetched once per peer and cached by the agent."""
        if self.agent.has_peer(handle.agent_name):
            return handle.agent_name
        resp = await self._stub(handle.worker_address).GetNixlMetadata(
            worker_pb2.GetNixlMetadataRequest(), timeout=5.0
        )
        name = self.agent.add_peer(resp.metadata)
        if name != handle.agent_name:
            raise KVTransferError(f"{handle.worker_address} now runs agent {name!r}")
        return name

    async def _claim(self, handle: worker_pb2.KVHandle) -> worker_pb2.KVHandle | None:
        """The handle as its issuer recorded it for this worker, or None when refused."""
        if not handle.handle_id or handle.decode_agent != self.agent.name:
            return None  # not ours: no need to ask
        try:
            got = await self._stub(handle.worker_address).ClaimKV(
                worker_pb2.ClaimKVRequest(handle_id=handle.handle_id,
                                          decode_agent=self.agent.name), timeout=5.0)  # fmt: skip
        except grpc.RpcError as e:
            logger.warning("ClaimKV at %s: %s", handle.worker_address, e.code().name)
            return None
        trusted = worker_pb2.KVHandle()
        trusted.CopyFrom(handle)
        trusted.request_id, trusted.num_tokens = got.request_id, got.num_tokens
        trusted.ClearField("block_ids")
        trusted.block_ids.extend(got.block_ids)
        return trusted

    async def _release_remote(self, handle: worker_pb2.KVHandle) -> None:
        """Tell the prefill worker to drop the blocks (used when no READ notified it)."""
        try:
            await self._stub(handle.worker_address).ReleaseKV(
                worker_pb2.ReleaseKVRequest(request_id=handle.request_id), timeout=2.0
            )
        except grpc.RpcError as e:  # its lease will expire instead
            logger.info("ReleaseKV to %s failed: %s", handle.worker_address, e.code())

    async def _wait(self, xfer) -> bool:
        deadline = time.monotonic() + self.timeout_s
        if self.faults.stall_transfer_s:  # injected: the READ sits unanswered
            await asyncio.sleep(min(self.faults.stall_transfer_s, self.timeout_s))
            if self.faults.stall_transfer_s >= self.timeout_s:
                return False
        sleep = 1e-4
        while self.agent.poll(xfer) is TransferState.PENDING:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(sleep)
            sleep = min(sleep * 2, 2e-3)
        return True

    async def pull(
        self,
        loop: EngineLoop,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        handle: worker_pb2.KVHandle,
        first_token: int | None,
        fingerprint: str,
    ) -> tuple[int, int]:
        """Admit ``rid`` using the handle's KV; returns (tokens transferred, bytes)."""

        async def recompute(reason: str, release: bool = True) -> tuple[int, int]:
            logger.warning("request %s: %s; recomputing the prompt here", rid, reason)
            self.metrics.kv_transfer_failures.inc()
            if release:
                await self._release_remote(handle)
            await loop.call(lambda e: e.add_request(rid, prompt, params))
            return 0, 0

        mismatch = fingerprint_mismatch(fingerprint, handle.compat_fingerprint)
        claimed = await self._claim(handle)
        if mismatch:
            self.metrics.kv_transfer_failures.inc()
            if claimed is not None:  # an unverified handle names no blocks worth releasing
                await self._release_remote(claimed)
            raise IncompatibleKVError(
                f"KV from prefill worker {handle.worker_address} refused: incompatible "
                f"({mismatch})"
            )
        if claimed is None:
            return await recompute("KV handle refused by its issuer", release=False)
        handle = claimed
        if first_token is None or handle.num_tokens != len(prompt):
            return await recompute("KV handle does not match the prompt")
        try:
            peer = await self._ensure_peer(handle)
        except (grpc.RpcError, KVTransferError) as e:
            return await recompute(f"prefill peer {handle.worker_address} unusable: {e}")
        reservation = await loop.call(lambda e: e.reserve_remote_kv(rid, prompt, params))
        if reservation is None:
            return await recompute("no free KV blocks for the transfer")
        skip = reservation.num_cached_blocks
        local = reservation.block_ids[skip:]
        remote = list(handle.block_ids[skip : len(reservation.block_ids)])

        def commit(token: int | None):
            def run(e: LLMEngine) -> None:
                loop.emit(e.commit_remote_kv(rid, token))

            return loop.call(run)

        if len(remote) != len(local):
            logger.warning("request %s: handle has %d blocks, need %d; recomputing",
                           rid, len(handle.block_ids), len(reservation.block_ids))  # fmt: skip
            self.metrics.kv_transfer_failures.inc()
            await self._release_remote(handle)
            await commit(None)
            return 0, 0
        if not local:  # everything was already in this worker's prefix cache
            await self._release_remote(handle)
            await commit(first_token)
            return 0, 0
        xfer = self.agent.read_blocks(peer, remote, local, encode_release_notif(handle.request_id))
        try:
            in_time = await self._wait(xfer)
        except asyncio.CancelledError:  # client gone: stop the READ before blocks are freed
            self.agent.finish(xfer, timed_out=True)
            raise
        result = self.agent.finish(xfer, timed_out=not in_time)
        if self.faults.fail_transfer and result.ok:
            result = dataclasses.replace(result, ok=False, error="injected fault")
        if not result.ok:
            logger.warning("request %s: KV READ from %s failed (%s); recomputing",
                           rid, peer, result.error)  # fmt: skip
            self.metrics.kv_transfer_failures.inc()
            self.agent.remove_peer(peer)  # refetch its metadata next time
            await self._release_remote(handle)
            await commit(None)
            return 0, 0
        self.metrics.kv_transfer_bytes.inc(result.num_bytes)
        self.metrics.kv_transfer_seconds.observe(result.seconds)
        await commit(first_token)
        return len(prompt) - skip * loop.engine.config.block_size, result.num_bytes

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
