"""Issue 22 items 4-6 on a live router HTTP app (uvicorn in a thread, a scripted Router):
tokenizing off the event loop, stop-string limits and matching cost, nested JSON, the global
body budget, header and body read timeouts, and streams cut by shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from moeserve.router.connection_timeouts import timed_http_protocol
from moeserve.router.frontend import Frontend
from moeserve.router.http_app import create_app
from moeserve.router.limits import HttpLimits
from moeserve.router.metrics import RouterMetrics
from moeserve.router.settings import RouterSettings
from moeserve.router.tokenizer import load_tokenizer
from moeserve.worker.tokenizer_files import write_tokenizer

LIMITS = HttpLimits(max_buffered_bytes=2 << 20, header_timeout_s=0.5, keep_alive_timeout_s=1.5,
                    body_timeout_s=1.0)


class ScriptedRouter:
    """Router.generate's interface: one token, then either the end or a wait forever."""

    def __init__(self) -> None:
        self.settings = RouterSettings()
        self.hang = False

    async def generate(self, rid, prompt, params, timeout_s=None):  # noqa: ANN001, ANN201
        yield SimpleNamespace(token_ids=[5], num_cached_tokens=0, finished=not self.hang,
                              finish_reason="length")
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, vocab_size=512, bos_id=0, eos_id=1)
    router = ScriptedRouter()
    frontend = Frontend(router, load_tokenizer(path), "m", 10**7, 512,  # type: ignore[arg-type]
                        RouterMetrics())
    app = create_app(frontend, lambda: True, LIMITS)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            http=timed_http_protocol(LIMITS.header_timeout_s,
                                                     LIMITS.keep_alive_timeout_s))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, app=app, router=router,
                          loop=srv.servers[0].get_loop())
    srv.should_exit = True
    thread.join(5)


def _post(server: SimpleNamespace, body: object, **kw: object) -> httpx.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/completions", content=data, timeout=30,
                      headers={"content-type": "application/json"}, **kw)


def test_health_answers_while_a_big_prompt_is_tokenized(server: SimpleNamespace) -> None:
    prompt = "Experts route tokens: héllo wörld " * 30_000  # 1 MB: about 1.3 s to tokenize
    done = threading.Event()
    result: list[httpx.Response] = []

    def big() -> None:
        result.append(_post(server, {"prompt": prompt, "max_tokens": 1}))
        done.set()

    started = time.perf_counter()
    threading.Thread(target=big, daemon=True).start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while not done.is_set():
            t = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.01)
    took = time.perf_counter() - started
    assert result[0].status_code == 200, result[0].text
    assert len(latencies) >= 20
    # Tokenized on the event loop, one /health would wait out most of the big request (>1 s);
    # judged against that request's own time, not a fixed bound: CI's loaded two cores put
    # the p99 at 112 ms once, with the big request taking seconds.
    assert max(latencies) < took / 3, (
        f"/health took up to {max(latencies) * 1000:.0f} ms while a {took:.1f} s request was "
        "tokenized")


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(65)], ["x" * 1025]])
def test_too_many_or_too_long_stop_strings_get_400_naming_stop(server: SimpleNamespace,
                                                               stop: list[str]) -> None:
    resp = _post(server, {"prompt": "hi", "max_tokens": 1, "stop": stop})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "stop" and "at most" in err["message"]


def test_stop_strings_at_the_limit_are_served(server: SimpleNamespace) -> None:
    resp = _post(server, {"prompt": "hi", "max_tokens": 1, "stop": ["y" * 1024] * 64})
    assert resp.status_code == 200, resp.text


NESTED_PROMPT = '{"prompt": ' + "[" * 50_000 + "1" + "]" * 50_000 + "}"


