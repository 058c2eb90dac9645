"""The prefill half of a P->D handoff, with its deadline, one retry and the local fallback.

A prefill worker that fails, is refused, or overruns ``prefill_timeout_s`` is ejected (passive
health) and the prefill is retried once on another prefill worker compatible with the chosen
decode worker; when that fails too, the decode worker prefills the prompt itself. Only an
invalid request ends the request here: every other failure degrades to a slower first token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from moeserve.api import worker_pb2
from moeserve.api.wire import error_from_rpc, sampling_to_proto
from moeserve.common.errors import InvalidRequestError, MoeServeError, UnavailableError
from moeserve.common.sampling import SamplingParams
from moeserve.router.metrics import RouterMetrics
from moeserve.router.workers import WorkerClient, WorkerPool

__all__ = ["PrefillOutcome", "run_prefill"]

logger = logging.getLogger(__name__)


class PrefillOutcome:
    """The prefill worker's answer (``response``) and where it ran, or nothing (prefill on D)."""

    def __init__(self, worker: WorkerClient | None, response: worker_pb2.PrefillResponse | None):
        self.worker = worker
        self.response = response


async def run_prefill(
    pool: WorkerPool, metrics: RouterMetrics, pick: Callable[[list[WorkerClient]], WorkerClient],
    decode: WorkerClient, rid: str, prompt: list[int], params: SamplingParams,
    timeout_s: float, deadline: float, on_use: Callable[[WorkerClient], None],
    retries: int = 1,
) -> PrefillOutcome:  # fmt: skip
    """Prefill ``prompt`` for ``decode`` on a compatible prefill worker, retrying once.

    ``on_use(worker)`` is called before each call so the caller can abort it later.
    """
    tried: set[str] = {decode.address}
    req = worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(params),
        # The handle is issued to this decode worker only (moeserve.worker.kv_handoff.prefill).
        decode_agent=decode.info.nixl_agent_name if decode.info is not None else "",
    )
    for attempt in range(retries + 1):
        cands = [
            p for p in pool.healthy("prefill")
            if p.address not in tried and pool.compatible(p, decode)
        ]  # fmt: skip
        if not cands:
            break
        if attempt:
            metrics.handoff_retries.labels("prefill").inc()
        p = pick(cands)
        tried.add(p.address)
        on_use(p)
        timeout = min(timeout_s, deadline - time.monotonic())
        if timeout <= 0:
            break
        try:
            resp = await asyncio.wait_for(p.stub.Prefill(req, timeout=timeout), timeout + 0.5)
            pool.report_success(p)
            return PrefillOutcome(p, resp)
        except (grpc.RpcError, TimeoutError) as e:
            err = _classify(e, p)
            if isinstance(err, InvalidRequestError):
                raise err from None
            if isinstance(e, TimeoutError) or (
                isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            ):
                metrics.phase_timeouts.labels("prefill").inc()
            pool.report_failure(p, f"prefill: {err}")
            logger.warning("request %s: %s", rid, err)
    metrics.handoff_fallbacks.labels("prefill").inc()
    return PrefillOutcome(None, None)


def _classify(e: BaseException, p: WorkerClient) -> MoeServeError:
    if isinstance(e, grpc.RpcError):
        return error_from_rpc(e, f"prefill on {p.address}")
    return UnavailableError(f"prefill on {p.address} overran its deadline")
