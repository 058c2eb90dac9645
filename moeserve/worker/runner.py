"""ModelRunner: the only code that touches the device. Builds a step's tensors, runs the
model, samples. Owns the model, the KV cache tensor and per-request sampling generators."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from moeserve.common.kv_budget import KvBudgetError, kv_cache_budget
from moeserve.common.memory_plan import engine_memory_report
from moeserve.common.model_config import ModelConfig
from moeserve.worker.config import EngineConfig
from moeserve.worker.cuda_graphs import DecodeGraphs
from moeserve.worker.grammar import GrammarCompiler, Grammars
from moeserve.worker.host_to_device import to_device
from moeserve.worker.logits_processors import gather_logprobs, penalty_inputs
from moeserve.worker.mixed_graphs import MixedGraphs
from moeserve.worker.model import AttentionMetadata, DeepseekForCausalLM
from moeserve.worker.model.forward_context import KernelBackend
from moeserve.worker.parallel.group import ParallelContext
from moeserve.worker.sampler import (
    SampledTokens,
    Sampler,
    advance_generator,
    feed_back,
    make_generator,
)
from moeserve.worker.scheduler import Scheduler, SchedulerOutput
from moeserve.worker.weights import load_checkpoint

__all__ = ["ModelRunner", "PendingSample", "cpu_threads", "resolve_device", "resolve_dtype",
           "resolve_quantization"]

logger = logging.getLogger(__name__)

# Prompt chunks a captured mixed step holds beside its decode rows (the step budget admits
# a few prompts a step at the sizes the graphs cover).
MIXED_GRAPH_PROMPTS = 4


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs have no fast bf16 matmul everywhere; float32 keeps CPU runs exact and quick.
        name = model_config.torch_dtype if device.type == "cuda" else "float32"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


def resolve_quantization(config: EngineConfig, model_config: ModelConfig,
                         device: torch.device) -> str:
    """"fp8" (weights stay fp8), "dequant" (an fp8 checkpoint dequantized at load) or "none"
    (not an fp8 checkpoint) for EngineConfig.quantization on this device."""
    if model_config.fp8_block_size is None:
        if config.quantization == "fp8":
            raise ValueError("quantization=fp8 needs an fp8 checkpoint; config.json of "
                             f"{config.model} has no quantization_config")
        return "none"
    if config.quantization == "auto":
        return "fp8" if device.type == "cuda" else "dequant"
    return config.quantization


def cpu_threads(configured: int) -> int:
    """Intra-op threads for a CPU engine. Default 1, not torch's one per core: serving runs
    several engine processes (prefill, decode, EP ranks) on the same cores, and torch's
    spinning worker threads collapse when oversubscribed (measured on 2 shared cores: 1.9
    tokens/s with the default against ~250 with one thread)."""
    if configured > 0:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def _prior_output(req) -> list[int]:
    """The prompt's tail that this request generated before it migrated here."""
    k = min(req.sampling_params.prior_output_tokens, req.num_prompt_tokens)
    return req.prompt_token_ids[req.num_prompt_tokens - k:] if k else []


