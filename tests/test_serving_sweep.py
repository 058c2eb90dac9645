"""benchmarks/serving_sweep.py: its arguments and its table (the sweep itself runs clusters: it
was run end to end on the CPU by hand, see docs/performance.md)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.serving_sweep import (
    ConfigStart,
    Run,
    StepCounts,
    Sweep,
    build_parser,
    markdown,
    parse_shape,
)


def test_shapes_parse_and_bad_ones_are_named() -> None:
    assert parse_shape("1000/100") == (1000, 100)
    for bad in ("1000", "0/10", "a/b", "10/-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="INPUT/OUTPUT"):
            parse_shape(bad)
    args = build_parser().parse_args(["--shapes", "8/2", "--concurrency", "4"])
    assert args.shapes == [(8, 2)] and args.configs == ["agg", "pd"]


def _summary(tok_s: float, ttft_p99: float) -> dict:
    dist = {"mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": ttft_p99}
    return {"output_throughput": tok_s, "ttft_ms": dist, "tpot_ms": dist, "itl_ms": dist,
            "failed": 0, "completed": 8}


def test_table_has_first_and_steady_and_their_ratio() -> None:
    sweep = Sweep(build_parser().parse_args([]), None)
    sweep.starts.append(ConfigStart("pd", 12.0, {"load": 3.0, "warmup": 1.0},
                                    {"bytes_total": 2**21, "seconds_sum": 0.02,
                                     "seconds_count": 4}))
    sweep.runs += [Run("pd", (1000, 100), 64, 8, "first", True, _summary(900, 300), 0),
                   Run("pd", (1000, 100), 64, 8, "steady", False, _summary(1000, 200), 0)]
    table = markdown(sweep, "t")
    assert "| pd | 1000/100 | 64 | 8 | first* | 900 |" in table
    assert "| pd | 1000/100 | 64 | 0.90 | 1.50 |" in table
    assert "4 KV hand-offs, 2.0 MiB, 5.0 ms each" in table


def test_compare_body_rows_are_set_beside_the_steady_state() -> None:
    fmt = '{"response_format": {"type": "json_object"}}'
    args = build_parser().parse_args(["--compare-body", fmt])
    assert args.compare_body == {"response_format": {"type": "json_object"}}
    sweep = Sweep(args, None)
    plain, body = _summary(6000, 200), _summary(5600, 210)
    plain["itl_ms"] = {"mean": 10.0, "p50": 10.0, "p90": 11.0, "p99": 12.0}
    body["itl_ms"] = {"mean": 10.8, "p50": 10.8, "p90": 12.0, "p99": 13.0}
    sweep.runs += [Run("agg", (1000, 100), 64, 256, "first", True, plain, 0),
                   Run("agg", (1000, 100), 64, 256, "steady", False, plain, 0),
                   Run("agg", (1000, 100), 64, 256, "steady+body", False, body, 0)]
    table = markdown(sweep, "t")
    assert "| agg | 1000/100 | 64 | 10.00 / 10.80 | 1.08 | 6000 / 5600 |" in table
    assert "| agg | 1000/100 | 64 | 1.00 | 1.00 |" in table  # first/steady unaffected


def _metrics_text(decode: tuple[int, float], mixed: tuple[int, float], tokens: int) -> str:
    return (f'moeserve:engine_step_seconds_count{{kind="decode"}} {decode[0]}.0\n'
            f'moeserve:engine_step_seconds_sum{{kind="decode"}} {decode[1]}\n'
            f'moeserve:engine_step_seconds_count{{kind="mixed"}} {mixed[0]}.0\n'
            f'moeserve:engine_step_seconds_sum{{kind="mixed"}} {mixed[1]}\n'
            f"moeserve:engine_step_prompt_tokens_sum {tokens}.0\n"
            f"moeserve:engine_step_gap_seconds_count {decode[0] + mixed[0]}.0\n"
            f"moeserve:engine_step_gap_seconds_sum {0.0005 * (decode[0] + mixed[0])}\n")


def test_step_counts_of_a_load_are_the_workers_counters_difference() -> None:
    before = StepCounts.parse(_metrics_text((10, 0.1), (2, 0.2), 2000))
    after = StepCounts.parse(_metrics_text((110, 1.16), (10, 1.0), 10000))
    load = after.minus(before)
    assert (load.decode_n, load.mixed_n, load.prompt_tokens) == (100, 8, 8000)
    assert load.decode_s == pytest.approx(1.06) and load.mixed_s == pytest.approx(0.8)
    assert load.columns() == ("100 x 10.6 ms", "8 x 100.0 ms, 1000 prompt tokens", "0.50 ms",
                              "-")  # fmt: skip
    router = StepCounts.parse('moeserve:time_to_first_token_seconds_count{model_name="m"} 4.0\n'
                              'moeserve:time_to_first_token_seconds_sum{model_name="m"} 1.0\n')
    assert router.columns() == ("-", "-", "-", "250 ms")
    assert StepCounts.parse("no such metric 1\n") == StepCounts()
    sweep = Sweep(build_parser().parse_args([]), None)
    sweep.runs.append(Run("agg", (1000, 100), 64, 8, "steady", False, _summary(900, 300), 0,
                          {"decode-0": load, "router": router}))
    table = markdown(sweep, "t")
    assert ("| agg | 1000/100 | 64 | steady | decode-0 | 100 x 10.6 ms | 8 x 100.0 ms, 1000 "
            "prompt tokens | 0.50 ms | - |") in table
    assert "| agg | 1000/100 | 64 | steady | router | - | - | - | 250 ms |" in table
