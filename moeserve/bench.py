"""`moeserve bench`: an async load generator against an OpenAI-compatible /v1/completions.

Like ``vllm bench serve``: requests arrive at ``--request-rate`` (Poisson) or as fast as
``--concurrency`` allows; prompts are random token ids (no tokenizer needed), optionally sharing
one of ``--prefix-groups`` prefixes of ``--prefix-len`` tokens. Every request streams; TTFT is
the time to the first token-bearing chunk, ITL the gaps between later chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from moeserve.common.progress import progress

__all__ = ["BenchConfig", "RequestRecord", "add_bench_parser", "make_prompts", "run_bench"]

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    num_prompts: int = 100
    request_rate: float = float("inf")
    concurrency: int = 0
    input_len: int = 128
    output_len: int = 64
    prefix_groups: int = 0
    prefix_len: int = 0
    min_token_id: int = 10
    max_token_id: int = 0
    seed: int = 0
    timeout_s: float = 600.0
    out: str | None = None
    progress: bool = True


@dataclass
class RequestRecord:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def make_prompts(cfg: BenchConfig, max_token_id: int) -> list[list[int]]:
    """Random token-id prompts; prompt i shares prefix group ``i % prefix_groups``."""
    rng = random.Random(cfg.seed)
    if cfg.prefix_len > cfg.input_len:
        raise ValueError(f"--prefix-len {cfg.prefix_len} exceeds --input-len {cfg.input_len}")
    hi = max(max_token_id - 1, cfg.min_token_id)

    def draw(n: int) -> list[int]:
        return [rng.randint(cfg.min_token_id, hi) for _ in range(n)]

    groups = [draw(cfg.prefix_len) for _ in range(cfg.prefix_groups)]
    prompts = []
    for i in range(cfg.num_prompts):
        prefix = groups[i % len(groups)] if groups else []
        prompts.append(prefix + draw(cfg.input_len - len(prefix)))
    return prompts


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: list[int]):
    rec = RequestRecord(prompt_len=len(prompt))
    body = {
        "model": model, "prompt": prompt, "max_tokens": cfg.output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }  # fmt: skip
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = str(chunk["error"].get("message"))
                    return rec
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
                if usage:
                    rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
        rec.latency_s = time.perf_counter() - start
        rec.ok = rec.output_tokens > 0
        if not rec.ok:
            rec.error = "no tokens received"
    except (httpx.HTTPError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    xs = sorted(values)

    def pct(p: float) -> float:
        # Linear interpolation between closest ranks, as numpy's default does.
        k = (len(xs) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": sum(xs) / len(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    ms = lambda xs: {k: v * 1e3 for k, v in _percentiles(xs).items()}
    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s else 0.0,
        "ttft_ms": ms([r.ttft_s for r in ok]),
        "itl_ms": ms([x for r in ok for x in r.itl_s]),
        "e2e_latency_ms": ms([r.latency_s for r in ok]),
        "errors": sorted({r.error for r in records if r.error})[:10],
    }


async def _discover(client: httpx.AsyncClient, cfg: BenchConfig) -> tuple[str, int]:
    model, max_id = cfg.model, cfg.max_token_id
    if model is None or max_id <= 0:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        card = resp.json()["data"][0]
        model = model or card["id"]
        max_id = max_id if max_id > 0 else int(card.get("vocab_size", 512))
    return model, max_id


async def run_bench(cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run the load, print the summary table, write ``cfg.out``; returns the summary dict."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    if transport is None:
        # Without TCP_NODELAY httpx's header and body writes meet delayed ACKs: +40 ms TTFT.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.AsyncHTTPTransport(socket_options=nodelay, limits=limits)
    async with httpx.AsyncClient(
        base_url=cfg.url, timeout=cfg.timeout_s, limits=limits, transport=transport
    ) as client:
        model, max_id = await _discover(client, cfg)
        prompts = make_prompts(cfg, max_id)
        rng = random.Random(cfg.seed + 1)
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency > 0 else None
        bar = progress(len(prompts), "requests", unit="req", logger=logger,
                       enabled=cfg.progress)  # fmt: skip

        async def run(prompt: list[int]) -> RequestRecord:
            if sem is None:
                rec = await _one(client, cfg, model, prompt)
            else:
                async with sem:
                    rec = await _one(client, cfg, model, prompt)
            bar.update(1)
            return rec

        start = time.perf_counter()
        with bar:
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(run(prompt)))
                if cfg.request_rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(cfg.request_rate))
            records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(list(records), duration)
    _print_table(summary)
    if cfg.out:
        with open(cfg.out, "w") as f:
            config = {k: v for k, v in asdict(cfg).items() if k != "progress"}
            config["request_rate"] = str(cfg.request_rate)
            json.dump(
                {"config": config, "summary": summary, "requests": [asdict(r) for r in records]},
                f,
                indent=1,
            )
    return summary


def _print_table(s: dict[str, Any]) -> None:
    print(f"{'completed / failed':<28}{s['completed']} / {s['failed']}")
    print(f"{'duration (s)':<28}{s['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<28}{s['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<28}{s['output_throughput']:.1f}")
    print(f"{'total throughput (tok/s)':<28}{s['total_token_throughput']:.1f}")
    for key, name in (("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL (ms)")):
        v = s[key]
        print(f"{name:<28}p50 {v['p50']:.2f}  p90 {v['p90']:.2f}  p99 {v['p99']:.2f}")
    for err in s["errors"]:
        print(f"error: {err}")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = BenchConfig()
    p = subparsers.add_parser("bench", help="load-test a running router (/v1/completions)")
    p.add_argument("--url", default=d.url, help=f"router base URL (default: {d.url})")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="Poisson arrivals per second (default: inf, all at once)",
    )
    load.add_argument(
        "--concurrency",
        type=int,
        default=d.concurrency,
        help="fixed number of requests in flight (0: unbounded)",
    )
    p.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=d.output_len, help="tokens per request")
    p.add_argument(
        "--prefix-groups",
        type=int,
        default=d.prefix_groups,
        help="number of distinct shared prefixes (0: none)",
    )
    p.add_argument("--prefix-len", type=int, default=d.prefix_len, help="shared prefix tokens")
    p.add_argument(
        "--max-token-id",
        type=int,
        default=d.max_token_id,
        help="prompt ids are below this (default: vocab_size from /v1/models)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=d.timeout_s,
        help="per-request timeout in seconds",
    )
    p.add_argument("--out", default=None, help="write config, summary and records as JSON")
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
