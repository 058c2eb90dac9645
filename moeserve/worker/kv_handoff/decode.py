"""Decode side of the KV hand-off: take a KV handle, READ the blocks with NIXL, join the batch.

A fingerprint mismatch is refused with ``IncompatibleKVError`` naming the differing fields (the
router then stops pairing the two workers and retries without the handle). Every other failure
(refused handle, unreachable peer, full pool, failed or slow READ) ends in the same place: the
request is recomputed here and the prefill worker is told to release its blocks. The client
never sees a transfer error, only a slower first token.

Before any READ the handle is claimed from its issuer (``kv_handoff.prefill``): the blocks read
are the ones the issuer recorded for this decode worker, never the ones the handle lists, and a
refused handle (forged, replayed, expired, foreign) is recomputed without touching the peer.
A handle whose issuer's signature does not verify (``kv_handoff.signing``) is refused before
any connection: a kv_handle cannot point this worker at an address outside its deployment.

The engine is called twice, each a scheduler state change: the request enters as
WAITING_FOR_REMOTE_KV with its blocks allocated (never scheduled meanwhile), and
``finish_remote_kv`` makes it runnable with its first token, or sends it to be prefilled here.
The READ itself runs on the event loop, outside the engine step. ``finish_remote_kv`` is called
however the READ ends (cancelled too): an abort meanwhile keeps the blocks until then, and the
stream ends with the abort's "abort" output.
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
from moeserve.common.worker_auth import WorkerAuth, client_interceptors
from moeserve.worker.engine_loop import EngineLoop
from moeserve.worker.faults import FaultPlan
from moeserve.worker.kv_handoff.agent import (
    KVTransferAgent,
    KVTransferError,
    TransferHandle,
    TransferState,
    encode_release_notif,
    poll_sleep_s,
)
from moeserve.worker.kv_handoff.prefill import release_metadata
from moeserve.worker.kv_handoff.signing import handle_verifies
from moeserve.worker.metrics import WorkerMetrics
from moeserve.worker.scheduler import RemoteKVBlocks

__all__ = ["KVPuller"]

logger = logging.getLogger(__name__)


class KVPuller:
    def __init__(
        self, agent: KVTransferAgent, metrics: WorkerMetrics, timeout_s: float = 10.0,
        faults: FaultPlan | None = None, tls: TlsConfig | None = None,
        auth: WorkerAuth | None = None,
    ):  # fmt: skip
        self.tls = tls
        self.auth = auth
        self.agent = agent
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.faults = faults or FaultPlan()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(
                address, self.tls, interceptors=client_interceptors(self.auth))
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
        if not handle_verifies(self.auth, handle):
            logger.warning("KV handle naming %s is not signed by a worker of this deployment; "
                           "refused without contacting it", handle.worker_address)
            return None
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

    async def _claim_compatible(
        self, handle: worker_pb2.KVHandle, fingerprint: str
    ) -> worker_pb2.KVHandle | None:
        """The claimed handle (None when refused); IncompatibleKVError on another fingerprint."""
        mismatch = fingerprint_mismatch(fingerprint, handle.compat_fingerprint)
        claimed = await self._claim(handle)
        if not mismatch:
            return claimed
        self.metrics.kv_transfer_failures.inc()
        if claimed is not None:  # an unverified handle names no blocks worth releasing
            await self._release_remote(claimed)
        raise IncompatibleKVError(
            f"KV from prefill worker {handle.worker_address} refused: incompatible ({mismatch})"
        )

    async def _release_remote(self, handle: worker_pb2.KVHandle) -> None:
        """Tell the prefill worker to drop the blocks (used when no READ notified it)."""
        try:
            await self._stub(handle.worker_address).ReleaseKV(
                worker_pb2.ReleaseKVRequest(request_id=handle.request_id), timeout=2.0,
                metadata=release_metadata(handle.handle_id, self.agent.name))  # fmt: skip
        except grpc.RpcError as e:  # its lease will expire instead
            logger.info("ReleaseKV to %s failed: %s", handle.worker_address, e.code())

    async def _wait(self, xfer: TransferHandle) -> bool:
        deadline = time.monotonic() + self.timeout_s
        if self.faults.stall_transfer_s:  # injected: the READ sits unanswered
            await asyncio.sleep(min(self.faults.stall_transfer_s, self.timeout_s))
            if self.faults.stall_transfer_s >= self.timeout_s:
                return False
        started = time.monotonic()
        while self.agent.poll(xfer) is TransferState.PENDING:
            now = time.monotonic()
            if now >= deadline:
                return False
            await asyncio.sleep(poll_sleep_s(xfer.num_bytes, now - started))
        return True

    def _failed(self, rid: str, reason: str) -> None:
        logger.warning("request %s: %s; recomputing the prompt here", rid, reason)
        self.metrics.kv_transfer_failures.inc()

    async def pull(
        self,
        loop: EngineLoop,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        handle: worker_pb2.KVHandle,
        first_token: int | None,
        fingerprint: str,
    ) -> tuple[int, int, float]:
        """Admit ``rid`` using the handle's KV; returns (tokens transferred, bytes, seconds the
        READ took)."""
        claimed = await self._claim_compatible(handle, fingerprint)
        reason = None
        if claimed is None:
            reason = "KV handle refused by its issuer"
        elif first_token is None or claimed.num_tokens != len(prompt):
            reason = "KV handle does not match the prompt"
        else:
            try:
                peer = await self._ensure_peer(claimed)
            except (grpc.RpcError, KVTransferError) as e:
                reason = f"prefill peer {claimed.worker_address} unusable: {e}"
        blocks = None
        if reason is None:
            blocks = await loop.call(lambda e: e.add_remote_kv_request(rid, prompt, params))
            if blocks is None:
                reason = "no free KV blocks for the transfer"
        if reason is not None:  # nothing was admitted: the prompt is prefilled here
            self._failed(rid, reason)
            if claimed is not None:
                await self._release_remote(claimed)
            await loop.call(lambda e: e.add_request(rid, prompt, params))
            return 0, 0, 0.0
        try:
            nbytes, seconds = await self._read(rid, peer, claimed, blocks)
        except asyncio.CancelledError:
            # The READ is stopped (_read): only now may the blocks go back. An abort during the
            # READ held them; finish_remote_kv frees them either way.
            def release(e) -> None:
                e.abort_request(rid)
                e.finish_remote_kv(rid, None)

            await asyncio.shield(loop.call(release))
            raise
        token = first_token if nbytes is not None else None
        await loop.call(lambda e: loop.emit(e.finish_remote_kv(rid, token)))
        if not nbytes:  # failed, or nothing to read: everything was cached here
            return 0, 0, 0.0
        return (len(prompt) - blocks.num_cached_blocks * loop.engine.config.block_size, nbytes,
                seconds)

    async def _read(self, rid: str, peer: str, handle: worker_pb2.KVHandle,
                    blocks: RemoteKVBlocks) -> tuple[int | None, float]:  # fmt: skip
        """READ the blocks this worker does not cache; (bytes read, seconds), bytes None when
        it failed (the prefill worker has then been told to release)."""
        skip = blocks.num_cached_blocks
        local = blocks.block_ids[skip:]
        remote = list(handle.block_ids[skip : len(blocks.block_ids)])
        if len(remote) != len(local):
            self._failed(rid, f"handle has {len(handle.block_ids)} blocks, need "
                              f"{len(blocks.block_ids)}")  # fmt: skip
            await self._release_remote(handle)
            return None, 0.0
        if not local:  # everything was already in this worker's prefix cache
            await self._release_remote(handle)
            return 0, 0.0
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
            self._failed(rid, f"KV READ from {peer} failed ({result.error})")
            self.agent.remove_peer(peer)  # refetch its metadata next time
            await self._release_remote(handle)
            return None, 0.0
        self.metrics.kv_transfer_bytes.inc(result.num_bytes)
        self.metrics.kv_transfer_seconds.observe(result.seconds)
        return result.num_bytes, result.seconds

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
