"""EngineConfig: the one place engine defaults live; CLI flags are derived from its fields."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["EngineConfig", "default_model_id", "GPU_STEP_BUDGET", "CPU_STEP_BUDGET"]

GPU_STEP_BUDGET = 8192
CPU_STEP_BUDGET = 2048


def default_model_id(model_dir: str) -> str:
    """The model id used in block hashes and /v1/models: the checkpoint directory's name."""
    return Path(model_dir).resolve().name


@dataclass
class EngineConfig:
    """How one engine runs. Field docs below double as CLI help."""

    model: str
    """checkpoint directory (config.json, safetensors, tokenizer files)"""
    model_id: str = ""
    """id hashed into prefix-cache keys and shown by /v1/models (default: directory name)"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)"""
    dtype: str = "auto"
    """float32, bfloat16, float16 or auto (checkpoint dtype on GPU, float32 on CPU)"""
    block_size: int = 64
    """tokens per KV cache block (the block-hash granularity)"""
    num_kv_blocks: int = 0
    """KV cache blocks (0: sized from kv_cache_memory_gb / gpu_memory_utilization)"""
    kv_cache_memory_gb: float = 1.0
    """KV cache size on the CPU when num_kv_blocks is 0"""
    gpu_memory_utilization: float = 0.9
    """fraction of GPU memory the engine may use (weights + KV) when num_kv_blocks is 0"""
    max_model_len: int = 0
    """longest prompt + output in tokens (0: max_position_embeddings, at most 32768)"""
    max_num_seqs: int = 256
    """most requests in one batch"""
    max_num_batched_tokens: int = 0
    """token budget of one step (chunked prefill splits longer prompts); 0: 8192 on a GPU,
    2048 on the CPU (see docs/performance.md, "GPU defaults")"""
    enable_prefix_caching: bool = True
    """reuse KV of identical prompt prefixes"""
    enforce_eager: bool = False
    """run every step eagerly: no CUDA graphs for decode steps"""
    async_scheduling: str = "auto"
    """on, off or auto (on with CUDA and no expert parallelism): schedule and launch decode
    step N+1 while step N runs, so the device never waits for the host between steps"""
    cuda_graph_max_batch: int = 256
    """largest decode batch run as a CUDA graph (capped at max_num_seqs)"""
    cuda_graph_max_context: int = 4096
    """longest sequence a torch-path decode CUDA graph serves (kernel path: max_model_len)"""
    mixed_cuda_graphs: bool = False
    """also capture mixed steps (decode rows beside up to 4 prompt chunks) as CUDA graphs, on a
    grid of decode-row and prompt-token sizes (worker/mixed_graphs.py); experimental: off
    until measured against eager mixed steps on a GPU"""
    mixed_graph_max_tokens: int = 2048
    """largest prompt-token size of a captured mixed step (capped at the step budget)"""
    warmup: bool = True
    """a serving worker runs dummy requests over every shape its limits allow (prefill sizes,
    the decode batch ladder, sampling variants) before it reports ready, so no request waits
    for a kernel compilation (worker/warmup.py)"""
    cpu_threads: int = 0
    """intra-op threads on the CPU (0: OMP_NUM_THREADS if set, else 1; see runner.py)"""
    kernel_backend: str = "auto"
    """auto: Triton / FlashInfer / DeepGEMM kernels on CUDA; torch: the plain-torch path"""
    quantization: str = "auto"
    """how an fp8 checkpoint is served: fp8 (weights stay e4m3 with their block scales,
    block-scaled W8A8 GEMMs; on the CPU the same math in plain torch), dequant (weights
    dequantized at load to --dtype: the exact path) or auto (fp8 on CUDA, dequant on the CPU)"""
    mla_impl: str = "absorbed"
    """absorbed (latent attention, serving path) or naive (expanded K/V, the test oracle)"""
    dp: int = 1
    """attention data-parallel ranks, each with its own requests and KV cache (= ep)"""
    ep: int = 1
    """expert-parallel ranks the routed experts are spread over (one process per rank)"""
    a2a_backend: str = "torch"
    """expert dispatch/combine: torch (gloo/NCCL all-to-all), deepep or nixl_ep"""
    enable_eplb: bool = False
    """rebalance experts across EP ranks from observed load, at run time"""
    eplb_window: int = 1000
    """steps of expert load the rebalancer looks back over"""
    eplb_interval: int = 3000
    """steps between two rebalancings"""
    eplb_redundant_experts: int = 0
    """extra physical expert slots (replicas of hot experts); (experts + this) % ep == 0"""
    enable_dbo: bool = False
    """dual-batch overlap: two micro-batches, one's all-to-all hidden behind the other's compute"""
    dbo_token_threshold: int = 128
    """DBO stays off for steps whose largest rank batch has fewer tokens than this"""
    dist_timeout_s: float = 60.0
    """a collective that waits this long on a silent peer fails the EP group"""

    def step_budget(self, device_type: str) -> int:
        """max_num_batched_tokens, its 0 resolved for ``device_type`` ("cuda" or "cpu"): on the
        H200 256 prompts of 1000 tokens ran at 1202 output tok/s with 2048 tokens a step and
        3028 with 8192 (issue 21); on the CPU a step's cost grows with its tokens, and a
        smaller budget keeps decode steps short beside prefills."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return GPU_STEP_BUDGET if device_type == "cuda" else CPU_STEP_BUDGET

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 0:
            raise ValueError("max_num_batched_tokens must be >= 0 (0: the device's default), "
                             f"got {self.max_num_batched_tokens}")
        if not self.model_id:
            self.model_id = default_model_id(self.model)
        if self.ep < 1 or self.dp < 1:
            raise ValueError(f"dp and ep must be >= 1, got dp={self.dp} ep={self.ep}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(
                f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.async_scheduling == "on" and self.ep > 1:
            # EP ranks step in lockstep through collectives; a step ahead would break it.
            raise ValueError("async_scheduling=on does not work with expert parallelism (ep > 1)")
        if self.quantization not in ("auto", "fp8", "dequant"):
            raise ValueError(
                f"quantization must be auto, fp8 or dequant, got {self.quantization!r}")
        if self.mixed_graph_max_tokens < 128:
            raise ValueError("mixed_graph_max_tokens must be >= 128, got "
                             f"{self.mixed_graph_max_tokens}")
        if self.dp != self.ep:
            # Attention ranks and expert ranks are the same processes (no tensor parallelism).
            raise ValueError(f"dp must equal ep, got dp={self.dp} ep={self.ep}")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Help text per field, read from the attribute docstrings above."""
        import ast
        import inspect

        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        docs: dict[str, str] = {}
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = str(nxt.value.value)
        return {f.name: docs.get(f.name, "") for f in fields(cls)}
