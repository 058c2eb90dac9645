"""Warm-up before ready: dummy requests through the real engine path, so that every kernel
specialization, lazily loaded module and captured graph the configured limits can reach has
run before the worker reports SERVING, and the first requests run at steady-state speed.

What a request can make the device compile or load for the first time, and what covers it:

- prefill steps of every token-count class: Triton specializes integer arguments on == 1 and
  on divisibility by 16, and the fused MoE picks its tiles by tokens per expert
  (kernels/moe_config.py), and prefill-sized steps move the shared experts out of the grouped
  kernel (moe.py: SHARED_APART_MIN_TOKENS, 1024), so single-request prefills of 2**k - 16,
  2**k - 1, 2**k and 2**k + 1 tokens up to the step budget (--max-num-batched-tokens) cover
  every (tile, divisibility) pair on both sides of each power-of-two threshold (the H200
  sweep compiled fused_moe after ready for 529..1023-token steps when only 2**k and 2**k + 1
  ran);
- chunked prefill: prompts longer than the step budget, so chunks (of a length divisible by 16
  and of one that is not) run over earlier context;
- the decode batch ladder: ``n`` requests (``n`` = --max-num-seqs) finishing one a step, so
  decode steps of every batch size n..1 run (each CUDA-graph size replays, the eager sizes
  beyond the graph ladder run) with the sampler on every batch size;
- several prompts prefilled in one step (2, 4 and 8 sharing the step budget, lengths not
  divisible by 16), as a loaded server runs them: other batch shapes, block-table widths
  and tokens-per-expert counts than any prompt alone;
- mixed steps: a short prompt admitted while the ladder decodes, then one of 16 KV blocks
  (block tables 16 wide: the absorbed prefill kernel specializes their stride on divisibility
  by 16, which only steps beside long contexts reach);
- sampling variants (greedy, temperature, top-p, top-k, seeded, suppressed stop tokens and,
  where the engine has them, penalties, logit bias, min-p, logprobs) spread over the above, in
  batches alone and mixed.

On the CPU (no Triton kernels, no CUDA graphs) nothing compiles, so the warm-up only runs
each path once at small sizes (tests start many workers; this keeps start-up unchanged).
Compilations that happen anyway after ready are counted: worker/compile_watch.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from moeserve.common.sampling import SamplingParams
from moeserve.worker.compile_watch import WATCH

__all__ = ["WarmupPlan", "build_engine", "build_ready_engine", "plan_warmup", "run_warmup",
           "sampling_variants", "warm_up"]

logger = logging.getLogger(__name__)

# The CPU plan: a short prompt, a decode batch of every sampling variant, one mixed step.
_CPU_PROMPT = 8
_CPU_MIXED = 4


@dataclass(frozen=True)
class WarmupPlan:
    prefill_lengths: tuple[int, ...]  # each prompt alone in its step
    chunked_prompt: int  # 0: none (the step budget covers max_model_len); run as n and n + 1
    decode_batch: int  # requests of the ladder
    mixed_prompt: int  # a prompt admitted beside the ladder's decodes
    mixed_long: int = 0  # then one of this length (16 KV blocks), a step later; 0: none
    stagger: bool = True  # ladder request i generates i + 2 tokens (else all generate 2)
    batched: tuple[tuple[int, ...], ...] = ()  # each: the prompt lengths of one step

    @property
    def num_requests(self) -> int:
        return (len(self.prefill_lengths) + 2 * bool(self.chunked_prompt) + self.decode_batch
                + 1 + bool(self.mixed_long) + sum(len(b) for b in self.batched))


def _prefill_lengths(cap: int) -> tuple[int, ...]:
    lengths = {cap}
    p = 1
    while p <= cap:
        lengths.add(p)
        if p >= 16 and p + 1 <= cap:  # the same tile, not divisible by 16
            lengths.add(p + 1)
        if p >= 32:  # just below a threshold at p: divisible by 16 and not
            lengths.update((p - 16, p - 1))
        p *= 2
    return tuple(sorted(lengths))


def _ladder_blocks(n: int, block_size: int) -> int:
    """KV blocks of a ladder of n one-token prompts, request i generating i + 2 tokens."""
    return sum(-(-(i + 3) // block_size) for i in range(n))


def plan_warmup(*, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                block_size: int, num_blocks: int, full: bool) -> WarmupPlan:
    """What to run, from the configured limits. ``full``: the device compiles or captures
    (CUDA); otherwise the small CPU plan. Lengths are capped by the KV blocks there are (one
    block stays reserved as the graphs' padding block)."""
    usable_tokens = max(1, (num_blocks - 1) * block_size - 2)
    longest = max(1, min(max_model_len - 2, usable_tokens))
    budget = min(max_num_batched_tokens, longest)
    variants = len(sampling_variants(0))
    if not full:
        n = max(1, min(max_num_seqs, variants))
        while n > 1 and _ladder_blocks(n, block_size) + 1 > num_blocks - 1:
            n -= 1
        return WarmupPlan((min(_CPU_PROMPT, budget),), 0, n, min(_CPU_MIXED, budget),
                          stagger=False)
    # n and n + 1: the chunk over earlier context both divisible by 16 and not
    chunked = min(longest - 1, max_num_batched_tokens + max_num_batched_tokens // 2)
    n = max_num_seqs
    mixed = max(1, min(budget - n, 256))
    long = 16 * block_size - 3  # with its 2 tokens: 16 blocks
    if long > budget - n or long + 2 > longest:
        long = 0
    while n > 1 and _ladder_blocks(n, block_size) + -(-(mixed + 2) // block_size) + (
            -(-(long + 2) // block_size)) > num_blocks - 1:  # fmt: skip
        n -= 1
    batched = tuple((budget // k - 3,) * k for k in (2, 4, 8) if budget // k > 16)
    batched += _multi_prompt_steps(max_num_batched_tokens, longest, block_size, num_blocks)
    return WarmupPlan(_prefill_lengths(budget), chunked if chunked > budget else 0, n, mixed,
                      mixed_long=long, batched=batched)


def _multi_prompt_steps(step_budget: int, longest: int, block_size: int,
                        num_blocks: int) -> tuple[tuple[int, ...], ...]:
    """Steps of every size class above the longest prompt, up to the step budget: several
    prompts fill a step that no single one can (max_model_len below the budget), and each
    class of step size picks its own MoE tiles (the H200 compiled fused-MoE variants after
    ready for 8k-token steps of 1k prompts without these). Sizes whose prompts would not fit
    the KV pool are left out."""
    steps = []
    for total in _prefill_lengths(step_budget):
        if total <= longest:
            continue
        k = -(-total // longest)
        lengths = tuple(total // k + (i < total % k) for i in range(k))
        if sum(-(-(n + 1) // block_size) for n in lengths) <= num_blocks - 1:
            steps.append(lengths)
    return tuple(steps)


def sampling_variants(eos_token_id: int | None) -> list[SamplingParams]:
    """One SamplingParams per sampler path (max_tokens is set per request)."""
    stop = () if eos_token_id is None else (eos_token_id,)
    variants = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=0.8, top_p=0.8, top_k=40, seed=1),
        SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=stop),
    ]
    # Processors newer engines have (OpenAI's parameters): each its own path in the sampler.
    have = {f.name for f in dataclasses.fields(SamplingParams)}
    extra = {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
             "logit_bias": {0: 1.0}, "min_p": 0.05, "logprobs": 2}
    for name, value in extra.items():
        if name in have:
            variants.append(SamplingParams(temperature=0.8, **{name: value}))
    return variants


class _Driver:
    """Adds warm-up requests and steps the engine exactly as the serving loop does."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.variants = sampling_variants(engine.model_config.eos_token_id)
        self.rng = np.random.default_rng(0)
        self.vocab = engine.model_config.vocab_size
        self.count = 0
        self.steps = 0

    def add(self, prompt_len: int, max_tokens: int) -> None:
        # Random tokens: no prompt hits another's cached prefix, so each computes its length.
        prompt = self.rng.integers(0, self.vocab, prompt_len).tolist()
        params = dataclasses.replace(self.variants[self.count % len(self.variants)],
                                     max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(f"warmup-{self.count}", prompt, params)
        self.count += 1

    def step(self) -> None:
        self.engine.step()
        self.steps += 1

    def drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.step()


def run_warmup(engine, plan: WarmupPlan) -> tuple[int, int]:
    """Run ``plan`` on ``engine``; then forget it ran (prefix cache, KV events, counters).
    Returns (requests, steps)."""
    d = _Driver(engine)
    for length in plan.prefill_lengths:
        d.add(length, 1)
        d.drain()
    for length in (plan.chunked_prompt, plan.chunked_prompt + 1) if plan.chunked_prompt else ():
        d.add(length, 1)
        d.drain()
    for lengths in plan.batched:
        for length in lengths:
            d.add(length, 1)
        d.drain()
    for i in range(plan.decode_batch):
        d.add(1, min(i + 2 if plan.stagger else 2, engine.max_model_len - 1))
    d.step()  # the ladder's prompts; the next steps decode
    d.add(plan.mixed_prompt, 2)
    if plan.mixed_long:
        d.step()
        d.add(plan.mixed_long, 2)
    d.drain()
    _forget(engine)
    return d.count, d.steps


def _forget(engine) -> None:
    """Serving starts from a clean slate: no dummy prefix is offered to a router's prefix index
    or counted in the worker's metrics."""
    engine.kv_manager.reset_prefix_cache()
    engine.take_kv_events()
    for name in ("_prefix_queries", "_prefix_hits", "_prompt_computed", "_generated",
                 "_preemptions"):
        setattr(engine, name, 0)


def build_engine(config):
    """The engine a worker serves, built (model, weights, KV cache, CUDA graphs) and timed; warm
    it up with :func:`warm_up` in the thread that will step it."""
    from moeserve.worker.engine import LLMEngine

    start = time.perf_counter()
    engine = LLMEngine(config)
    runner = engine.runner
    if runner.backend == "triton":
        WATCH.install()
    capture = runner.graphs.capture_s if runner.graphs is not None else 0.0
    WATCH.startup_seconds.update(load=time.perf_counter() - start - capture, capture=capture)
    return engine


def warm_up(engine) -> None:
    """Run the warm-up plan of ``engine``'s limits, then mark the process ready for the
    compilation count and log the start-up split.

    Call it from the thread that steps the engine when serving (the server runs it as the
    engine loop's first command): some state is per thread, e.g. glibc's malloc arenas (the
    CPU's first large activations) and PyTorch's cuBLAS handles and workspaces."""
    config, runner = engine.config, engine.runner
    start = time.perf_counter()
    requests = steps = 0
    if not config.warmup:
        logger.warning("warm-up off (--no-warmup): the first requests pay for compilations")
    elif engine.parallel is not None:
        # EP ranks step in lockstep through collectives; a warm-up of its own on each rank is
        # not yet shown to keep them in step.
        logger.info("warm-up skipped with expert parallelism")
    else:
        plan = plan_warmup(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs, max_model_len=engine.max_model_len,
            block_size=config.block_size, num_blocks=runner.num_blocks,
            full=runner.device.type == "cuda")
        try:
            requests, steps = run_warmup(engine, plan)
        except Exception as e:  # a path that fails here fails requests the same way
            raise RuntimeError(f"warm-up failed on {plan}: {type(e).__name__}: {e}") from e
        # ~1 s at a 128k vocabulary, otherwise paid by the first structured request.
        runner.grammars.compiler.prepare()
    t = WATCH.startup_seconds
    t["warmup"] = time.perf_counter() - start
    WATCH.mark_ready()
    logger.info("start-up %.1f s: load %.1f s, CUDA graph capture %.1f s, warm-up %.1f s "
                "(%d requests, %d steps); compilations before ready: %s", sum(t.values()),
                t.get("load", 0.0), t.get("capture", 0.0), t["warmup"], requests, steps,
                dict(WATCH.before_ready) or "none counted")


def build_ready_engine(config):
    """:func:`build_engine` then :func:`warm_up`, in this thread (tests, tools)."""
    engine = build_engine(config)
    warm_up(engine)
    return engine
