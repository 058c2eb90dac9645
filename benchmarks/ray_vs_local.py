"""What the Ray path costs: `moeserve up --ray` beside `moeserve up`, same checkpoint and load.

    python benchmarks/ray_vs_local.py [--model DIR] [--concurrency 1 16] [--out FILE.json]

Starts each target as a user would (`moeserve up [--ray] --model DIR --port P`, one prefill and
one decode worker, disaggregation on for every prompt), runs `moeserve bench` against it at each
concurrency, stops it, and prints one markdown table of TTFT and ITL p50/p99.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_UP = re.compile(r"moeserve is up(?: on Ray)?: (http://\S+?)(?:/v1)?\s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(model: str, ray: bool, kv_blocks: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "moeserve.cli", "up", "--model", model, "--port",
           str(_free_port()), "--num-kv-blocks", str(kv_blocks)]  # fmt: skip
    if ray:
        cmd.append("--ray")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            if not found and (m := _UP.search(line)):
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(300) or not found:
        proc.kill()
        raise RuntimeError(f"{' '.join(cmd)} did not come up")
    return proc, found[0]


def _bench(url: str, concurrency: int, prompts: int, input_len: int, output_len: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([
            sys.executable, "-m", "moeserve.cli", "bench", "--url", url, "--concurrency",
            str(concurrency), "--num-prompts", str(prompts), "--input-len", str(input_len),
            "--output-len", str(output_len), "--out", f.name, "--no-progress",
        ], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        return json.loads(Path(f.name).read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts-per-stream", type=int, default=4)
    ap.add_argument("--min-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.model is None:
        from moeserve.worker.checkpoint import ensure_tiny_checkpoint

        args.model = str(ensure_tiny_checkpoint())
    rows = []
    for target in ("local", "ray"):
        proc, url = _up(args.model, target == "ray", args.kv_blocks)
        try:
            _bench(url, 4, 8, args.input_len, args.output_len)  # warm-up, not reported
            for c in args.concurrency:
                n = max(args.min_prompts, c * args.prompts_per_stream)
                s = _bench(url, c, n, args.input_len, args.output_len)
                rows.append({"target": target, "concurrency": c, "prompts": n, **s})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        time.sleep(2)
    print("| target | streams | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
          "out tok/s | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'moeserve up --ray' if r['target'] == 'ray' else 'moeserve up'} | "
              f"{r['concurrency']} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | "
              f"{r['itl_ms']['p50']:.1f} | {r['itl_ms']['p99']:.1f} | "
              f"{r['output_throughput']:.0f} | {r['failed']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
