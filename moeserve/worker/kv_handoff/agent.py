"""The NIXL agent and its descriptors: KV blocks move prefill -> decode, READ by the decode side.

Two halves, as in vLLM's KV connector:

* Pure (no device, no NIXL): ``block_descs`` turns block ids into byte ranges, the metadata
  blob carries a worker's KV layout, and the release notification is encoded/decoded here.
* ``KVTransferAgent`` owns one NIXL agent, registers the whole KV cache tensor once and READs
  blocks from peers.

The KV cache is ``[num_blocks, num_layers, block_size, kv_dim]`` and contiguous, so one block of
every layer is one contiguous byte range, and so is a run of consecutive blocks: a transfer is
one descriptor per run consecutive on both sides (``block_runs``), one copy for the transport.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from moeserve.common.errors import MoeServeError
from moeserve.worker.kv_handoff.ucx_transport import setup_ucx_transport

__all__ = [
    "METADATA_VERSION",
    "KVLayout",
    "KVTransferAgent",
    "KVTransferError",
    "TransferHandle",
    "TransferResult",
    "TransferState",
    "block_descs",
    "block_runs",
    "run_descs",
    "decode_release_notif",
    "encode_release_notif",
    "poll_sleep_s",
    "yield_budget_s",
]

# Timers have millisecond resolution where it matters (uvloop: a sleep under ~0.5 ms returns at
# once, 0.8 ms sleeps 1.1 ms; time.sleep adds ~50 us of timer slack), so polling a READ with
# growing sub-millisecond sleeps saw a transfer of tens of microseconds end at 1.1 or 3.2 ms:
# kv_transfer_seconds measured the poll, not the copy. While a transfer could still be running
# at device speed a poll only yields; after that it sleeps a millisecond at a time.
POLL_SLEEP_S = 1e-3
YIELD_BYTES_PER_S = 20e9  # a pessimistic device-path rate: longer than this is not a GPU copy
YIELD_MIN_S, YIELD_MAX_S = 2e-4, 5e-3


def yield_budget_s(num_bytes: int) -> float:
    """How long to poll a READ of ``num_bytes`` without sleeping."""
    return min(YIELD_MAX_S, YIELD_MIN_S + num_bytes / YIELD_BYTES_PER_S)


def poll_sleep_s(num_bytes: int, waited_s: float) -> float:
    """Seconds to sleep before the next look at a READ of ``num_bytes`` that has run
    ``waited_s``: 0 (yield only) within its yield budget, then a millisecond."""
    return 0.0 if waited_s < yield_budget_s(num_bytes) else POLL_SLEEP_S


# Bumped whenever the metadata blob or the meaning of a descriptor changes.
METADATA_VERSION = 1
_MAGIC = b"MSKV"
_NOTIF_PREFIX = b"moeserve.kv.release:"


class KVTransferError(MoeServeError):
    """A peer that cannot be used (bad metadata, incompatible layout, unknown name)."""

    grpc_code = "FAILED_PRECONDITION"
    error_type = "kv_transfer_error"


# --------------------------------------------------------------------------- scheduler side


@dataclass(frozen=True)
class KVLayout:
    """Where a worker's KV cache lives; travels inside the metadata blob."""

    base_addr: int
    num_blocks: int
    block_bytes: int
    mem_type: str  # "DRAM" or "VRAM"
    dev_id: int

    def check_blocks(self, block_ids: list[int], what: str) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"{what} block ids {bad[:4]} outside [0, {self.num_blocks})")


