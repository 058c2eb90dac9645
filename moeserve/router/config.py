"""The router's configuration: `moeserve router` flags and `--config router.yaml` resolve into
one :class:`RouterConfig`.

The file is what the operator renders (``moeserve/operator/build_router.py``)::

    model: {name, path, blockSize}                           # name: --served-model-name
    listen: {host, http, grpc, metrics}
    workers: {prefill: [host:port, ...], decode: [...]}      # static workers, optional
    discovery: {namespace, port, selector, roleLabel, groupLabel, ranksPerPod}
    disaggThreshold: 0                                       # any router flag, camelCase

Precedence: a flag given on the command line, then the file, then the flag's default. Defaults
live only in the parser (which takes them from ``RouterSettings``), so the file never carries a
second copy of them. Unknown keys and wrong types fail with the key's full path.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel, to_snake

from moeserve.common import spec as s
from moeserve.common.errors import ConfigError

__all__ = ["DiscoveryConfig", "RouterConfig", "fill_flag_defaults", "track_explicit_flags",
           "resolve_router_config"]

# Flags that live in a section of the file instead of at its top level: (section, key) -> dest.
_SECTION_FLAGS = {
    ("model", "path"): "model",
    ("model", "name"): "served_model_name",
    ("listen", "host"): "host",
    ("listen", "http"): "port",
    ("listen", "grpc"): "grpc_port",
    ("listen", "metrics"): "metrics_port",
    ("workers", "prefill"): "prefill",
    ("workers", "decode"): "decode",
}
# Namespace attribute holding {dest: _Flag}; the flags themselves default to "not given".
_FLAGS_ATTR = "_router_flags"
_NOT_FROM_FILE = {"help", "config", "func", "api_key"}  # secrets never come from a ConfigMap


class _Section(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)  # fmt: skip


class DiscoveryConfig(_Section):
    """Which Kubernetes workers the router serves: EndpointSlices in ``namespace`` carrying
    every ``selector`` label; the role comes from ``role_label``; a pod with N ranks serves
    rank i on ``port + i`` (``ranks_per_pod`` per role, 1 when absent)."""

    namespace: str = Field(min_length=1)
    port: int = Field(default=s.PORT_WORKER_GRPC, ge=1, le=65535)
    selector: dict[str, str] = Field(min_length=1)
    role_label: str = s.LABEL_ROLE
    group_label: str = s.LABEL_GROUP
    ranks_per_pod: dict[Literal["prefill", "decode"], int] = Field(default_factory=dict)
    resource: Literal["endpointslices"] = "endpointslices"

    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))

    def ranks(self, role: str) -> int:
        return self.ranks_per_pod.get(role, 1)  # type: ignore[call-overload]


class _ModelSection(_Section):
    name: str = ""
    path: str | None = None
    block_size: int | None = Field(default=None, ge=1)


class _ListenSection(_Section):
    host: str | None = None
    http: int | None = Field(default=None, ge=0, le=65535)
    grpc: int | None = Field(default=None, ge=0, le=65535)
    metrics: int | None = Field(default=None, ge=0, le=65535)


class _WorkersSection(_Section):
    prefill: list[str] = Field(default_factory=list)
    decode: list[str] = Field(default_factory=list)


class _RouterFile(_Section):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow",
                              frozen=True)  # fmt: skip
    model: _ModelSection = Field(default_factory=_ModelSection)
    listen: _ListenSection = Field(default_factory=_ListenSection)
    workers: _WorkersSection = Field(default_factory=_WorkersSection)
    discovery: DiscoveryConfig | None = None


@dataclass(frozen=True)
class _Flag:
    default: Any
    kind: type
    choices: Any


@dataclass(frozen=True)
class RouterConfig:
    """Where the router's workers and model come from, resolved from flags and file."""

    model_dir: str
    model_name: str  # --served-model-name / model.name; "" means the workers' model id
    block_size: int | None
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int | None
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    discovery: DiscoveryConfig | None