@dataclass
class PendingSample:
    """A launched step whose sampling waits for the tokens of the step before it."""

    logits: torch.Tensor
    sample_reqs: list  # (request, ahead, row) as in ModelRunner.launch

    @property
    def rows(self) -> dict[str, int]:
        return {r.request_id: i for i, (r, _, _) in enumerate(self.sample_reqs)}


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 parallel: ParallelContext | None = None):
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(config.cpu_threads))
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        # Built directly in the serving dtype on the device: a float32 copy first would need
        # twice the weights' memory. Tensors created with an explicit dtype (RoPE tables, the
        # routing bias) stay float32.
        self.fp8 = resolve_quantization(config, model_config, self.device) == "fp8"
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = DeepseekForCausalLM(model_config, config.mla_impl, max_model_len,
                                                 fp8=self.fp8)
        finally:
            torch.set_default_dtype(default_dtype)
        self.expert_parallel = None
        if parallel is not None:  # before loading: this rank then reads only its experts
            from moeserve.worker.parallel.expert_parallel import ExpertParallel

            self.expert_parallel = ExpertParallel.attach(self.model, parallel, config,
                                                         self.device)
        load_checkpoint(self.model, config.model)
        if config.kernel_backend not in ("auto", "torch"):
            raise ValueError(f"kernel_backend must be auto or torch, got {config.kernel_backend!r}")
        # Every step runs on this backend (passed down each forward, never set on modules).
        self.backend: KernelBackend = ("triton" if config.kernel_backend == "auto"
                                       and self.device.type == "cuda" else "torch")
        if self.backend == "triton":
            self.model.fuse_weights()
        if model_config.fp8_block_size is not None:
            logger.info("fp8 checkpoint (%dx%d blocks): %s", *model_config.fp8_block_size,
                        self._fp8_paths())
        self.model.eval()
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        # [num_blocks, num_layers, block_size, kv_dim]: one block of every layer is one
        # contiguous byte range, so a KV transfer moves a block with one descriptor.
        self.kv_cache = torch.zeros(
            self.num_blocks, model_config.num_hidden_layers, self.block_size,
            model_config.kv_dim, dtype=self.dtype, device=self.device,
        )
        self._log_memory_plan(max_model_len)
        self.sampler = Sampler()
        # The last step's sampled tokens, by row, where the next step's inputs read them
        # when it was scheduled before they reached the host (Scheduler.schedule_ahead).
        self.last_sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64,
                                        device=self.device)
        self._generators: dict[str, torch.Generator] = {}
        # Structured outputs: per-request matchers and the step's token bitmask.
        self.grammars = Grammars(GrammarCompiler(config.model, model_config.vocab_size,
                                                 model_config.eos_token_id), self.device)
        # Not with expert parallelism: dispatch reads row counts back to the host every layer.
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager and parallel is None:
            self.graphs = self._capture_graphs(max_model_len)
            if config.mixed_cuda_graphs and self.backend == "triton":
                self.mixed_graphs = self._capture_mixed_graphs(max_model_len)

    def _log_memory_plan(self, max_model_len: int) -> None:
        """What this process holds, beside the plan's arithmetic (common/memory_plan.py)."""
        config = self.config
        held = [(str(t.dtype).removeprefix("torch."), t.nbytes) for t in self.model.parameters()]
        logger.info("%s", engine_memory_report(
            self.model_config, held, dtype=str(self.dtype).removeprefix("torch."),
            fp8_weights=any(kind == "float8_e4m3fn" for kind, _ in held), ep=config.ep,
            redundant_experts=config.eplb_redundant_experts, num_blocks=self.num_blocks,
            block_size=self.block_size, max_model_len=max_model_len,
            max_num_seqs=config.max_num_seqs, buffer_bytes=sum(
                b.nbytes for b in self.model.buffers()), gpu_free_total=torch.cuda.mem_get_info(
                self.device) if self.device.type == "cuda" else None))

    def _capture_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        config = self.config
        graphs = DecodeGraphs(
            self.model, self.kv_cache, self.last_sampled, self.block_size,
            max_batch=min(config.cuda_graph_max_batch, config.max_num_seqs),
            # the kernels read the block table directly; the torch path gathers a padded
            # context of this length every step, so it keeps a bound
            max_context=max_model_len if self.backend == "triton" else min(
                config.cuda_graph_max_context, max_model_len),
            backend=self.backend,
        )
        try:
            graphs.capture()
        except RuntimeError as e:  # an op of this model/dtype cannot be captured
            logger.warning("decode CUDA graphs disabled, running eagerly: %s", e,
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            return None
        return graphs

    def _capture_mixed_graphs(self, max_model_len: int) -> MixedGraphs | None:
        config = self.config
        graphs = MixedGraphs(
            self.model, self.kv_cache, self.last_sampled, self.block_size,
            max_decode_rows=min(config.cuda_graph_max_batch, config.max_num_seqs),
            max_prompt_tokens=min(config.mixed_graph_max_tokens, config.max_num_batched_tokens),
            max_prompt_seqs=MIXED_GRAPH_PROMPTS, max_context=max_model_len,
            backend=self.backend)
        try:
            graphs.capture()
        except RuntimeError as e:
            logger.warning("mixed-step CUDA graphs disabled, running eagerly: %s", e,
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            return None
        return graphs

    def _fp8_paths(self) -> str:
        """How the fp8 weights are computed, for the start-up log (the ops then record the
        path each call took: moeserve.kernels.last_path)."""
        if not self.fp8:
            return f"dequantized at load to {str(self.dtype).removeprefix('torch.')}"
        if self.backend == "torch":
            return "fp8 resident, W8A8 in plain torch"
        from moeserve.kernels import select_backend

        gemm = select_backend("fp8_gemm", self.device)
        moe = select_backend("fused_moe", self.device)
        return (f"fp8 resident, W8A8 GEMMs on {gemm.name} ({gemm.reason}), "
                f"fused MoE on {moe.name}")

    @property
    def bytes_per_block(self) -> int:
        c = self.model_config
        return c.num_hidden_layers * self.block_size * c.kv_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget()
        else:
            budget = int(self.config.kv_cache_memory_gb * (1 << 30))
        blocks = int(budget // self.bytes_per_block)
        if blocks < 2:
            raise KvBudgetError(f"no memory left for the KV cache ({budget / 2**20:.0f} MiB, "
                                f"2 blocks need {2 * self.bytes_per_block / 2**20:.0f} MiB)")
        return blocks

    def _gpu_kv_budget(self) -> int:
        """This process's share of the device (common/kv_budget.py): what other processes
        hold does not count against it, so workers sharing a GPU each get their fraction."""
        torch.cuda.empty_cache()  # load-time temporaries would otherwise count as held
        free, total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_reserved(self.device)
        util = self.config.gpu_memory_utilization
        budget = kv_cache_budget(util, total, held, free, min_bytes=2 * self.bytes_per_block)
        line = budget.describe(util, total, held, free)
        logger.log(logging.WARNING if budget.capped else logging.INFO, "%s", line)
        return budget.bytes

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> SampledTokens | PendingSample:
        """Queue one scheduled step on the device and return at once (on CUDA the host
        never waits here): its sampled tokens arrive in the returned handle, and stay on the
        device for a step scheduled ahead (``out.ahead_rows``) to read as its inputs."""
        self.forget(out.finished_req_ids)
        reqs = out.scheduled
        token_ids: list[int] = []
        context_lens, query_lens, tables = [], [], []
        sample_rows, sample_reqs = [], []
        for req in reqs:
            n = out.num_scheduled_tokens[req.request_id]
            start = req.num_computed_tokens
            row = out.ahead_rows.get(req.request_id)
            if row is None:
                token_ids.extend(req.all_token_ids[start : start + n])
                ahead = 0
            else:  # its input is being sampled by the step before: see feed_back
                token_ids.append(-1 - row)
                start += 1
                ahead = 1
            context_lens.append(start)
            query_lens.append(n)
            tables.append(req.block_ids)
            if Scheduler.needs_sampling(req, n):
                sample_rows.append(len(token_ids) - 1)
                sample_reqs.append((req, ahead, row))
        if self.expert_parallel is not None:
            from moeserve.worker.parallel.dbo import StepBatch, forward_step

            batch = StepBatch(token_ids, tables, context_lens, query_lens)
            hidden = forward_step(self.expert_parallel, self.model, self.kv_cache, batch,
                                  self.block_size, self.device, self.backend)
            if not sample_reqs:  # also an idle rank, which only relayed other ranks' tokens
                return SampledTokens([], None)
            rows = to_device(sample_rows, self.device, torch.int64)
            logits = self.model.compute_logits(hidden[rows])
        elif len(sample_reqs) == len(reqs) and self._decode_graph_fits(query_lens, context_lens):
            logits = self.graphs.run(token_ids, context_lens, tables)
        elif self.mixed_graphs is not None and self.mixed_graphs.fits(query_lens, context_lens):
            hidden = self.mixed_graphs.run(token_ids, context_lens, query_lens, tables,
                                           sample_rows)
            if not sample_reqs:  # prompt chunks only: their KV is written, nothing sampled
                return SampledTokens([], None)
            logits = self.model.compute_logits(hidden)
        else:
            meta, positions = AttentionMetadata.build(
                tables, context_lens, query_lens, self.block_size, self.device
            )
            input_ids = to_device(token_ids, self.device, torch.int64)
            if out.ahead_rows:
                input_ids = feed_back(input_ids, self.last_sampled)
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
            if not sample_reqs:
                return SampledTokens([], None)
            rows = to_device(sample_rows, self.device, torch.int64)
            logits = self.model.compute_logits(hidden[rows])
        if any(ahead and r.sampling_params.structured is not None for r, ahead, _ in sample_reqs):
            # A constrained row's mask needs the token the step before is sampling: the
            # forward is queued now, the sampling once that token is applied (sample_pending).
            return PendingSample(logits, sample_reqs)
        return self._sample(logits, sample_reqs)

    @torch.inference_mode()
    def sample_pending(self, pending: PendingSample) -> SampledTokens:
        """Sample a step whose forward ``launch`` queued, now that the tokens of the step
        before are on the requests (every row's inputs are then known on the host)."""
        return self._sample(pending.logits, [(r, 0, row) for r, _, row in pending.sample_reqs])

    def _sample(self, logits: torch.Tensor, sample_reqs: list) -> SampledTokens:
        params = [r.sampling_params for r, _, _ in sample_reqs]
        tokens = self.sampler(
            logits,
            params,
            [self._generator(r) for r, _, _ in sample_reqs],
            [r.tokens_to_suppress(ahead) for r, ahead, _ in sample_reqs],
            self._penalty_inputs(sample_reqs, params),
            allowed=self.grammars.bitmask([r for r, _, _ in sample_reqs],
                                          [ahead for _, ahead, _ in sample_reqs]),
        )
        top_k = [p.logprobs for p in params]
        logprobs = None
        if any(k is not None for k in top_k):
            logprobs = gather_logprobs(logits, tokens, max(k or 0 for k in top_k))
        self.last_sampled[: len(sample_reqs)].copy_(tokens)
        return SampledTokens([r.request_id for r, _, _ in sample_reqs], tokens, logprobs, top_k)

    def _penalty_inputs(self, sample_reqs: list, params: list):
        if not any(p.has_penalties for p in params):
            return None
        # A token still being sampled by the step before (scheduled ahead) is named by its
        # row there and read on the device (see feed_back).
        outputs = [_prior_output(r) + r.output_token_ids + ([-1 - row] if ahead else [])
                   for r, ahead, row in sample_reqs]
        return penalty_inputs(params, outputs, [r.prompt_token_ids for r, _, _ in sample_reqs],
                              self.model_config.vocab_size, self.device, self.last_sampled)

    def _decode_graph_fits(self, query_lens: list[int], context_lens: list[int]) -> bool:
        """A pure decode step (one new token per request) within the captured sizes."""
        return (
            self.graphs is not None
            and len(query_lens) == sum(query_lens)
            and self.graphs.can_run(len(query_lens), max(context_lens) + 1)
        )

    def forget(self, request_ids) -> None:
        """Drop per-request sampling state of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)
        self.grammars.forget(request_ids)

    def _generator(self, req) -> torch.Generator | None:
        seed = req.sampling_params.seed
        if seed is None or req.sampling_params.greedy:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = self._generators[req.request_id] = make_generator(seed, self.device)
            # Tokens sampled before this worker saw the request (on a prefill worker, or on
            # the worker it migrated from) used the start of the stream; continue after them.
            advance_generator(gen, self.model_config.vocab_size,
                              req.num_output_tokens + req.sampling_params.prior_output_tokens)
        return gen