def block_descs(layout: KVLayout, block_ids: list[int]) -> np.ndarray:
    """``[n, 3]`` uint64 array of (address, length, device id), one row per block, in order."""
    layout.check_blocks(block_ids, "descriptor")
    ids = np.asarray(block_ids, dtype=np.uint64)
    descs = np.empty((len(block_ids), 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(layout.base_addr) + ids * np.uint64(layout.block_bytes)
    descs[:, 1] = layout.block_bytes
    descs[:, 2] = layout.dev_id
    return descs


def block_runs(remote_ids: list[int], local_ids: list[int]) -> tuple[list[int], ...]:
    """(remote starts, local starts, lengths) of the maximal runs in which both block ids go up
    by one: READing them moves the same bytes as one descriptor per block pair, with fewer."""
    runs: list[list[int]] = []  # [remote start, local start, length]
    for r, loc in zip(remote_ids, local_ids, strict=True):
        if runs and (r, loc) == (runs[-1][0] + runs[-1][2], runs[-1][1] + runs[-1][2]):
            runs[-1][2] += 1
        else:
            runs.append([r, loc, 1])
    return [x[0] for x in runs], [x[1] for x in runs], [x[2] for x in runs]


def run_descs(layout: KVLayout, starts: list[int], lengths: list[int]) -> np.ndarray:
    """``[n, 3]`` uint64 (address, length, device id), one row per run of ``lengths[i]`` blocks
    from ``starts[i]``."""
    ends = [s + n - 1 for s, n in zip(starts, lengths, strict=True)]
    layout.check_blocks([*starts, *ends], "descriptor")
    descs = block_descs(layout, starts)
    descs[:, 1] = np.asarray(lengths, dtype=np.uint64) * np.uint64(layout.block_bytes)
    return descs


def encode_release_notif(request_id: str) -> bytes:
    """NIXL notification the decode side attaches to its READ: 'done with request_id's blocks'."""
    return _NOTIF_PREFIX + request_id.encode("utf-8")


def decode_release_notif(msg: bytes) -> str | None:
    """Request id of a release notification, or None for a message that is not one."""
    if not msg.startswith(_NOTIF_PREFIX):
        return None
    return msg[len(_NOTIF_PREFIX) :].decode("utf-8", errors="replace")


def _pack_metadata(name: str, layout: KVLayout, agent_md: bytes) -> bytes:
    header = json.dumps(
        {"version": METADATA_VERSION, "name": name, **layout.__dict__}, sort_keys=True
    ).encode()
    return _MAGIC + struct.pack(">I", len(header)) + header + agent_md


def _unpack_metadata(blob: bytes) -> tuple[str, KVLayout, bytes]:
    if len(blob) < 8 or blob[:4] != _MAGIC:
        raise KVTransferError("peer metadata is not a moeserve KV metadata blob")
    (n,) = struct.unpack(">I", blob[4:8])
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as e:
        raise KVTransferError(f"peer metadata header is corrupt: {e}") from None
    if header.get("version") != METADATA_VERSION:
        raise KVTransferError(
            f"peer metadata version {header.get('version')} != ours {METADATA_VERSION}"
        )
    name = header.pop("name")
    header.pop("version")
    return name, KVLayout(**header), blob[8 + n :]


# --------------------------------------------------------------------------- worker side


class TransferState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class TransferHandle:
    peer: str
    num_blocks: int
    num_bytes: int
    started_at: float
    _xfer: object = field(repr=False, default=None)
    error: str | None = None


@dataclass(frozen=True)
class TransferResult:
    ok: bool
    num_bytes: int
    seconds: float
    error: str | None = None


class KVTransferAgent:
    """One NIXL agent (UCX backend) exposing this worker's KV cache to peers.

    Methods are guarded by one lock, so the engine thread and the server's event loop may both
    call in; ``wait`` never holds the lock while sleeping.

    NIXL's own progress thread polls without sleeping (the Python binding fixes its delay at
    0), which costs a whole core per worker even when idle. We turn it off and progress from a
    thread of ours every ``progress_interval_s`` instead: the passive side of a READ still needs
    progress for connection wire-up and notifications, the active side also progresses whenever
    it polls a transfer. ``num_threads`` is the UCX backend's worker threads; several of them
    split one large READ (measured in benchmarks/nixl_bandwidth.py).
    """

    def __init__(
        self,
        name: str,
        kv_cache: torch.Tensor,
        backends: tuple[str, ...] = ("UCX",),
        num_threads: int = 4,
        progress_interval_s: float = 1e-3,
    ):
        if not kv_cache.is_contiguous() or kv_cache.dim() < 2:
            raise ValueError("kv_cache must be a contiguous [num_blocks, ...] tensor")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {num_threads}")
        from moeserve.common.optional import require

        nixl = require("nixl._api", "KV transfer")  # heavy import, only when used
        nixl_agent, nixl_agent_config = nixl.nixl_agent, nixl.nixl_agent_config

        self.name = name
        self.layout = KVLayout(
            base_addr=kv_cache.data_ptr(),
            num_blocks=kv_cache.shape[0],
            block_bytes=kv_cache[0].nbytes,
            mem_type="VRAM" if kv_cache.is_cuda else "DRAM",
            dev_id=(kv_cache.device.index or 0) if kv_cache.is_cuda else 0,
        )
        self._kv_cache = kv_cache  # keep the registered memory alive
        self._lock = threading.Lock()
        # Before the agent exists: UCX reads its environment when the backend starts.
        self.transport = setup_ucx_transport(self.layout.mem_type)
        config = nixl_agent_config(
            enable_prog_thread=False,
            enable_listen_thread=False,
            backends=list(backends),
            num_threads=num_threads,
        )
        self._agent = nixl_agent(name, config)
        self._reg = self._agent.register_memory(kv_cache)
        self._peers: dict[str, tuple[bytes, KVLayout]] = {}
        self._notifs: list[tuple[str, bytes]] = []
        self._closed = False
        self._stop = threading.Event()
        self._progress_interval_s = progress_interval_s
        self._progress = threading.Thread(
            target=self._progress_loop, name=f"nixl-progress-{name}", daemon=True
        )
        self._progress.start()

    def _progress_loop(self) -> None:
        while not self._stop.wait(self._progress_interval_s):
            with self._lock:
                if self._closed:
                    return
                self._collect_notifs()

    def _collect_notifs(self) -> None:
        # getNotifs progresses the backend's workers; the caller holds the lock.
        for peer, msgs in self._agent.get_new_notifs().items():
            self._notifs.extend((peer, msg) for msg in msgs)

    def metadata(self) -> bytes:
        """Blob a peer passes to ``add_peer``: our NIXL agent metadata plus KV layout."""
        with self._lock:
            return _pack_metadata(self.name, self.layout, self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata once (cached by name; reloaded if the peer restarted)."""
        name, layout, agent_md = _unpack_metadata(metadata)
        if layout.block_bytes != self.layout.block_bytes:
            raise KVTransferError(
                f"peer {name!r} KV block is {layout.block_bytes} bytes, ours "
                f"{self.layout.block_bytes}: layouts are incompatible"
            )
        with self._lock:
            cached = self._peers.get(name)
            if cached is not None and cached[0] == agent_md:
                return name
            if cached is not None:
                self._agent.remove_remote_agent(name)
            loaded = self._agent.add_remote_agent(agent_md)
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                raise KVTransferError(f"peer metadata names agent {loaded!r}, header {name!r}")
            self._peers[name] = (agent_md, layout)
        return name

    def has_peer(self, name: str) -> bool:
        with self._lock:
            return name in self._peers

    def remove_peer(self, name: str) -> None:
        with self._lock:
            if self._peers.pop(name, None) is not None:
                self._agent.remove_remote_agent(name)

    def read_blocks(
        self,
        peer: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        notif: bytes = b"",
    ) -> TransferHandle:
        """Start READing the peer's blocks into ours; the peer receives ``notif`` when done.

        Never raises for transport trouble: a handle that could not start comes back already
        FAILED with ``error`` set, so callers have one failure path (recompute).
        """
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError(
                f"{len(remote_block_ids)} remote blocks but {len(local_block_ids)} local blocks"
            )
        now = time.monotonic()
        nbytes = len(local_block_ids) * self.layout.block_bytes
        handle = TransferHandle(peer, len(local_block_ids), nbytes, now)
        with self._lock:
            cached = self._peers.get(peer)
            if cached is None:
                handle.error = f"unknown peer {peer!r}: add_peer first"
                return handle
            try:
                r_starts, l_starts, lengths = block_runs(remote_block_ids, local_block_ids)
                remote = self._agent.get_xfer_descs(
                    run_descs(cached[1], r_starts, lengths), cached[1].mem_type
                )
                local = self._agent.get_xfer_descs(
                    run_descs(self.layout, l_starts, lengths), self.layout.mem_type
                )
                xfer = self._agent.initialize_xfer("READ", local, remote, peer, notif)
                state = self._agent.transfer(xfer)
            except Exception as e:  # NIXL raises backend-specific types
                handle.error = f"{type(e).__name__}: {e}"
                return handle
            handle._xfer = xfer
            if state == "ERR":
                handle.error = "NIXL refused to post the transfer"
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        """Non-blocking state of a transfer."""
        if handle.error is not None:
            return TransferState.FAILED
        with self._lock:
            try:
                state = self._agent.check_xfer_state(handle._xfer)
            except Exception as e:
                state, handle.error = "ERR", f"{type(e).__name__}: {e}"
        if state == "DONE":
            return TransferState.DONE
        if state == "PROC":
            return TransferState.PENDING
        handle.error = handle.error or "NIXL reported a transfer error"
        return TransferState.FAILED

    def finish(self, handle: TransferHandle, timed_out: bool = False) -> TransferResult:
        """Release NIXL resources of a handle and summarise it (call once per handle)."""
        if timed_out and handle.error is None:
            handle.error = "transfer timed out"
        ok = handle.error is None
        if handle._xfer is not None:
            with self._lock:
                try:
                    self._agent.release_xfer_handle(handle._xfer)
                except Exception:
                    pass  # NIXL keeps an uncancellable handle and frees it with the agent
            handle._xfer = None
        seconds = time.monotonic() - handle.started_at
        return TransferResult(ok, handle.num_bytes if ok else 0, seconds, handle.error)

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferResult:
        """Block until the transfer ends or ``timeout_s`` passes; never hangs."""
        started = time.monotonic()
        while True:
            state = self.poll(handle)
            if state is not TransferState.PENDING:
                return self.finish(handle)
            waited = time.monotonic() - started
            if waited >= timeout_s:
                return self.finish(handle, timed_out=True)
            time.sleep(poll_sleep_s(handle.num_bytes, waited))

    def take_notifs(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as (peer name, message)."""
        with self._lock:
            self._collect_notifs()
            notifs, self._notifs = self._notifs, []
        return notifs

    def take_released_requests(self) -> list[tuple[str, str]]:
        """(decode agent, request id) of each READ a decode worker finished: the prefill side
        releases only a lease handed to that agent."""
        pairs = ((peer, decode_release_notif(msg)) for peer, msg in self.take_notifs())
        return [(peer, rid) for peer, rid in pairs if rid is not None]

    def send_notif(self, peer: str, msg: bytes) -> None:
        with self._lock:
            self._agent.send_notif(peer, msg)

    def close(self) -> None:
        """Deregister the KV cache and drop peers; the agent is unusable afterwards."""
        self._stop.set()
        if self._progress is not threading.current_thread():
            self._progress.join(timeout=5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._peers):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:
                    pass
            self._peers.clear()
            self._agent.deregister_memory(self._reg)
