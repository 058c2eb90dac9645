"""Pinned prefill KV blocks handed to decode workers, each with a deadline (pure, no device)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LeaseTable"]


@dataclass
class _Lease:
    block_ids: list[int]
    expires_at: float


@dataclass
class LeaseTable:
    """Pinned prefill blocks handed out to decode workers, each with a deadline.

    The prefill worker adds a lease when Prefill returns a handle; the lease ends when the decode
    side's release notification or ReleaseKV arrives (``release``), or when it expires
    (``expired``): a decode worker that died or gave up must not leak the blocks.
    """

    default_lease_s: float = 30.0
    _leases: dict[str, _Lease] = field(default_factory=dict)

    def add(
        self, request_id: str, block_ids: list[int], now: float, lease_s: float | None = None
    ) -> None:
        lease = self.default_lease_s if lease_s is None else lease_s
        self._leases[request_id] = _Lease(list(block_ids), now + lease)

    def release(self, request_id: str) -> list[int] | None:
        """Block ids of the lease, removed; None when it is unknown or already released."""
        lease = self._leases.pop(request_id, None)
        return None if lease is None else lease.block_ids

    def expired(self, now: float) -> list[str]:
        """Request ids whose lease ran out, removed from the table."""
        gone = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
        for rid in gone:
            del self._leases[rid]
        return gone

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)
