"""`moeserve bench`: an async load generator against an OpenAI-compatible /v1/completions.

Like ``vllm bench serve``: requests arrive at ``--request-rate`` (Poisson) or as fast as
``--concurrency`` allows; prompts are random token ids sent as a token-id ``prompt`` (no
tokenizer needed, lengths exact), optionally sharing one of ``--prefix-groups`` prefixes of
``--prefix-len`` tokens. ``--dataset fixed`` sends exactly ``--input-len`` / ``--output-len``
tokens; ``--dataset random`` draws each request's lengths uniformly (seeded) within
``len * (1 -+ ratio)``. Every request streams with ``ignore_eos``; the metrics (TTFT, TPOT, ITL,
end-to-end latency, throughputs) are computed by :mod:`moeserve.bench_stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import httpx

from moeserve.bench_stats import RequestRecord, format_table, summarize
from moeserve.common.progress import progress

__all__ = ["BenchConfig", "ClientLeases", "RequestRecord", "add_bench_parser", "make_prompts",
           "parse_extra_body", "run_bench", "sample_lengths"]  # fmt: skip

logger = logging.getLogger(__name__)

DATASETS = ("fixed", "random")
DEFAULT_RANGE_RATIO = 0.5  # --dataset random without a ratio: lengths in [0.5, 1.5] x the mean


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    num_prompts: int = 100
    request_rate: float = float("inf")
    concurrency: int = 0
    dataset: str = "fixed"
    input_len: int = 128
    output_len: int = 64
    input_len_range_ratio: float | None = None
    output_len_range_ratio: float | None = None
    prefix_groups: int = 0
    prefix_len: int = 0
    min_token_id: int = 10
    max_token_id: int = 0
    seed: int = 0
    timeout_s: float = 600.0
    out: str | None = None
    progress: bool = True
    extra_body: dict | None = None  # merged into every request (e.g. a response_format)


def _ratio(cfg: BenchConfig, value: float | None, flag: str) -> float:
    if cfg.dataset == "fixed":
        if value:
            raise ValueError(f"{flag} {value} needs --dataset random (fixed lengths do not vary)")
        return 0.0
    ratio = DEFAULT_RANGE_RATIO if value is None else value
    if not 0 <= ratio < 1:
        raise ValueError(f"{flag} must be within [0, 1), got {ratio}")
    return ratio


def sample_lengths(cfg: BenchConfig) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request: the means under ``fixed``; under ``random``
    uniform integers in [floor(len * (1 - ratio)), ceil(len * (1 + ratio))], at least 1."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"--dataset {cfg.dataset!r}: expected one of {', '.join(DATASETS)}")
    for flag, value in (("--num-prompts", cfg.num_prompts), ("--input-len", cfg.input_len),
                        ("--output-len", cfg.output_len)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    in_r = _ratio(cfg, cfg.input_len_range_ratio, "--input-len-range-ratio")
    out_r = _ratio(cfg, cfg.output_len_range_ratio, "--output-len-range-ratio")
    rng = random.Random(cfg.seed + 2)

    def draw(mean: int, ratio: float) -> int:
        lo, hi = max(1, math.floor(mean * (1 - ratio))), math.ceil(mean * (1 + ratio))
        return rng.randint(lo, max(lo, hi))

    return [(draw(cfg.input_len, in_r), draw(cfg.output_len, out_r))
            for _ in range(cfg.num_prompts)]  # fmt: skip


def make_prompts(
    cfg: BenchConfig, max_token_id: int, lengths: list[tuple[int, int]] | None = None
) -> list[list[int]]:
    """Random token-id prompts; prompt i shares prefix group ``i % prefix_groups``."""
    lengths = sample_lengths(cfg) if lengths is None else lengths
    rng = random.Random(cfg.seed)
    shortest = min(n for n, _ in lengths)
    if cfg.prefix_len > shortest:
        raise ValueError(f"--prefix-len {cfg.prefix_len} exceeds the shortest prompt ({shortest} "
                         "tokens; see --input-len and --input-len-range-ratio)")  # fmt: skip
    hi = max(max_token_id - 1, cfg.min_token_id)

    def draw(n: int) -> list[int]:
        return [rng.randint(cfg.min_token_id, hi) for _ in range(n)]

    groups = [draw(cfg.prefix_len) for _ in range(cfg.prefix_groups)]
    prompts = []
    for i, (n, _) in enumerate(lengths):
        prefix = groups[i % len(groups)] if groups else []
        prompts.append(prefix + draw(n - len(prefix)))
    return prompts


def _consume(rec: RequestRecord, chunk: dict, start: float, last: float) -> float:
    """Fold one stream chunk into ``rec``; returns the time of the last content chunk."""
    if "error" in chunk:
        err = chunk["error"]
        raise ValueError(err.get("message") if isinstance(err, dict) else str(err))
    choices = chunk.get("choices") or []
    n = sum(len(c.get("token_ids") or []) or bool(c.get("text")) for c in choices)
    if n:
        now = time.perf_counter()
        if rec.output_tokens == 0:
            rec.ttft_s = now - start
        else:
            rec.itl_s.append(now - last)
        last = now
        rec.output_tokens += n
    usage = chunk.get("usage")
    if usage:  # the server's own counts win over ours (several tokens may share a chunk)
        rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
        rec.prompt_len = usage.get("prompt_tokens", rec.prompt_len)
    return last


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: list[int],
               output_len: int) -> RequestRecord:  # fmt: skip
    rec = RequestRecord(prompt_len=len(prompt), output_len=output_len)
    body = {
        "model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "return_token_ids": True, **(cfg.extra_body or {}),
    }  # fmt: skip
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = _consume(rec, json.loads(line[6:]), start, last)
        rec.latency_s = time.perf_counter() - start
        rec.ok = rec.output_tokens > 0
        if not rec.ok:
            rec.error = "no tokens received"
    except Exception as e:  # noqa: BLE001 - one bad request is counted, never ends the run
        # When it broke tells a dropped connection (before any token) from a cut stream.
        rec.error = (f"{describe_error(e)} (after {rec.output_tokens} tokens, "
                     f"{time.perf_counter() - start:.1f} s)")
    return rec


def describe_error(e: BaseException) -> str:
    """The exception and what caused it: httpx's ReadError has an empty message, and a
    reset connection (the server closed it with the request unread) only shows in the OS
    error underneath."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}".rstrip(": "))
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


