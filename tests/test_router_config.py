"""`moeserve router --config FILE`: flags and file resolve into one RouterConfig (flag > file >
the flag's default) and a bad file fails naming the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from moeserve.cli import build_parser
from moeserve.common.errors import ConfigError
from moeserve.router.config import resolve_router_config
from moeserve.router.settings import RouterSettings

pytestmark = pytest.mark.timeout(60)


def _resolve(tmp_path: Path, text: str, *flags: str):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(text))
    args = build_parser().parse_args(["router", "--config", str(path), *flags])
    return resolve_router_config(args), args


def test_flag_beats_file_beats_default(tmp_path: Path) -> None:
    cfg, args = _resolve(tmp_path, """
        model: {name: served/tiny, path: /models/tiny, blockSize: 32}
        listen: {host: 0.0.0.0, http: 9000, metrics: 9002}
        workers: {prefill: [a:1], decode: [b:2, c:3]}
        maxInflight: 7
        requestTimeoutS: 30
        policy: round_robin
    """, "--max-inflight", "256", "--grpc-port", "9001")  # fmt: skip
    assert args.max_inflight == 256  # given on the line, though equal to the default
    assert args.request_timeout_s == 30.0 and isinstance(args.request_timeout_s, float)
    assert args.policy == "round_robin"
    assert args.drain_grace_s == RouterSettings().drain_grace_s  # neither: the default
    assert (cfg.host, cfg.http_port, cfg.grpc_port, cfg.metrics_port) == ("0.0.0.0", 9000,
                                                                          9001, 9002)  # fmt: skip
    assert (cfg.prefill, cfg.decode) == (("a:1",), ("b:2", "c:3"))
    assert (cfg.model_dir, cfg.model_name, cfg.block_size) == ("/models/tiny", "served/tiny", 32)
    assert cfg.discovery is None


def test_flags_alone_still_work() -> None:
    args = build_parser().parse_args(["router", "--model", "/m", "--decode", "d:1,e:2"])
    cfg = resolve_router_config(args)
    assert cfg.decode == ("d:1", "e:2") and cfg.prefill == () and args.port == 8000


def test_discovery_section(tmp_path: Path) -> None:
    cfg, _ = _resolve(tmp_path, """
        model: {path: /m}
        discovery:
          namespace: llm
          selector: {moeserve.io/deployment: tiny}
          ranksPerPod: {decode: 8}
    """)  # fmt: skip
    d = cfg.discovery
    assert d is not None and d.port == 8100 and d.ranks("decode") == 8 and d.ranks("prefill") == 1
    assert d.label_selector() == "moeserve.io/deployment=tiny"


@pytest.mark.parametrize(("text", "message"), [
    ("model: {path: /m}\nworkers: {decode: [a:1]}\nmaxInflite: 3\n",
     "maxInflite: unknown key (did you mean 'maxInflight'?)"),
    ("model: {path: /m}\nworkers: {decode: [a:1]}\nmaxInflight: lots\n",
     "maxInflight: expected an integer, got 'lots'"),
    ("model: {path: /m}\nworkers: {decode: [a:1]}\npolicy: fastest\n", "policy: expected one of"),
    ("model: {path: /m}\ndiscovery: {namespace: llm, selector: {a: b}, port: http}\n",
     "discovery.port: "),
    ("model: {path: /m}\ndiscovery: {namespace: llm}\n", "discovery.selector: "),
    ("model: {path: /m}\nlisten: {htp: 1}\nworkers: {decode: [a:1]}\n", "listen.htp: "),
    ("model: {path: /m}\n", "workers.decode (or --decode) needs at least one"),
    ("workers: {decode: [a:1]}\n", "model.path (or --model) is required"),
    ("model: {path: /m}\nworkers: {decode: [a:1]}\ndiscovery: {namespace: n, selector: {a: b}}\n",
     "discovery: set either discovery or static workers"),
    ("[1, 2]\n", "expected a mapping at the top level"),
    ("model: {path: /m\n", "not valid YAML"),
])  # fmt: skip
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _resolve(tmp_path, text)
    assert message in str(e.value) and str(tmp_path / "router.yaml") in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    args = build_parser().parse_args(["router", "--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="cannot read the router config"):
        resolve_router_config(args)
