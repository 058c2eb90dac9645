"""The engine's flags (`moeserve worker`, `moeserve generate`), one per EngineConfig field, and
the EngineConfig they give back. No torch: `moeserve --help` builds them on any install."""

from __future__ import annotations

import argparse
from dataclasses import fields

from moeserve.worker.config import EngineConfig

__all__ = ["add_engine_args", "engine_config_from_args"]


def add_engine_args(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """One flag per EngineConfig field, help and defaults taken from the dataclass."""
    helps = EngineConfig.field_help()
    for f in fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help strings (for %(default)s): a literal % in prose must be %%.
        text = helps[f.name].replace("%", "%%")
        if f.name == "model":
            parser.add_argument(flag, required=model_required, help=text)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=f.default, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            if "(default:" not in text:  # model_id's docstring says what its "" means
                text += " (default: %(default)r)"
            parser.add_argument(flag, type=kind, default=f.default, help=text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
