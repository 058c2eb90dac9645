"""Serving sweep (issue 21 item 5): aggregated and prefill/decode serving through the router,
the first load after start and the steady state, written as a markdown table.

    python benchmarks/serving_sweep.py --preset v2-lite --checkpoint-dir /tmp/v2lite \\
        --configs agg pd --shapes 1000/100 8000/200 --concurrency 1 64 256 --out sweep.md

Each config starts the local cluster `moeserve up` runs (deploy/local.py: router and worker
processes; ``agg``: one worker that prefills and decodes, ``pd``: a prefill and a decode worker,
on the same GPU when there is one, every prompt handed off), waits until it is ready (the
workers warm up before they report ready), then for each cell (shape x concurrency, in the
order given) runs the same fixed-length, ignore_eos load ``1 + --steady-repeats`` times with
`moeserve bench`'s library (new random prompts each time: the prefix cache never hits): the
first run is "first", the last "steady". The first cell after
start is the real first load of a fresh instance (marked ``*``); later cells' "first" runs
follow other loads. ``--fresh`` restarts the cluster before every cell, so every "first" is.

Reported per run: output tok/s, TTFT / TPOT / ITL p50 and p99 (ms), failures, and the worker
compilations counted after ready (moeserve:worker_compilations_after_ready_total). Per cell:
first / steady output throughput and TTFT p99 (targets: >= 0.9 and <= 1.5).

A reduced GPU run (~8 minutes on one H200, V2-Lite shape with 8 layers):

    python benchmarks/serving_sweep.py --preset v2-lite --layers 8 \\
        --checkpoint-dir /tmp/v2lite-8l --configs agg pd --shapes 1000/100 \\
        --concurrency 64 1 256 --engine-args="--max-num-batched-tokens 8192" \\
        --checkpoint-device cuda --out $OUT/sweep.md

On the CPU (tiny model, tiny sizes): ``--shapes 32/8 --concurrency 1 4 --num-prompts 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from moeserve.bench import BenchConfig, parse_extra_body, run_bench
from moeserve.deploy.local import ClusterSpec, LocalCluster

CONFIGS = {"agg": (0, 1), "pd": (1, 1)}  # (prefill workers, decode workers)
_COMPILES = re.compile(r'^moeserve:worker_compilations_after_ready_total\{kind="\w+"\} (\S+)$',
                       re.M)  # fmt: skip
_STARTUP = re.compile(r'^moeserve:worker_startup_seconds\{phase="(\w+)"\} (\S+)$', re.M)
_STEPS = re.compile(r'^moeserve:engine_step_seconds_(sum|count)\{kind="(\w+)"\} (\S+)$', re.M)
_STEP_TOKENS = re.compile(r"^moeserve:engine_step_prompt_tokens_sum (\S+)$", re.M)
_STEP_GAPS = re.compile(r"^moeserve:engine_step_gap_seconds_(sum|count) (\S+)$", re.M)
_TTFT = re.compile(r"^moeserve:time_to_first_token_seconds_(sum|count)(?:\{[^}]*\})? (\S+)$", re.M)
_KV = re.compile(r"^moeserve:kv_transfer_(bytes_total|seconds_sum|seconds_count) (\S+)$", re.M)


@dataclass(frozen=True)
class StepCounts:
    """A worker's engine-step counters (``moeserve:engine_step_*``), cumulative or a load's."""

    decode_n: float = 0.0
    decode_s: float = 0.0
    mixed_n: float = 0.0
    mixed_s: float = 0.0
    prompt_tokens: float = 0.0
    gap_n: float = 0.0
    gap_s: float = 0.0
    ttft_n: float = 0.0  # time to first token as this process saw it (summed over labels)
    ttft_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> StepCounts:
        got = {f"{kind}_{'n' if stat == 'count' else 's'}": float(v)
               for stat, kind, v in _STEPS.findall(text)}  # fmt: skip
        got.update({f"gap_{'n' if stat == 'count' else 's'}": float(v)
                    for stat, v in _STEP_GAPS.findall(text)})  # fmt: skip
        for stat, v in _TTFT.findall(text):
            key = f"ttft_{'n' if stat == 'count' else 's'}"
            got[key] = got.get(key, 0.0) + float(v)
        tokens = _STEP_TOKENS.search(text)
        return cls(**{k: v for k, v in got.items() if k in cls.__dataclass_fields__},
                   prompt_tokens=float(tokens.group(1)) if tokens else 0.0)  # fmt: skip

    def minus(self, before: StepCounts) -> StepCounts:
        return StepCounts(*(a - b for a, b in zip(dataclasses.astuple(self),
                                                   dataclasses.astuple(before), strict=True)))

    def columns(self) -> tuple[str, str, str, str]:
        """(decode ``N x M ms``, mixed ``N x M ms, T prompt tokens``, mean gap between steps,
        mean TTFT here); "-" for what this process does not have."""
        def mean(total: float, n: float) -> float:
            return total / n if n else 0.0

        steps = self.decode_n or self.mixed_n
        decode = f"{self.decode_n:.0f} x {1e3 * mean(self.decode_s, self.decode_n):.1f} ms"
        mixed = (f"{self.mixed_n:.0f} x {1e3 * mean(self.mixed_s, self.mixed_n):.1f} ms, "
                 f"{mean(self.prompt_tokens, self.mixed_n):.0f} prompt tokens")
        gap = f"{1e3 * mean(self.gap_s, self.gap_n):.2f} ms"
        ttft = f"{1e3 * mean(self.ttft_s, self.ttft_n):.0f} ms" if self.ttft_n else "-"
        return (decode, mixed, gap, ttft) if steps else ("-", "-", "-", ttft)


def _steps(workers: dict[str, str]) -> dict[str, StepCounts]:
    """Each process's cumulative step and TTFT counters, by name (the workers, "router")."""
    out = {}
    for name, url in workers.items():
        with contextlib.suppress(httpx.HTTPError):
            out[name] = StepCounts.parse(httpx.get(url, timeout=5).text)
    return out