async def _discover(client: httpx.AsyncClient, cfg: BenchConfig) -> tuple[str, int]:
    model, max_id = cfg.model, cfg.max_token_id
    if model is None or max_id <= 0:
        try:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            card = resp.json()["data"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"cannot list models at {cfg.url}/v1/models ({type(e).__name__}: "
                             f"{e}); is the router up? (--model and --max-token-id skip this)"
                             ) from e  # fmt: skip
        model = model or card["id"]
        max_id = max_id if max_id > 0 else int(card.get("vocab_size", 512))
    return model, max_id


def parse_extra_body(text: str) -> dict:
    """``--extra-body``: a JSON object of request fields, e.g. ``{"response_format":
    {"type": "json_object"}}``."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--extra-body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise argparse.ArgumentTypeError(f"--extra-body must be a JSON object, got {text!r}")
    return body


def _check_load(cfg: BenchConfig) -> None:
    if cfg.concurrency < 0:
        raise ValueError(f"--concurrency must be >= 0 (0: unbounded), got {cfg.concurrency}")
    if not cfg.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {cfg.request_rate}")


class ClientLeases:
    """One-connection httpx clients, each lent to one request at a time.

    httpx's connection pool walks every connection it holds on each request's start and end
    (``is_idle``, ``has_expired``: a ``poll()`` and a ``getpeername()`` per socket;
    encode/httpx#3215): with 128 streams open, a cProfile of the bench put 6 of its 9.5 s of
    CPU there, and at 256 streams on the H200 the bench's own loop, not the server, set the
    throughput (docs/performance.md). A free list of one-connection clients makes the pool's
    work per request constant; connections are still kept alive and reused.
    """

    def __init__(self, cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None = None):
        self._cfg = cfg
        self._free: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []
        # One TLS context for all: building one loads the CA bundle (~20 ms each).
        self._verify = httpx.create_ssl_context() if cfg.url.startswith("https") else False
        self._shared = self._client(transport) if transport is not None else None

    def _client(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        if transport is None:
            one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            # Without TCP_NODELAY httpx's header and body writes meet delayed ACKs: +40 ms TTFT.
            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            transport = httpx.AsyncHTTPTransport(verify=self._verify, socket_options=nodelay,
                                                  limits=one)
        client = httpx.AsyncClient(base_url=self._cfg.url, timeout=self._cfg.timeout_s,
                                   transport=transport)  # fmt: skip
        self._all.append(client)
        return client

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._shared is not None:  # an injected transport (tests): one client for all
            yield self._shared
            return
        client = self._free.pop() if self._free else self._client(None)
        try:
            yield client
        finally:
            self._free.append(client)

    async def aclose(self) -> None:
        for client in self._all:
            await client.aclose()


async def run_bench(cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run the load, print the summary table, write ``cfg.out``; returns the summary dict."""
    _check_load(cfg)
    lengths = sample_lengths(cfg)
    clients = ClientLeases(cfg, transport)
    try:
        async with clients.lease() as client:
            model, max_id = await _discover(client, cfg)
        prompts = make_prompts(cfg, max_id, lengths)
        rng = random.Random(cfg.seed + 1)
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency > 0 else None
        bar = progress(len(prompts), "requests", unit="req", logger=logger,
                       enabled=cfg.progress)  # fmt: skip

        async def one(prompt: list[int], output_len: int) -> RequestRecord:
            async with clients.lease() as client:
                return await _one(client, cfg, model, prompt, output_len)

        async def run(prompt: list[int], output_len: int) -> RequestRecord:
            if sem is None:
                rec = await one(prompt, output_len)
            else:
                async with sem:
                    rec = await one(prompt, output_len)
            bar.update(1)
            return rec

        start = time.perf_counter()
        with bar:
            tasks = []
            for prompt, (_, output_len) in zip(prompts, lengths, strict=True):
                tasks.append(asyncio.create_task(run(prompt, output_len)))
                if cfg.request_rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(cfg.request_rate))
            records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    finally:
        await clients.aclose()
    summary = summarize(list(records), duration, cfg.concurrency)
    print(format_table(summary))
    if cfg.out:
        _write_json(cfg, summary, list(records))
    return summary


