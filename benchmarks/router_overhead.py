"""Latency the router adds over calling a decode worker directly (p50/p99, 1 and 64 streams).

    python benchmarks/router_overhead.py [--requests 200] [--concurrency 1 64]

Starts `moeserve up` with one decode worker and no prefill worker (so both paths do the same
engine work: a local prefill of a short prompt and one token), then times the same request
three ways: Worker.Generate over gRPC (direct), Router.Generate over gRPC, and POST
/v1/completions over HTTP. Overhead = router latency - direct latency at the same percentile.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

import grpc
import httpx

from moeserve.api import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from moeserve.deploy.local import ClusterSpec, LocalCluster

PROMPT = list(range(10, 26))


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(int(round((len(xs) - 1) * p / 100)), len(xs) - 1)]


async def _timed(fn, n: int, concurrency: int) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    out: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            start = time.perf_counter()
            await fn(i)
            out.append(time.perf_counter() - start)

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def measure(cluster: LocalCluster, n: int, concurrency: int) -> dict[str, list[float]]:
    sampling = common_pb2.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    worker = grpc.aio.insecure_channel(cluster.worker("decode-0").address)
    router = grpc.aio.insecure_channel(cluster.grpc_address)
    wstub, rstub = worker_pb2_grpc.WorkerStub(worker), router_pb2_grpc.RouterStub(router)
    # Without TCP_NODELAY the client's header/body writes meet delayed ACKs: +40 ms per call.
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        limits=httpx.Limits(max_connections=None),
    )
    http = httpx.AsyncClient(base_url=cluster.url, transport=transport)

    async def direct(i: int) -> None:
        req = worker_pb2.WorkerGenerateRequest(
            request_id=f"d{concurrency}-{i}-{time.monotonic_ns()}", prompt_token_ids=PROMPT,
            sampling=sampling,
        )  # fmt: skip
        async for _ in wstub.Generate(req):
            pass

    async def via_grpc(i: int) -> None:
        req = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=PROMPT),
                                         sampling=sampling)  # fmt: skip
        async for _ in rstub.Generate(req):
            pass

    async def via_http(i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        resp = await http.post("/v1/completions", json=body)
        resp.raise_for_status()

    results = {}
    for name, fn in (("direct", direct), ("router_grpc", via_grpc), ("router_http", via_http)):
        await _timed(fn, min(n, 20), concurrency)  # warm-up
        results[name] = await _timed(fn, n, concurrency)
    await worker.close()
    await router.close()
    await http.aclose()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    spec = ClusterSpec(model=args.model, prefill=0, decode=1, port=0, num_kv_blocks=256,
                       metrics=False)  # fmt: skip
    with LocalCluster(spec, log=None) as cluster:
        print(f"{'streams':>7} {'path':<12} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'+p50 ms':>8} {'+p99 ms':>8}")  # fmt: skip
        for c in args.concurrency:
            r = asyncio.run(measure(cluster, args.requests, c))
            base50, base99 = _pct(r["direct"], 50), _pct(r["direct"], 99)
            for name, xs in r.items():
                p50, p99 = _pct(xs, 50), _pct(xs, 99)
                extra = "" if name == "direct" else (
                    f"{(p50 - base50) * 1e3:>8.2f} {(p99 - base99) * 1e3:>8.2f}")  # fmt: skip
                print(f"{c:>7} {name:<12} {p50 * 1e3:>8.2f} {p99 * 1e3:>8.2f} {extra}")
            print(f"{'':>7} (mean direct {statistics.mean(r['direct']) * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
