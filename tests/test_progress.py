"""Long work shows progress (checkpoint writing, weight loading, bench) and library chatter
stays out of the terminal (no httpx line per bench request)."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from moeserve import cli
from moeserve.common import progress as progress_mod
from moeserve.common.model_config import load_model_config
from moeserve.worker.checkpoint import make_checkpoint
from moeserve.worker.model.deepseek import DeepseekForCausalLM
from moeserve.worker.weights import load_checkpoint


@pytest.fixture
def restore_quiet_loggers() -> Iterator[None]:
    """cli.main sets library logger levels process-wide; put them back for other tests."""
    levels = {n: logging.getLogger(n).level for n in cli.QUIET_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def no_forced_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress_mod.ENV_PROGRESS, raising=False)


def test_make_checkpoint_shows_progress_on_stderr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(progress_mod.ENV_PROGRESS, "1")  # stderr is no TTY under pytest
    assert cli.main(["make-checkpoint", "--out", str(tmp_path / "ck")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "ck")  # stdout stays the path alone, for scripts
    assert "drawing weights: 100%" in err and "param" in err
    assert f"writing {tmp_path / 'ck'}: 100%" in err


def test_progress_off_a_terminal_is_a_periodic_log_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_forced_progress: None,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO)
    make_checkpoint(tmp_path / "fast", "tiny")  # well under LOG_INTERVAL_S: nothing to say
    assert not [r for r in caplog.records if "weights" in r.getMessage()]
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)  # as if every tensor were slow
    make_checkpoint(tmp_path / "slow", "tiny")
    lines = [r.getMessage() for r in caplog.records if r.name == "moeserve.worker.checkpoint"]
    assert any(m.startswith("drawing weights: ") and m.endswith("(100%)") for m in lines)
    assert capsys.readouterr().err == ""  # no tqdm bar written into a log file


def test_progress_silent_above_info(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_forced_progress: None,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)
    make_checkpoint(tmp_path / "ck", "tiny")
    assert caplog.records == [] and capsys.readouterr().err == ""


def test_load_checkpoint_reports_tensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    ck = make_checkpoint(tmp_path / "ck", "tiny", dtype="float32")
    n = len(json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"])
    model = DeepseekForCausalLM(load_model_config(ck), max_positions=64)
    capsys.readouterr()
    monkeypatch.setenv(progress_mod.ENV_PROGRESS, "1")
    load_checkpoint(model, ck)
    err = capsys.readouterr().err
    assert "loading weights: 100%" in err and f"{n}/{n}" in err
    monkeypatch.setenv("MOESERVE_LOCAL_RANK", "1")  # other EP ranks read the same files
    load_checkpoint(model, ck)
    assert capsys.readouterr().err == ""


class _FakeRouter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # /v1/models
        self._send(json.dumps({"data": [{"id": "tiny", "vocab_size": 100}]}))

    def do_POST(self) -> None:  # /v1/completions, streamed
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        events = [f"data: {json.dumps({'choices': [{'index': 0, 'token_ids': [i]}]})}\n\n"
                  for i in range(body["max_tokens"])]
        self._send("".join(events) + "data: [DONE]\n\n", "text/event-stream")

    def _send(self, text: str, ctype: str = "application/json") -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_router() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRouter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bench_prints_progress_and_no_httpx_request_lines(
        fake_router: str, monkeypatch: pytest.MonkeyPatch, restore_quiet_loggers: None,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(progress_mod.ENV_PROGRESS, "1")
    code = cli.main(["bench", "--url", fake_router, "--num-prompts", "6", "--input-len", "4",
                     "--output-len", "3", "--concurrency", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and re.search(r"Successful requests: +6\n", out)
    assert re.search(r"Failed requests: +0\n", out)
    assert "requests: 100%" in err and "6/6" in err
    chatter = [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    assert chatter == []


def test_cli_logging_quiets_libraries_but_keeps_their_warnings(
        restore_quiet_loggers: None) -> None:
    cli.configure_logging("DEBUG")
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore.http11").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("urllib3.connectionpool").getEffectiveLevel() == logging.WARNING
    cli.configure_logging("ERROR")
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.ERROR