def _write_json(cfg: BenchConfig, summary: dict, records: list[RequestRecord]) -> None:
    config = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    config["request_rate"] = str(cfg.request_rate)  # inf is not JSON
    with open(cfg.out, "w") as f:  # type: ignore[arg-type]
        json.dump({"config": config, "summary": summary,
                   "requests": [asdict(r) for r in records]}, f, indent=1)  # fmt: skip


def _add_workload_args(p: argparse.ArgumentParser, d: BenchConfig) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="fixed: every request exactly --input-len/--output-len tokens; random: "
                        "lengths drawn uniformly around them (seeded, no download)")  # fmt: skip
    p.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens (mean)")
    p.add_argument("--output-len", type=int, default=d.output_len,
                   help="output tokens per request (mean; ignore_eos holds it)")  # fmt: skip
    for which in ("input", "output"):
        p.add_argument(f"--{which}-len-range-ratio", type=float, default=None,
                       help=f"--dataset random: {which} lengths in [len*(1-R), len*(1+R)] "
                            f"(default {DEFAULT_RANGE_RATIO})")  # fmt: skip
    p.add_argument("--prefix-groups", type=int, default=d.prefix_groups,
                   help="number of distinct shared prefixes (0: none)")  # fmt: skip
    p.add_argument("--prefix-len", type=int, default=d.prefix_len, help="shared prefix tokens")
    p.add_argument("--max-token-id", type=int, default=d.max_token_id,
                   help="prompt ids are below this (default: /v1/models vocab_size)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="seeds prompts, lengths, arrivals")
    p.add_argument("--extra-body", type=parse_extra_body, default=None, metavar="JSON",
                   help='fields added to every request, e.g. \'{"response_format": {"type": '
                        '"json_object"}}\' (structured decoding under load)')  # fmt: skip


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = BenchConfig()
    p = subparsers.add_parser("bench", help="load-test a running router (/v1/completions)")
    p.add_argument("--url", default=d.url, help=f"router base URL (default: {d.url})")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=d.request_rate,
                      help="Poisson arrivals per second (default: inf, all at once)")  # fmt: skip
    load.add_argument("--concurrency", type=int, default=d.concurrency,
                      help="fixed number of requests in flight (0: unbounded)")  # fmt: skip
    _add_workload_args(p, d)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s,
                   help="per-request timeout in seconds")  # fmt: skip
    p.add_argument("--json-out", "--out", dest="out", default=None, metavar="PATH",
                   help="write config, summary and per-request records as JSON")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    names = set(BenchConfig.__dataclass_fields__)
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = asyncio.run(run_bench(cfg))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="moeserve")
    _sub = _parser.add_subparsers(dest="command", required=True)
    add_bench_parser(_sub)
    _args = _parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(_args.func(_args))
