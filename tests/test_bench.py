"""`moeserve bench` against an in-process fake OpenAI server (httpx MockTransport)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import httpx
import pytest

from moeserve.bench import BenchConfig, add_bench_parser, make_prompts, run_bench, sample_lengths


def _fake_server(seen: list[dict], failures: bool = True) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny", "vocab_size": 100}]})
        body = json.loads(request.content)
        seen.append(body)
        if failures and len(seen) == 3:  # one failing request
            return httpx.Response(429, json={"error": {"message": "busy"}})
        if failures and len(seen) == 5:  # a stream that breaks off: counted, the run goes on
            return httpx.Response(200, content=b"data: {not json\n\n",
                                  headers={"content-type": "text/event-stream"})  # fmt: skip
        events = []
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": "x", "token_ids": [i]}]}
            events.append(f"data: {json.dumps(chunk)}\n\n")
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
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


METRIC_ROWS = [f"{stat} {name} (ms):" for name in ("TTFT", "TPOT", "ITL", "E2EL")
               for stat in ("Mean", "P50", "P90", "P99")]  # fmt: skip


def test_bench_reports_every_metric_and_writes_json(tmp_path: Path, capsys) -> None:
    seen: list[dict] = []
    out = tmp_path / "bench.json"
    cfg = BenchConfig(url="http://fake", num_prompts=8, input_len=4, output_len=5,
                      concurrency=3, out=str(out), progress=False)  # fmt: skip
    summary = asyncio.run(run_bench(cfg, transport=_fake_server(seen)))
    assert len(seen) == 8 and all(b["model"] == "tiny" and b["stream"] for b in seen)
    assert all(max(b["prompt"]) < 100 and b["ignore_eos"] for b in seen)
    failed = 2
    assert summary["completed"] == 8 - failed and summary["failed"] == failed
    assert sum(summary["errors"].values()) == failed
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["p99"] >= summary["itl_ms"]["p50"]
    assert summary["tpot_ms"]["mean"] > 0 and summary["e2e_latency_ms"]["p90"] > 0
    table = capsys.readouterr().out
    for row in [*METRIC_ROWS, "Output token throughput (tok/s):", "Request throughput (req/s):",
                "Total token throughput (tok/s):", "Failed requests:"]:  # fmt: skip
        assert row in table, row
    data = json.loads(out.read_text())
    assert len(data["requests"]) == 8 and data["summary"]["completed"] == summary["completed"]
    assert all(r["output_tokens"] == 5 and r["prompt_len"] == 4 for r in data["requests"]
               if r["ok"])  # fmt: skip
    assert set(data["summary"]) >= {"ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"}


def test_random_dataset_lengths_vary_within_range_seeded(tmp_path: Path) -> None:
    cfg = BenchConfig(url="http://fake", num_prompts=200, input_len=40, output_len=10,
                      dataset="random", input_len_range_ratio=0.25, output_len_range_ratio=0.5,
                      min_token_id=20, progress=False)  # fmt: skip
    lengths = sample_lengths(cfg)
    assert lengths == sample_lengths(cfg)
    ins, outs = [n for n, _ in lengths], [m for _, m in lengths]
    assert min(ins) >= 30 and max(ins) <= 50 and len(set(ins)) > 10
    assert min(outs) >= 5 and max(outs) <= 15 and len(set(outs)) > 5
    seen: list[dict] = []
    summary = asyncio.run(run_bench(cfg, transport=_fake_server(seen, failures=False)))
    assert [(len(b["prompt"]), b["max_tokens"]) for b in seen] == lengths
    assert summary["total_input_tokens"] == sum(ins) and summary["failed"] == 0


@pytest.mark.parametrize(("kw", "message"), [
    ({"input_len_range_ratio": 0.2}, "needs --dataset random"),
    ({"dataset": "random", "output_len_range_ratio": 1.0}, "within \\[0, 1\\)"),
    ({"output_len": 0}, "--output-len must be at least 1"),
    ({"dataset": "sharegpt"}, "expected one of fixed, random"),
])  # fmt: skip
def test_bad_workload_is_a_clear_error(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_lengths(BenchConfig(**kw))


def test_bench_parser() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    argv = (
        "bench --url http://x --request-rate 4 --prefix-groups 2 --prefix-len 64 "
        "--dataset random --input-len-range-ratio 0.1 --json-out x.json"
    )
    args = parser.parse_args(argv.split())
    assert args.request_rate == 4 and args.prefix_groups == 2 and callable(args.func)
    assert args.dataset == "random" and args.input_len_range_ratio == 0.1 and args.out == "x.json"
    assert parser.parse_args(["bench", "--out", "y.json"]).out == "y.json"  # the older name


def test_extra_body_reaches_every_request_and_bad_json_is_named(capsys) -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    body = '{"response_format": {"type": "json_object"}}'
    args = parser.parse_args(["bench", "--extra-body", body])
    assert args.extra_body == {"response_format": {"type": "json_object"}}
    for bad, message in (("{x", "not JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--extra-body", bad])
        assert message in capsys.readouterr().err
    seen: list[dict] = []
    cfg = BenchConfig(num_prompts=3, output_len=2, progress=False, extra_body=args.extra_body)
    asyncio.run(run_bench(cfg, transport=_fake_server(seen, failures=False)))
    assert len(seen) == 3
    assert all(b["response_format"] == {"type": "json_object"} and b["stream"] for b in seen)


async def _sse_server(connections: list[tuple], in_flight: list[int]) -> asyncio.Server:
    """A keep-alive HTTP/1.1 server on a real socket that streams every completion as SSE and
    records, per request, the connection (peer address) it came on and how many requests were
    in flight at once."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                size = next((int(h.split(":")[1]) for h in lines
                             if h.lower().startswith("content-length:")), 0)  # fmt: skip
                body = json.loads(await reader.readexactly(size)) if size else {}
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
                await asyncio.sleep(0.01)  # the requests of one batch overlap
                if path == "/v1/models":
                    payload = json.dumps({"data": [{"id": "tiny", "vocab_size": 100}]}).encode()
                    kind = b"application/json"
                else:
                    connections.append(peer)
                    chunks = [{"choices": [{"index": 0, "text": "x", "token_ids": [i]}]}
                              for i in range(body["max_tokens"])]  # fmt: skip
                    payload = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode()
                    payload += b"data: [DONE]\n\n"
                    kind = b"text/event-stream"
                in_flight[0] -= 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ncontent-length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_bench_over_real_sockets_keeps_to_its_concurrency_and_reuses_connections() -> None:
    """Each request borrows a kept-alive connection of its own: never more connections than
    the concurrency, never two requests at once on one, and all of them reused."""

    async def main() -> dict:
        connections: list[tuple] = []
        in_flight = [0, 0]
        server = await _sse_server(connections, in_flight)
        port = server.sockets[0].getsockname()[1]
        cfg = BenchConfig(url=f"http://127.0.0.1:{port}", num_prompts=24, input_len=4,
                          output_len=3, concurrency=4, progress=False)  # fmt: skip
        async with server:
            summary = await run_bench(cfg)
        return {"summary": summary, "connections": connections, "in_flight": in_flight}

    got = asyncio.run(main())
    assert got["summary"]["completed"] == 24 and got["summary"]["failed"] == 0
    assert got["summary"]["total_output_tokens"] == 24 * 3
    assert len(got["connections"]) == 24
    assert len(set(got["connections"])) <= 4  # kept alive and reused, one request at a time
    assert got["in_flight"][1] <= 4
