"""`moeserve up --ray` on a real local Ray instance (CPU): one instance for the whole module.

The module starts `moeserve up --ray --model DIR` as a child process (as a user would), then
connects to its Ray instance as a second driver to look at it through Ray's own APIs, scale a
pool, kill an actor, and finally checks that SIGTERM leaves no process behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from moeserve.deploy.ray_cli import alive, connect, descendants  # noqa: E402
from moeserve.deploy.ray_workers import NAMESPACE, list_rank_actors, scrape_metric  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

KV_BLOCKS = 96
APP = "moeserve-moeserve"  # `up --model DIR` deploys a MoEDeployment named "moeserve"
ROOT = Path(__file__).resolve().parents[2]
_UP = re.compile(r"moeserve is up on Ray: (\S+)/v1\s+\(app (\S+), Ray (\S+)\)")


@dataclass
class Up:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: str = ""
    app: str = ""
    address: str = ""
    ready: threading.Event = field(default_factory=threading.Event)


def _start_up(args: list[str], timeout_s: float = 240) -> Up:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.cli", "up", "--ray", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    up = Up(proc)

    def pump() -> None:
        for line in proc.stdout:
            up.lines.append(line)
            if m := _UP.search(line):
                up.url, up.app, up.address = m.groups()
                up.ready.set()
        up.ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not up.ready.wait(timeout_s) or not up.url:
        proc.kill()
        raise AssertionError("moeserve up --ray did not come up:\n" + "".join(up.lines[-40:]))
    return up


def _stop_up(up: Up, timeout_s: float = 60) -> int:
    if up.proc.poll() is None:
        up.proc.send_signal(signal.SIGTERM)
    return up.proc.wait(timeout_s)


@pytest.fixture(scope="module")
def up(model_dir: Path):
    with _port_socket() as port:
        pass
    # Router flags reach the Serve replica as they reach `moeserve router`.
    handle = _start_up(["--model", str(model_dir), "--port", str(port),
                        "--num-kv-blocks", str(KV_BLOCKS), "--max-stop-strings", "2",
                        "--tool-call-parser", "deepseek_v3"])  # fmt: skip
    try:
        connect(handle.address, "moeserve-tests", log_to_driver=False)
        yield handle
    finally:
        ray.shutdown()
        if handle.proc.poll() is None:
            _stop_up(handle)  # SIGTERM: `up` takes its Ray instance down with it


def _port_socket():
    import socket

    class _Port:
        def __enter__(self) -> int:
            self.s = socket.socket()
            self.s.bind(("127.0.0.1", 0))
            return self.s.getsockname()[1]

        def __exit__(self, *exc: object) -> None:
            self.s.close()

    return _Port()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _prompt(seed: int, n: int = 100) -> list[int]:
    return [(seed * 7919 + i * 104729) % 500 + 2 for i in range(n)]


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def _stream(client: openai.OpenAI, prompt: list[int], n: int, model="tiny-deepseek-v3"
            ) -> list[int]:  # fmt: skip
    out: list[int] = []
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    ):  # fmt: skip
        for choice in chunk.choices:
            out += _ids(choice)
    return out


def _rank_infos(deployment: str, role: str) -> list:
    """The rank actors of one pool that answer now (a restarting one is left out)."""
    infos = []
    for name in list_rank_actors(deployment):
        if f"/{role}/" in name:
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
                infos.append(ray.get(actor.info.remote(), timeout=30))
            except (ValueError, ray.exceptions.RayError):
                continue
    return infos


def test_greedy_matches_generate_stream_and_not(up: Up, reference) -> None:
    client = _client(up.url)
    prompt = _prompt(1)
    want = reference([prompt], 12)[0]
    resp = client.completions.create(
        model="tiny-deepseek-v3", prompt=prompt, max_tokens=12, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    assert _ids(resp.choices[0]) == want
    assert resp.usage.completion_tokens == 12
    assert _stream(client, prompt, 12) == want  # every streamed chunk carries its token_ids
    chat = client.chat.completions.create(
        model="tiny-deepseek-v3", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0,
    )  # fmt: skip
    assert chat.choices[0].message.role == "assistant"


def test_bad_request_is_a_named_400(up: Up) -> None:
    r = httpx.post(f"{up.url}/v1/completions", json={"prompt": "x", "max_tokens": -1}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.text


UNIT = {"type": "function", "function": {"name": "set_unit", "strict": True, "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["unit"], "additionalProperties": False}}}  # fmt: skip


def test_router_flags_reach_the_ray_router(up: Up) -> None:
    r = httpx.post(f"{up.url}/v1/completions", json={
        "prompt": "x", "max_tokens": 2, "stop": ["a", "b", "c"]}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and "stop" in r.json()["error"]["message"], r.text
    resp = _client(up.url).chat.completions.create(
        model="tiny-deepseek-v3", messages=[{"role": "user", "content": "unit?"}], tools=[UNIT],
        tool_choice={"type": "function", "function": {"name": "set_unit"}}, max_tokens=64,
        temperature=0)  # fmt: skip
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "set_unit"


def test_kv_crossed_nixl_between_actors(up: Up) -> None:
    (decode,) = _rank_infos("moeserve", "decode")
    before_router = scrape_metric(f"{up.url}/metrics", "moeserve:kv_transfer_bytes_total")
    before_computed = scrape_metric(decode.metrics_url, "moeserve:prompt_tokens_computed")
    resp = _client(up.url).completions.create(
        model="tiny-deepseek-v3", prompt=_prompt(7, 200), max_tokens=2, temperature=0)
    assert resp.usage.completion_tokens == 2
    time.sleep(0.3)  # gauges refresh on the worker's housekeeping tick
    assert scrape_metric(f"{up.url}/metrics", "moeserve:kv_transfer_bytes_total") > before_router
    assert scrape_metric(decode.metrics_url, "moeserve:kv_transfer_bytes_total") > 0
    # The decode actor ran none of the prompt through its model: the KV came over NIXL.
    assert scrape_metric(decode.metrics_url, "moeserve:prompt_tokens_computed") == before_computed


def _pgs_of(app: str) -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED" and app in (pg.get("name") or "")]  # fmt: skip


def test_model_topology_through_ray_state(up: Up) -> None:
    from ray import serve

    deps = serve.status().applications[APP].deployments
    assert {k: dict(v.replica_states) for k, v in deps.items()} == {
        "prefill": {"RUNNING": 1}, "decode": {"RUNNING": 1}, "router": {"RUNNING": 1}}
    groups = [pg for pg in _pgs_of(APP) if "#prefill#" in pg["name"] or "#decode#" in pg["name"]]
    assert len(groups) == 2
    assert all(len(pg["bundles"]) == 1 and pg["strategy"] == "STRICT_PACK" for pg in groups)


def test_tiny_manifest_through_up_f(up: Up) -> None:
    """examples/tiny-cpu.yaml beside the first app on the same Ray: pools as the spec says."""
    from ray import serve

    port = int(up.url.rsplit(":", 1)[1])
    tiny = _start_up(["-f", "examples/tiny-cpu.yaml", "--address", up.address,
                      "--port", str(port), "--route-prefix", "/tiny"])  # fmt: skip
    try:
        assert tiny.url.endswith("/tiny")
        deps = serve.status().applications["moeserve-tiny"].deployments
        assert dict(deps["prefill"].replica_states) == {"RUNNING": 1}
        assert dict(deps["decode"].replica_states) == {"RUNNING": 1}
        pgs = _pgs_of("moeserve-tiny")
        by_role = {r: [pg for pg in pgs if f"#{r}#" in pg["name"]] for r in ("prefill", "decode")}
        assert [len(pg["bundles"]) for pg in by_role["prefill"]] == [1]
        assert [len(pg["bundles"]) for pg in by_role["decode"]] == [2]  # ep 2: a bundle a rank
        assert by_role["decode"][0]["strategy"] == "STRICT_PACK"
        assert all(b == {"CPU": 0.5} for b in by_role["decode"][0]["bundles"].values())
        ranks = list_rank_actors("tiny")
        assert sum("/decode/" in n for n in ranks) == 2
        assert sum("/prefill/" in n for n in ranks) == 1
        resp = _client(tiny.url).completions.create(
            model="moeserve/tiny-deepseek", prompt=_prompt(3, 40), max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens == 4
        _multi_rank_group_is_replaced(tiny.url)
        status = subprocess.run(
            [sys.executable, "-m", "moeserve.cli", "ray", "status", "--address", up.address],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert re.search(r"moeserve-tiny\s+decode\s+\S+\s+1\s+1", status.stdout), status.stdout
    finally:
        assert _stop_up(tiny) == 0
    assert "moeserve-tiny" not in serve.status().applications
    deadline = time.monotonic() + 30
    while list_rank_actors("tiny") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list_rank_actors("tiny")


def _multi_rank_group_is_replaced(url: str) -> None:
    """One rank of an ep=2 group dies: the survivors cannot heal it, so Serve's health check
    fails the replica and a new group (new placement group, new rank actors) replaces it."""
    (old,) = {i.group for i in _rank_infos("tiny", "decode")}
    victim = next(n for n in list_rank_actors("tiny") if "/decode/" in n)
    ray.kill(ray.get_actor(victim, namespace=NAMESPACE))
    deadline = time.monotonic() + 180
    while True:
        infos = _rank_infos("tiny", "decode")
        if len(infos) == 2 and all(i.group != old for i in infos):
            break
        assert time.monotonic() < deadline, "the broken EP group was not replaced"
        time.sleep(1.0)
    while True:
        try:
            resp = _client(url).completions.create(
                model="moeserve/tiny-deepseek", prompt=_prompt(5, 40), max_tokens=4,
                temperature=0)  # fmt: skip
            assert resp.usage.completion_tokens == 4
            return
        except openai.APIError:
            assert time.monotonic() < deadline, "the new EP group never served"
            time.sleep(1.0)


def _load(url: str, stop: threading.Event, results: list, max_tokens: int = 16) -> None:
    client = _client(url)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            results.append(len(_stream(client, _prompt(1000 + i, 30), max_tokens)))
        except Exception as e:  # noqa: BLE001 - recorded for the assertions
            results.append(e)


def test_scale_decode_1_to_2_while_streaming(up: Up, model_dir: Path) -> None:
    from ray import serve

    from moeserve.deploy.ray_app import build_app, load_deployment

    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(up.url, stop, results)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        dep = load_deployment(model=str(model_dir), decode=2)
        serve.run(build_app(dep, KV_BLOCKS), name=APP, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 180
        while len(_rank_infos("moeserve", "decode")) < 2:
            assert time.monotonic() < deadline, "second decode group never came up"
            time.sleep(0.5)
        time.sleep(2.0)  # the router's discovery polls every 0.5 s
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert results and all(r == 16 for r in results), [r for r in results if r != 16][:3]
    deps = serve.status().applications[APP].deployments
    assert dict(deps["decode"].replica_states) == {"RUNNING": 2}
    assert dict(deps["router"].replica_states) == {"RUNNING": 1}  # not restarted


def test_killed_decode_actor_recovers(up: Up) -> None:
    decoders = _rank_infos("moeserve", "decode")
    assert len(decoders) == 2, "runs after the scaling test"
    victim = decoders[0]
    client = _client(up.url)
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_stream, client, _prompt(2000 + i, 30), 48) for i in range(6)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim.name, namespace=NAMESPACE), no_restart=False)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(len(f.result(timeout=90)))  # never a hang
            except (openai.APIError, openai.APIConnectionError) as e:
                outcomes.append(type(e).__name__)  # a clear error is allowed
    assert all(o == 48 or isinstance(o, str) for o in outcomes), outcomes
    # Ray restarts the actor (new process, new port); the router routes to it again.
    deadline = time.monotonic() + 120
    while True:
        infos = {i.name: i for i in _rank_infos("moeserve", "decode")}
        back = infos.get(victim.name)
        if back is not None and back.pid != victim.pid:
            break
        assert time.monotonic() < deadline, "the killed decode actor was not restarted"
        time.sleep(0.5)
    assert len(_stream(client, _prompt(3000, 30), 8)) == 8
    served = 0.0
    while served == 0:
        assert time.monotonic() < deadline, "the router never used the restarted actor"
        with cf.ThreadPoolExecutor(8) as pool:
            lens = list(pool.map(lambda i: len(_stream(client, _prompt(4000 + i, 30), 8)),
                                 range(8)))  # fmt: skip
        assert lens == [8] * 8
        served = scrape_metric(back.metrics_url, "moeserve:generation_tokens_total")


def test_sigterm_leaves_no_process(up: Up) -> None:
    tree = descendants(up.proc.pid)
    assert any("raylet" in cmd for cmd in tree.values()), tree
    ray.shutdown()  # this test's driver connection, so only `up` holds the instance
    assert _stop_up(up) == 0
    deadline = time.monotonic() + 30
    while (left := [tree[p][:120] for p in tree if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
