"""The soak's adversarial traffic and watchers (issue 22's reproductions, mixed into the load).

Attacks, one every ``--attack-every`` seconds in turn, each judged by what a hardened router
must answer (anything else is counted ``unexpected`` and fails the soak):

- ``grpc_id_collision``: two concurrent gRPC Generate streams with the same client request id:
  both get the reference tokens (a retryable UNAVAILABLE while a worker is down is allowed);
- ``huge_prompt``: a multi-megabyte text prompt to tokenize: a 400 naming the context limit;
- ``many_stops``: 64 stop strings of 1024 characters (served) and 65 (400 naming ``stop``);
- ``partial_bodies``: bodies announced, partly sent and held open: 408 or closed by the router;
- ``slow_headers``: request headers a byte a second: the router closes the connection;
- ``deep_json``: 100k ``[``: 400.

Watchers: /health latency (a keep-alive client, every ``HEALTH_EVERY_S``), the router's RSS and
the load average (every ``SAMPLE_EVERY_S``), and every "ejecting worker" line the router logs,
timestamped, to be checked against the fault windows.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import httpx

from tests.reliability_helpers import rss_mib

HEALTH_EVERY_S = 0.25
SAMPLE_EVERY_S = 2.0
KINDS = ("grpc_id_collision", "huge_prompt", "many_stops", "partial_bodies", "slow_headers",
         "deep_json")  # fmt: skip
_EJECT = re.compile(r"ejecting worker (\S+) for ([\d.]+) s: (.*)")


@dataclass
class AttackLog:
    expected: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    retryable: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, verdict: str, note: str = "") -> None:
        with self.lock:
            {"ok": self.expected, "retryable": self.retryable}.get(verdict, self.unexpected)[
                kind] += 1
            if verdict not in ("ok", "retryable") and len(self.notes) < 20:
                self.notes.append(f"{kind}: {note}")


class Attacks:
    def __init__(self, url: str, grpc_address: str, prompts: list[list[int]],
                 want: list[list[int]], max_tokens: int, huge_prompt_mb: float,
                 partial_bodies: int):  # fmt: skip
        self.url, self.grpc_address = url, grpc_address
        self.prompts, self.want, self.max_tokens = prompts, want, max_tokens
        self.huge_prompt_mb, self.held_bodies = huge_prompt_mb, partial_bodies
        self.log = AttackLog()
        self.n = 0
        self._inflight = 0
        self._last_end = 0.0
        self._lock = threading.Lock()
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80

    def run(self, kind: str) -> None:
        """One attack of ``kind`` (blocking; the soak runs each on a pool thread)."""
        self.n += 1
        with self._lock:
            self._inflight += 1
        try:
            getattr(self, kind)()
        except Exception as e:  # an attack that crashed the client side is still a finding
            self.log.record(kind, "unexpected", f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._inflight -= 1
                self._last_end = time.monotonic()

    def quiet(self) -> bool:
        """No attack in flight, none ended within a sample period: what the router holds now
        is what it kept, not a body or prompt still being handled."""
        with self._lock:
            return self._inflight == 0 and time.monotonic() - self._last_end >= SAMPLE_EVERY_S

    # ------------------------------------------------------------ attacks

    def grpc_id_collision(self) -> None:
        from moeserve.api import common_pb2, router_pb2, router_pb2_grpc

        rid = f"soak-collide-{self.n}"
        picks = [(self.n * 2) % len(self.prompts), (self.n * 2 + 1) % len(self.prompts)]
        results: list[tuple[list[int], grpc.StatusCode | None, str]] = [([], None, "")] * 2

        def one(i: int, j: int) -> None:
            req = router_pb2.GenerateRequest(
                request_id=rid, token_ids=router_pb2.TokenIds(ids=self.prompts[j]),
                sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0,
                                                   ignore_eos=True))  # fmt: skip
            tokens: list[int] = []
            try:
                with grpc.insecure_channel(self.grpc_address) as ch:
                    for msg in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=120):
                        tokens.extend(msg.token_ids)
                results[i] = (tokens, None, "")
            except grpc.RpcError as e:
                results[i] = (tokens, e.code(), e.details() or "")

        threads = [threading.Thread(target=one, args=(i, j)) for i, j in enumerate(picks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (tokens, code, details), j in zip(results, picks, strict=True):
            if code is None and tokens == self.want[j]:
                self.log.record("grpc_id_collision", "ok")
            elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                self.log.record("grpc_id_collision", "retryable", details)
            else:
                self.log.record("grpc_id_collision", "unexpected",
                                f"{code}: {details[:80]} tokens ok={tokens == self.want[j]}")

    def huge_prompt(self) -> None:
        text = "hello world " * int(self.huge_prompt_mb * (1 << 20) / 12)
        r = httpx.post(f"{self.url}/v1/completions", json={"prompt": text, "max_tokens": 1},
                       timeout=60)  # fmt: skip
        ok = r.status_code == 400 and "context" in r.text.lower() or r.status_code == 413
        self.log.record("huge_prompt", "ok" if ok else "unexpected",
                        f"{r.status_code} {r.text[:80]}")

    def many_stops(self) -> None:
        j = self.n % len(self.prompts)
        body = {"prompt": self.prompts[j], "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        at_limit = [f"{k:04d}" + "q" * 1020 for k in range(64)]
        r = httpx.post(f"{self.url}/v1/completions", json={**body, "stop": at_limit}, timeout=120)
        if r.status_code == 503:
            self.log.record("many_stops", "retryable", r.text[:80])
        else:
            served = r.status_code == 200 and _choice_tokens(r.json()) == self.want[j]
            self.log.record("many_stops", "ok" if served else "unexpected",
                            f"64 stops: {r.status_code} {r.text[:80]}")
        r = httpx.post(f"{self.url}/v1/completions", json={**body, "stop": [*at_limit, "x"]},
                       timeout=60)  # fmt: skip
        ok = r.status_code == 400 and "stop" in r.text
        self.log.record("many_stops", "ok" if ok else "unexpected",
                        f"65 stops: {r.status_code} {r.text[:80]}")

    def partial_bodies(self) -> None:
        """Announce 2 MiB, send 1 MiB, hold: the router must answer 408 or close."""
        socks = []
        for _ in range(self.held_bodies):
            s = socket.create_connection((self.host, self.port), timeout=5)
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 2097152\r\n\r\n"
                      .encode() + b"{" + b" " * ((1 << 20) - 1))  # fmt: skip
            socks.append(s)
        for s in socks:
            s.settimeout(90)
            try:
                head = s.recv(64)
            except OSError as e:
                head = f"{type(e).__name__}".encode()
            finally:
                s.close()
            ok = head.startswith(b"HTTP/1.1 408") or head == b""
            self.log.record("partial_bodies", "ok" if ok else "unexpected", repr(head[:40]))

    def slow_headers(self) -> None:
        """A byte a second; the router must close the connection (its header timeout)."""
        s = socket.create_connection((self.host, self.port), timeout=5)
        start, closed = time.monotonic(), False
        try:
            for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
                s.sendall(bytes([b]))
                time.sleep(1.0)
                if time.monotonic() - start > 40:
                    break
        except OSError:
            closed = True
        finally:
            s.close()
        self.log.record("slow_headers", "ok" if closed else "unexpected",
                        f"still open after {time.monotonic() - start:.0f} s")

    def deep_json(self) -> None:
        r = httpx.post(f"{self.url}/v1/completions", content=b"[" * 100_000, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        self.log.record("deep_json", "ok" if r.status_code == 400 else "unexpected",
                        f"{r.status_code} {r.text[:80]}")


def _choice_tokens(body: dict) -> list[int]:
    choice = body["choices"][0]
    return list(choice.get("token_ids") or [])


# ------------------------------------------------------------------ watchers


class Watch:
    """/health latency, router RSS and load average over time, until ``stop``."""

    def __init__(self, url: str, router_pid: Callable[[], int],
                 quiet: Callable[[], bool] = lambda: True):  # fmt: skip
        self.url, self.router_pid, self.quiet = url, router_pid, quiet
        self.health_ms: list[tuple[float, float]] = []  # (time, latency ms)
        self.health_errors = 0
        self.rss: list[tuple[float, float, bool]] = []  # (time, MiB, no attack in flight)
        self.load: list[tuple[float, float]] = []  # (time, 1-minute load average)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._health, self._sample)]  # fmt: skip

    def start(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _health(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self.stop.wait(HEALTH_EVERY_S):
                t = time.perf_counter()
                try:
                    c.get(f"{self.url}/health")
                    self.health_ms.append((time.monotonic(), (time.perf_counter() - t) * 1e3))
                except httpx.HTTPError:
                    self.health_errors += 1

    def _sample(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            now, quiet = time.monotonic(), self.quiet()
            mib = rss_mib(self.router_pid())  # 0: the router has exited
            if mib:
                self.rss.append((now, mib, quiet and self.quiet()))
            self.load.append((now, os.getloadavg()[0]))


class EjectionLog:
    """A LocalCluster log: passes lines to ``sink`` and keeps each router "ejecting worker"
    line with the time it was seen."""

    def __init__(self, sink) -> None:  # noqa: ANN001 (a text file or None)
        self.sink = sink
        self.ejections: list[tuple[float, str, str]] = []  # (time, address, reason)
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        m = _EJECT.search(line) if line.startswith("[router]") else None
        if m:
            with self.lock:
                self.ejections.append((time.monotonic(), m.group(1), m.group(3).strip()))
        if self.sink is not None:
            self.sink.write(line)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()