@dataclass
class Run:
    config: str
    shape: tuple[int, int]
    concurrency: int
    requests: int
    label: str  # "first" or "steady"
    fresh: bool  # the first load this cluster ran since it started
    summary: dict
    compilations: float
    # per worker (child name): its engine steps during this load (StepCounts.minus)
    steps: dict[str, StepCounts] = field(default_factory=dict)


@dataclass
class ConfigStart:
    config: str
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # summed over the workers
    kv: dict[str, float] = field(default_factory=dict)  # the router's hand-off counters, at end


def parse_shape(text: str) -> tuple[int, int]:
    """``"1000/100"`` -> (1000, 100): prompt and output tokens."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"shape must be INPUT/OUTPUT tokens, e.g. 1000/100; "
                                         f"got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _model_dir(args: argparse.Namespace) -> str | None:
    if args.model:
        return args.model
    if args.preset == "tiny" and not args.checkpoint_dir:
        return None  # `moeserve up`'s embedded tiny model
    if not args.checkpoint_dir:
        raise SystemExit("--preset other than tiny needs --checkpoint-dir (made if absent)")
    out = Path(args.checkpoint_dir)
    if not (out / "config.json").is_file():
        from moeserve.worker.checkpoint import make_checkpoint

        print(f"[sweep] making a random {args.preset} checkpoint in {out}", flush=True)
        make_checkpoint(out, args.preset, layers=args.layers, dtype=args.dtype,
                        device=args.checkpoint_device)  # fmt: skip
    return str(out)


def _scrape(urls: list[str]) -> tuple[float, dict[str, float]]:
    """(compilations after ready, start-up seconds by phase), summed over the workers."""
    compiles, phases = 0.0, {}
    for url in urls:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(url, timeout=5).text
            compiles += sum(float(v) for v in _COMPILES.findall(text))
            for phase, v in _STARTUP.findall(text):
                phases[phase] = phases.get(phase, 0.0) + float(v)
    return compiles, phases


class Sweep:
    def __init__(self, args: argparse.Namespace, model: str | None):
        self.args, self.model = args, model
        self.runs: list[Run] = []
        self.starts: list[ConfigStart] = []
        self._loads = 0

    def _cluster(self, config: str) -> LocalCluster:
        prefill, decode = CONFIGS[config]
        spec = ClusterSpec(model=self.model, prefill=prefill, decode=decode, port=0,
                           disagg_threshold=0, num_kv_blocks=self.args.num_kv_blocks,
                           worker_args=shlex.split(self.args.engine_args),
                           startup_timeout_s=self.args.startup_timeout_s)  # fmt: skip
        log = sys.stderr if self.args.verbose else None
        return LocalCluster(spec, log=log)

    def _load(self, url: str, shape: tuple[int, int], conc: int, extra: dict | None = None
              ) -> dict:  # fmt: skip
        n = self.args.num_prompts or max(4 * conc, 8)
        # New prompts every run: a repeat of the same ones would hit the prefix cache and
        # make the "steady state" a cached-prefill number.
        self._loads += 1
        cfg = BenchConfig(url=url, num_prompts=n, concurrency=conc, dataset="fixed",
                          input_len=shape[0], output_len=shape[1],
                          seed=self.args.seed + 1000 * self._loads,
                          timeout_s=self.args.timeout_s, progress=False,
                          extra_body=extra)  # fmt: skip
        return asyncio.run(run_bench(cfg))

    def run_config(self, config: str) -> None:
        cells = [(s, c) for s in self.args.shapes for c in self.args.concurrency]
        groups = [[cell] for cell in cells] if self.args.fresh else [cells]
        for group in groups:
            start = time.perf_counter()
            with self._cluster(config) as cluster:
                named = {c.name: c.metrics for c in cluster.children
                         if c.name != "router" and c.metrics}  # fmt: skip
                workers = list(named.values())
                named["router"] = f"{cluster.url}/metrics"  # its TTFT, beside the workers'
                _, phases = _scrape(workers)
                self.starts.append(ConfigStart(config, time.perf_counter() - start, phases))
                print(f"[sweep] {config} ready in {time.perf_counter() - start:.1f} s "
                      f"(workers: {_phases(phases)})", flush=True)
                fresh = True
                for shape, conc in group:
                    for i in range(1 + self.args.steady_repeats):
                        before = _steps(named)
                        summary = self._load(cluster.url, shape, conc)
                        if i in (0, self.args.steady_repeats):
                            compiles, _ = _scrape(workers)
                            steps = {k: v.minus(before.get(k, StepCounts()))
                                     for k, v in _steps(named).items()}  # fmt: skip
                            self.runs.append(Run(config, shape, conc, summary["completed"] +
                                                 summary["failed"], "first" if i == 0 else
                                                 "steady", fresh and i == 0, summary,
                                                 compiles, steps))  # fmt: skip
                    if self.args.compare_body is not None:
                        summary = self._load(cluster.url, shape, conc, self.args.compare_body)
                        compiles, _ = _scrape(workers)
                        self.runs.append(Run(config, shape, conc, summary["completed"] +
                                             summary["failed"], "steady+body", False, summary,
                                             compiles))  # fmt: skip
                    fresh = False
                with contextlib.suppress(httpx.HTTPError):
                    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
                    self.starts[-1].kv = {k: float(v) for k, v in _KV.findall(text)}


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) or "no metrics"


def _handoffs(kv: dict[str, float]) -> str:
    n = kv.get("seconds_count", 0)
    if not n:
        return ""
    return (f"; {n:.0f} KV hand-offs, {kv.get('bytes_total', 0) / 2**20:.1f} MiB, "
            f"{kv.get('seconds_sum', 0) / n * 1e3:.1f} ms each on average")


def _pq(dist: dict) -> str:
    return f"{dist['p50']:.1f} / {dist['p99']:.1f}"


def markdown(sweep: Sweep, title: str) -> str:
    lines = [f"### {title}", ""]
    for s in sweep.starts:
        lines.append(f"- `{s.config}` ready {s.seconds:.1f} s after start "
                     f"(workers, summed: {_phases(s.phases)}){_handoffs(s.kv)}")
    lines += ["", "| config | in/out | conc | requests | run | output tok/s | TTFT p50 / p99 ms "
              "| TPOT p50 / p99 ms | ITL p50 / p99 ms | failed | compiles after ready |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sweep.runs:
        s = r.summary
        lines.append(
            f"| {r.config} | {r.shape[0]}/{r.shape[1]} | {r.concurrency} | {r.requests} | "
            f"{r.label}{'*' if r.fresh else ''} | {s['output_throughput']:.0f} | "
            f"{_pq(s['ttft_ms'])} | {_pq(s['tpot_ms'])} | {_pq(s['itl_ms'])} | {s['failed']} | "
            f"{r.compilations:.0f} |")
    lines += ["", "First load against steady state (targets: throughput >= 0.9, TTFT p99 <= "
              "1.5):", "", "| config | in/out | conc | tok/s first / steady | TTFT p99 first / "
              "steady |", "|---|---|---:|---:|---:|"]
    by_cell: dict[tuple, dict[str, Run]] = {}
    for r in sweep.runs:
        by_cell.setdefault((r.config, r.shape, r.concurrency), {})[r.label] = r
    for (config, shape, conc), pair in by_cell.items():
        if "first" not in pair or "steady" not in pair:
            continue
        f, st = pair["first"].summary, pair["steady"].summary
        tput = f["output_throughput"] / st["output_throughput"] if st["output_throughput"] else 0
        ttft = f["ttft_ms"]["p99"] / st["ttft_ms"]["p99"] if st["ttft_ms"]["p99"] else 0
        lines.append(f"| {config} | {shape[0]}/{shape[1]} | {conc} | {tput:.2f} | {ttft:.2f} |")
    stepped = [r for r in sweep.runs if r.steps]
    if stepped:
        lines += ["", "Per load, each process (`moeserve:engine_step_*`, "
                  "`moeserve:time_to_first_token_seconds`): decode steps x mean wall time | "
                  "mixed steps x mean wall time, mean prompt tokens | mean time between two "
                  "steps while busy | mean TTFT from the request's arrival there (the bench's "
                  "own: the table above):", "",
                  "| config | in/out | conc | run | process | decode | mixed | between | TTFT |",
                  "|---|---|---:|---|---|---|---|---:|---:|"]  # fmt: skip
        for r in stepped:
            for name, counts in r.steps.items():
                decode, mixed, gap, ttft = counts.columns()
                lines.append(f"| {r.config} | {r.shape[0]}/{r.shape[1]} | {r.concurrency} | "
                             f"{r.label} | {name} | {decode} | {mixed} | {gap} | {ttft} |")
    compared = [(pair["steady"], pair["steady+body"]) for pair in by_cell.values()
                if "steady" in pair and "steady+body" in pair]  # fmt: skip
    if compared:
        lines += ["", "The steady state against the same load with the extra request body "
                  "(`steady+body`, e.g. structured decoding):", "",
                  "| config | in/out | conc | ITL p50 ms plain / body | ratio | tok/s plain / "
                  "body |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for st, b in compared:
            p0, p1 = st.summary["itl_ms"]["p50"], b.summary["itl_ms"]["p50"]
            lines.append(f"| {st.config} | {st.shape[0]}/{st.shape[1]} | {st.concurrency} | "
                         f"{p0:.2f} / {p1:.2f} | {p1 / p0 if p0 else 0:.2f} | "
                         f"{st.summary['output_throughput']:.0f} / "
                         f"{b.summary['output_throughput']:.0f} |")  # fmt: skip
    lines += ["", "`*`: the first load this instance ran after it reported ready."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="checkpoint directory (default: --preset)")
    m.add_argument("--preset", default="tiny", choices=["tiny", "v2-lite", "v3"],
                   help="random checkpoint of this shape, made in --checkpoint-dir if absent")
    m.add_argument("--checkpoint-dir", help="where the --preset checkpoint is (or is made)")
    m.add_argument("--layers", type=int, help="--preset with fewer layers (quicker to make)")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--checkpoint-device", default="cpu", help="where random weights are drawn")
    w = p.add_argument_group("workload")
    w.add_argument("--configs", nargs="+", default=["agg", "pd"], choices=sorted(CONFIGS))
    w.add_argument("--shapes", nargs="+", type=parse_shape,
                   default=[(1000, 100), (8000, 200)], help="INPUT/OUTPUT tokens, e.g. 1000/100")
    w.add_argument("--concurrency", nargs="+", type=int, default=[1, 64, 256])
    w.add_argument("--num-prompts", type=int, default=0,
                   help="requests per run (0: 4 x concurrency, at least 8)")
    w.add_argument("--steady-repeats", type=int, default=1,
                   help="runs after the first; the last is the steady state")
    w.add_argument("--fresh", action="store_true",
                   help="restart the cluster before every cell (every 'first' is a fresh start)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--compare-body", type=parse_extra_body, default=None, metavar="JSON",
                   help="after each steady run, one more with these request fields (e.g. "
                        "a response_format), compared with it")  # fmt: skip
    w.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    c = p.add_argument_group("cluster")
    c.add_argument("--engine-args", default="",
                   help='flags for every worker, e.g. "--max-num-batched-tokens 8192"')
    c.add_argument("--num-kv-blocks", type=int, default=0, help="0: the engine's sizing")
    c.add_argument("--startup-timeout-s", type=float, default=900.0)
    c.add_argument("--verbose", action="store_true", help="show the cluster's logs")
    p.add_argument("--out", help="write the markdown table here (also printed)")
    p.add_argument("--title", default="Serving sweep")
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.steady_repeats < 1:
        raise SystemExit("--concurrency values and --steady-repeats must be >= 1")
    sweep = Sweep(args, _model_dir(args))
    for config in args.configs:
        sweep.run_config(config)
    table = markdown(sweep, args.title)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
