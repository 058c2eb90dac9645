"""Latency the router adds over calling a decode worker directly (p50/p99, 1 and 64 streams).

    python benchmarks/router_overhead.py [--requests 200] [--concurrency 1 64]

Starts `moeserve up` with one decode worker and no prefill worker (so both paths do the same
engine work: a local prefill of a short prompt and one token), then times the same request
four ways: Worker.Generate over gRPC (direct), Router.Generate over gRPC, and POST
/v1/completions over HTTP, once with a minimal keep-alive HTTP/1.1 client (``router_http``) and
once with httpx (``router_httpx``). Overhead = router latency - direct latency at the same
percentile. The minimal client is the measure of the router: httpx's own per-request CPU (about
1.5 ms on the 2-core dev machine) is the client's cost, not the router's, and the direct gRPC
path pays no such cost, so ``router_httpx`` shows what a Python httpx user sees end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time

import grpc
import httpx

from moeserve.api import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from moeserve.common.worker_auth import WorkerAuth, client_interceptors
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


class RawHTTP:
    """Keep-alive HTTP/1.1 POSTs over asyncio streams, one connection per concurrent stream."""

    def __init__(self, url: str):
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: dict) -> bytes:
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(data)}\r\n\r\n").encode()  # fmt: skip
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(head + data)
        status_and_headers = await reader.readuntil(b"\r\n\r\n")
        status = int(status_and_headers.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in status_and_headers.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))  # fmt: skip
        payload = await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        self.idle.append((reader, writer))
        return payload

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def measure(
    cluster: LocalCluster, n: int, concurrency: int, rounds: int
) -> dict[str, list[float]]:
    sampling = common_pb2.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    # The router's worker-plane token, so the direct worker calls are the router's calls.
    worker = grpc.aio.insecure_channel(
        cluster.worker("decode-0").address,
        interceptors=client_interceptors(WorkerAuth(tuple(v for _, v in cluster.auth_metadata()))))
    router = grpc.aio.insecure_channel(cluster.grpc_address)
    wstub, rstub = worker_pb2_grpc.WorkerStub(worker), router_pb2_grpc.RouterStub(router)
    # Without TCP_NODELAY the client's header/body writes meet delayed ACKs: +40 ms per call.
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        limits=httpx.Limits(max_connections=None),
    )
    http = httpx.AsyncClient(base_url=cluster.url, transport=transport)
    raw = RawHTTP(cluster.url)
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "ignore_eos": True}

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
        await raw.post("/v1/completions", body)

    async def via_httpx(i: int) -> None:
        resp = await http.post("/v1/completions", json=body)
        resp.raise_for_status()

    paths = (("direct", direct), ("router_grpc", via_grpc), ("router_http", via_http),
             ("router_httpx", via_httpx))  # fmt: skip
    # Paths take turns in rounds, so a burst of background load hits all of them alike.
    results: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _name, fn in paths:
        await _timed(fn, min(n, 20), concurrency)  # warm-up
    per_round = max(n // rounds, concurrency)
    for _ in range(rounds):
        for name, fn in paths:
            results[name] += await _timed(fn, per_round, concurrency)
    await worker.close()
    await router.close()
    await http.aclose()
    raw.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=10, help="turns the paths take")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    spec = ClusterSpec(model=args.model, prefill=0, decode=1, port=0, num_kv_blocks=256,
                       metrics=False)  # fmt: skip
    with LocalCluster(spec, log=None) as cluster:
        print(f"{'streams':>7} {'path':<12} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'+p50 ms':>8} {'+p99 ms':>8}")  # fmt: skip
        for c in args.concurrency:
            r = asyncio.run(measure(cluster, args.requests, c, args.rounds))
            base50, base99 = _pct(r["direct"], 50), _pct(r["direct"], 99)
            for name, xs in r.items():
                p50, p99 = _pct(xs, 50), _pct(xs, 99)
                extra = "" if name == "direct" else (
                    f"{(p50 - base50) * 1e3:>8.2f} {(p99 - base99) * 1e3:>8.2f}")  # fmt: skip
                print(f"{c:>7} {name:<12} {p50 * 1e3:>8.2f} {p99 * 1e3:>8.2f} {extra}")
            print(f"{'':>7} (mean direct {statistics.mean(r['direct']) * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