def track_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Call last when building the router's parser: remembers each flag's default and makes
    flags not given on the command line absent from the namespace, so the file can fill them."""
    flags: dict[str, _Flag] = {}
    for action in parser._actions:
        if action.dest in _NOT_FROM_FILE or action.default is argparse.SUPPRESS:
            continue
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            kind: type = bool
        else:
            kind = action.type if action.type in (int, float) else str  # type: ignore[assignment]
        flags[action.dest] = _Flag(action.default, kind, action.choices)
        action.default = argparse.SUPPRESS
    parser.set_defaults(**{_FLAGS_ATTR: flags})


def fill_flag_defaults(args: argparse.Namespace, from_file: dict | None = None) -> None:
    """Give ``args`` every tracked flag it lacks: the file's value, else the default (the
    parser leaves them unset so that a file can tell given flags from defaults)."""
    for dest, flag in dict(getattr(args, _FLAGS_ATTR, {})).items():
        if not hasattr(args, dest):
            setattr(args, dest, (from_file or {}).get(dest, flag.default))


def resolve_router_config(args: argparse.Namespace) -> RouterConfig:
    """Fill ``args`` (flag > file > default) and return the resolved :class:`RouterConfig`."""
    flags: dict[str, _Flag] = dict(getattr(args, _FLAGS_ATTR, {}))
    path = getattr(args, "config", None)
    file = _load(Path(path), flags) if path else None
    fill_flag_defaults(args, _flag_values(file, flags) if file is not None else None)
    where = f"{path}: " if path else ""
    if not args.model:
        raise ConfigError(f"{where}model.path (or --model) is required: the checkpoint "
                          "directory holding the tokenizer and config.json")  # fmt: skip
    prefill = _addresses(args.prefill)
    decode = _addresses(args.decode)
    discovery = file.discovery if file is not None else None
    if discovery is not None and (prefill or decode):
        raise ConfigError(f"{where}discovery: set either discovery or static workers "
                          "(workers.* / --prefill / --decode), not both")  # fmt: skip
    if discovery is None and not decode:
        raise ConfigError(f"{where}workers.decode (or --decode) needs at least one worker "
                          "address, or set discovery")  # fmt: skip
    model = file.model if file is not None else _ModelSection()
    return RouterConfig(
        model_dir=args.model, model_name=getattr(args, "served_model_name", None) or "",
        block_size=model.block_size,
        host=args.host, http_port=args.port, grpc_port=args.grpc_port,
        metrics_port=getattr(args, "metrics_port", None), prefill=tuple(prefill),
        decode=tuple(decode), discovery=discovery,
    )  # fmt: skip


def _addresses(value: str | list[str] | None) -> list[str]:
    items = value.split(",") if isinstance(value, str) else (value or [])
    return [a.strip() for a in items if a.strip()]


def _load(path: Path, flags: dict[str, _Flag]) -> _RouterFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the router config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        file = _RouterFile.model_validate(raw)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems)) from None
    top = set(flags) - set(_SECTION_FLAGS.values())
    for key, value in (file.model_extra or {}).items():
        dest = to_snake(key)
        if dest not in top or key != to_camel(dest):
            known = sorted([*(to_camel(d) for d in top), "model", "listen", "workers",
                            "discovery"])  # fmt: skip
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"{path}: {key}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        _check_type(path, key, value, flags[dest])
    return file


def _check_type(path: Path, key: str, value: Any, flag: _Flag) -> None:
    if flag.kind is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif flag.kind is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif flag.kind is float:
        ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, str), "a string"
    if ok and flag.choices is not None and value not in flag.choices:
        ok, want = False, "one of " + ", ".join(map(str, flag.choices))
    if not ok:
        raise ConfigError(f"{path}: {key}: expected {want}, got {value!r}")


def _flag_values(file: _RouterFile, flags: dict[str, _Flag]) -> dict[str, Any]:
    out: dict[str, Any] = {to_snake(k): v for k, v in (file.model_extra or {}).items()}
    for (section, key), dest in _SECTION_FLAGS.items():
        value = getattr(getattr(file, section), key)
        if value is not None and value != [] and dest in flags:
            out[dest] = value
    for dest, value in out.items():  # YAML's 30 is as good as 30.0 where a float goes
        if flags[dest].kind is float and isinstance(value, int):
            out[dest] = float(value)
    return out
