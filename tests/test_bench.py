"""`moeserve bench` against an in-process fake OpenAI server (httpx MockTransport)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import httpx

from moeserve.bench import BenchConfig, add_bench_parser, make_prompts, run_bench


def _fake_server(seen: list[dict]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny", "vocab_size": 100}]})
        body = json.loads(request.content)
        seen.append(body)
        if body["prompt"][0] == 11:  # one failing request
            return httpx.Response(429, json={"error": {"message": "busy"}})
        events = []
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": "x", "token_ids": [i]}]}
            events.append(f"data: {json.dumps(chunk)}\n\n")
        usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"]}
        events.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
        events.append("data: [DONE]\n\n")
        return httpx.Response(200, content="".join(events).encode(),
                              headers={"content-type": "text/event-stream"})  # fmt: skip

    return httpx.MockTransport(handler)


def test_prompts_share_prefix_groups() -> None:
    cfg = BenchConfig(num_prompts=6, input_len=20, prefix_groups=2, prefix_len=8)
    prompts = make_prompts(cfg, max_token_id=50)
    assert all(len(p) == 20 and all(10 <= t < 50 for t in p) for p in prompts)
    assert prompts[0][:8] == prompts[2][:8] == prompts[4][:8] != prompts[1][:8]
    assert prompts[0][8:] != prompts[2][8:]
    assert make_prompts(cfg, 50) == prompts  # seeded


def test_bench_reports_percentiles_and_writes_json(tmp_path: Path) -> None:
    seen: list[dict] = []
    out = tmp_path / "bench.json"
    cfg = BenchConfig(url="http://fake", num_prompts=8, input_len=4, output_len=5,
                      concurrency=3, out=str(out), progress=False)  # fmt: skip
    summary = asyncio.run(run_bench(cfg, transport=_fake_server(seen)))
    assert len(seen) == 8 and all(b["model"] == "tiny" and b["stream"] for b in seen)
    assert all(max(b["prompt"]) < 100 for b in seen)
    failed = sum(b["prompt"][0] == 11 for b in seen)
    assert summary["completed"] == 8 - failed and summary["failed"] == failed
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["p99"] >= summary["itl_ms"]["p50"]
    data = json.loads(out.read_text())
    assert len(data["requests"]) == 8 and data["summary"]["completed"] == summary["completed"]
    assert all(r["output_tokens"] == 5 for r in data["requests"] if r["ok"])


def test_bench_parser() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--url", "http://x", "--request-rate", "4",
                              "--prefix-groups", "2", "--prefix-len", "64"])  # fmt: skip
    assert args.request_rate == 4 and args.prefix_groups == 2 and callable(args.func)
