"""Per-step cost of structured outputs at a decode batch: the host's mask (each request's
llguidance matcher consumes its last token and writes its bitmask row) and the device's
masking in the sampler, against the same sampler step unconstrained.

Every row is a request under a JSON schema that walks through its own grammar state (tokens
drawn from the masked distribution, a finished request restarts), so the rows sit in strings,
numbers and keys as in serving. The vocabulary is a real tokenizer.json (``--tokenizer``, e.g.
DeepSeek-V3's) or a byte-level BPE trained once on Python's standard library sources
(``--train-vocab`` tokens, cached under ~/.cache/moeserve), padded to ``--vocab`` logits.

  python benchmarks/grammar_mask.py --batch 64                     # CPU
  python benchmarks/grammar_mask.py --batch 64 --device cuda       # the GPU number
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeserve.common.sampling import SamplingParams
from moeserve.common.structured import structured_from_json_schema
from moeserve.worker.grammar import GrammarCompiler, Grammars, apply_token_bitmask
from moeserve.worker.sampler import Sampler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "tags", "address", "active", "score"],
    "additionalProperties": False,
}


@dataclass
class _Req:
    """What Grammars reads of a request."""

    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [1])
    output_token_ids: list[int] = field(default_factory=list)


def trained_tokenizer(vocab: int) -> Path:
    path = Path.home() / ".cache" / "moeserve" / f"bench-bpe-{vocab}.json"
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"], show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _eos_id(path: Path) -> int:
    added = json.loads(path.read_text()).get("added_tokens", [])
    for t in added:
        if any(k in t["content"] for k in ("eos", "end_of_sentence", "end▁of▁sentence",
                                           "endoftext", "</s>")):
            return t["id"]
    raise SystemExit(f"no EOS-like added token in {path}; pass --eos")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(samples: list[float]) -> str:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
    return (f"mean {statistics.fmean(s) * 1e6:8.1f} us  p50 {s[len(s) // 2] * 1e6:8.1f} us  "
            f"p99 {p99 * 1e6:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=129280, help="logits width (DeepSeek-V3's)")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json (default: trained BPE)")
    ap.add_argument("--train-vocab", type=int, default=128000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eos", type=int, help="EOS id (default: the added token named like one)")
    args = ap.parse_args()
    device = torch.device(args.device)
    tok_path = args.tokenizer or trained_tokenizer(args.train_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(tok_path.read_text())
        eos = args.eos if args.eos is not None else _eos_id(tok_path)
        compiler = GrammarCompiler(tmp, args.vocab, eos)
        t0 = time.perf_counter()
        s = structured_from_json_schema(SCHEMA)
        compiler.compile(s)
        print(f"tokenizer {tok_path.name}, logits width {args.vocab}, EOS {eos}; tokenizer + "
              f"first compile {time.perf_counter() - t0:.2f} s")
        run(args, device, compiler, s, eos)


def run(args, device: torch.device, compiler: GrammarCompiler, s, eos: int) -> None:
    grammars = Grammars(compiler, device)
    sampler = Sampler()
    constrained = SamplingParams(max_tokens=4096, temperature=args.temperature, structured=s)
    free = SamplingParams(max_tokens=4096, temperature=args.temperature)
    reqs = [_Req(f"r{i}", constrained) for i in range(args.batch)]
    restarts = 0
    gen = torch.Generator(device=device).manual_seed(0)
    host, apply, masked, plain = [], [], [], []
    for step in range(args.steps + 10):
        logits = torch.randn(args.batch, args.vocab, device=device, generator=gen) * 4
        _sync(device)
        t0 = time.perf_counter()
        mask = grammars.bitmask(reqs, [0] * len(reqs))
        t_host = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_token_bitmask(logits, mask)
        _sync(device)
        t_apply = time.perf_counter() - t0
        t1 = time.perf_counter()
        tokens = sampler(logits, [constrained] * args.batch, [None] * args.batch, allowed=mask)
        tokens = tokens.tolist()  # the step's device-to-host copy: waits for the sampler
        t2 = time.perf_counter()
        sampler(logits, [free] * args.batch, [None] * args.batch).tolist()
        t3 = time.perf_counter()
        if step >= 10:  # warm-up: lazy lexer states, allocator, kernels
            host.append(t_host)
            apply.append(t_apply)
            masked.append(t2 - t1)
            plain.append(t3 - t2)
        for i, (req, token) in enumerate(zip(reqs, tokens, strict=True)):
            req.output_token_ids.append(token)
            if token == eos:
                grammars.forget([req.request_id])
                reqs[i] = _Req(f"r{i}-{step}", constrained)
                restarts += 1
    print(f"batch {args.batch} on {device}, {args.steps} steps, {restarts} outputs completed")
    print(f"  host mask (matchers + bitmask, H2D queued): {_stats(host)}")
    print(f"  device: mask applied to the logits:         {_stats(apply)}")
    print(f"  sampler with mask:                          {_stats(masked)}")
    print(f"  sampler without mask:                       {_stats(plain)}")
    added = statistics.fmean(host) + statistics.fmean(apply)
    print(f"  structured outputs add ~{added * 1e3:.2f} ms per decode step at batch "
          f"{args.batch} (host mask + device apply; compare with the step's ITL)")


if __name__ == "__main__":
    main()