@pytest.mark.parametrize("body", ["[" * 100_000, NESTED_PROMPT])
def test_deeply_nested_json_is_a_400(server: SimpleNamespace, body: str) -> None:
    resp = _post(server, body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
    assert "nest" in err["message"]


def _connect(server: SimpleNamespace) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_slow_headers_are_disconnected(server: SimpleNamespace) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the router, not by our 5 s socket timeout
        assert time.monotonic() - start < 3


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) off a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_an_idle_connection_stays_past_the_header_deadline(server: SimpleNamespace) -> None:
    """A client's pool reuses a connection after a pause longer than the header deadline
    (httpx keeps them 5 s, proxies 60 s): the router must not close it at that moment, or the
    request lands on a closing socket and the client sees a reset with no response."""
    with _connect(server) as sock:
        sock.sendall(HEALTH)
        assert _response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(LIMITS.header_timeout_s * 2)  # idle: under keep_alive_timeout_s
        sock.sendall(HEALTH)
        assert _response(sock).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert sock.recv(1024) == b""  # then closed once idle for keep_alive_timeout_s
        assert LIMITS.keep_alive_timeout_s - 0.2 < time.monotonic() - start < 4


def test_slow_headers_after_an_idle_pause_are_disconnected(server: SimpleNamespace) -> None:
    """The idle allowance is not a slow client's: once a next request's first byte arrives,
    its headers are due within the header deadline."""
    with _connect(server) as sock:
        sock.sendall(HEALTH)
        assert _response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - start < LIMITS.keep_alive_timeout_s


def test_a_body_that_does_not_arrive_gets_408(server: SimpleNamespace) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pr")
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["type"] == "request_timeout"


def test_partial_bodies_past_the_budget_get_503_and_the_budget_comes_back(
        server: SimpleNamespace) -> None:  # fmt: skip
    budget = server.app.state.body_budget
    socks, chunk = [], b" " * (600 << 10)
    try:
        for _ in range(5):  # 5 x 600 KiB held open against a 2 MiB budget
            s = _connect(server)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: "
                      b"application/json\r\ncontent-length: 3000000\r\n\r\n" + chunk)
            socks.append(s)
        deadline = time.monotonic() + 5
        refused = []
        while time.monotonic() < deadline and not refused:
            for s in socks:
                s.setblocking(False)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                refused.append(data.decode())
            time.sleep(0.05)
        assert refused and refused[0].startswith("HTTP/1.1 503"), refused
        assert "--max-buffered-bytes" in refused[0]
        assert 0 < budget.used <= budget.limit
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while budget.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert budget.used == 0


def test_a_stream_cut_by_shutdown_ends_with_an_error_event(server: SimpleNamespace) -> None:
    server.router.hang = True
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=10,
                          json={"prompt": "hi", "max_tokens": 5, "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "choices" in first
            server.loop.call_soon_threadsafe(server.app.state.streams.close)
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        server.router.hang = False
        server.app.state.streams.closing = False
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][len("data: "):])["error"]
    assert err["code"] == "service_unavailable" and "shut down" in err["message"]


def test_stop_matching_is_linear_in_the_stop_strings(tmp_path: Path) -> None:
    """A long run of text that begins one stop string (held back) checked against 63 others:
    testing every prefix of every stop was O(len^2) per stop and token (14 s here)."""
    write_tokenizer(tmp_path, vocab_size=512, bos_id=0, eos_id=1)
    tok = load_tokenizer(tmp_path)
    stops = [chr(ord("b") + i % 25) * 1023 + f"{i}" for i in range(63)] + ["a" * 1023 + "x"]
    ids = tok.encode("a" * 1500 + "end", add_special_tokens=False)
    detok = tok.detokenizer([*stops, "end"])
    start = time.perf_counter()
    out = "".join(detok.push([i]) for i in ids)
    elapsed = time.perf_counter() - start
    assert detok.stopped and out == "a" * 1500
    assert elapsed < 1.5, f"{len(ids)} tokens against 64 x 1 KiB stops took {elapsed:.2f} s"
