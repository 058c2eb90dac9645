"""Memory plan: what one GPU holds for a DeepSeek model under a parallel layout.

Pure arithmetic over config.json fields (no torch: the operator imports this). The layout is
the engine's (moeserve/worker): every rank is one attention-DP rank holding the whole attention,
dense MLPs, shared experts, router gates, norms, embedding and lm_head (no tensor parallelism),
plus its slice of the routed experts, ``(n_routed_experts + redundant) / ep`` per MoE layer
(expert_parallel.py; with ep 1 no expert parallelism runs and redundant slots do not exist).

fp8 checkpoints keep their 2-D linear weights in e4m3 with one float32 scale per block; the
embedding, lm_head and norms stay in the serving dtype and the router gate in float32
(moe.Gate). The KV cache holds one latent vector per token and layer, ``kv_lora_rank +
qk_rope_head_dim`` values in the serving dtype.

On a GPU the engine sizes its KV cache as its own share of the device (kv_budget.py):
``kv = util * total - runtime - weights``, what other processes hold aside (workers sharing a
GPU each take their fraction); the ``(1 - util)`` share stays free for activations, CUDA graphs
and communication buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from moeserve.common.model_config import ModelConfig

__all__ = ["GIB", "DTYPE_BYTES", "RUNTIME_RESERVE_BYTES", "MAX_MODEL_LEN_DEFAULT_CAP",
           "PlanError", "Tensor", "EngineSettings", "MemoryPlan", "model_tensors",
           "checkpoint_bytes", "resident_bytes", "kv_bytes_per_token", "plan_memory",
           "default_max_model_len", "batch_at_length", "gib", "routed_slots",
           "engine_memory_report"]

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
FP8 = "float8_e4m3fn"
# Device memory a rank uses outside torch's tensors when the engine sizes its KV cache (CUDA
# context, cuBLAS and NCCL workspaces): ~0.5 GiB measured on an H200 (docs/memory.md), rounded
# up to leave room for the all-to-all's communicators.
RUNTIME_RESERVE_BYTES = 1 * GIB
MAX_MODEL_LEN_DEFAULT_CAP = 32768  # the engine's cap on max_position_embeddings (engine.py)


class PlanError(ValueError):
    """Plan inputs that cannot describe a deployment; the message names the input."""


@dataclass(frozen=True)
class Tensor:
    """``count`` tensors of one shape. ``routed``: a routed expert's (split over EP ranks);
    ``fp8``: stored e4m3 with block scales in an fp8 checkpoint; ``dequantized``: held in the
    serving dtype even when the engine keeps fp8 weights; ``float32``: held in float32
    whatever the serving dtype (router gate); ``stored_float32``: also written in float32 by
    a checkpoint whatever its dtype (the noaux_tc router's bias, as DeepSeek-V3 ships it)."""

    group: str
    shape: tuple[int, ...]
    count: int = 1
    routed: bool = False
    fp8: bool = False
    dequantized: bool = False
    float32: bool = False
    stored_float32: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count

    def scale_numel(self, block: tuple[int, int]) -> int:
        rows, cols = self.shape
        return -(-rows // block[0]) * -(-cols // block[1]) * self.count


def model_tensors(c: ModelConfig) -> list[Tensor]:
    """Every weight of the checkpoint the engine loads (the MTP layer is not), grouped."""
    h, nh = c.hidden_size, c.num_attention_heads
    out = [Tensor("embedding", (c.vocab_size, h)), Tensor("norms", (h,))]
    if not c.tie_word_embeddings:
        out.append(Tensor("lm_head", (c.vocab_size, h)))
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    dense_layers = c.num_hidden_layers - moe_layers
    n = c.num_hidden_layers

    def linear(group: str, rows: int, cols: int, count: int, routed: bool = False,
               dequantized: bool = False) -> None:
        out.append(Tensor(group, (rows, cols), count, routed, fp8=True, dequantized=dequantized))

    out.append(Tensor("norms", (h,), 2 * n))  # input and post-attention RMSNorms
    if c.q_lora_rank is None:
        linear("attention", nh * c.qk_head_dim, h, n)
    else:
        linear("attention", c.q_lora_rank, h, n)
        out.append(Tensor("norms", (c.q_lora_rank,), n))
        linear("attention", nh * c.qk_head_dim, c.q_lora_rank, n)
    linear("attention", c.kv_dim, h, n)
    out.append(Tensor("norms", (c.kv_lora_rank,), n))
    # kv_b_proj is dequantized at load: absorbed MLA splits it per head (mla.py)
    linear("attention", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, n,
           dequantized=True)
    linear("attention", h, nh * c.v_head_dim, n)
    if c.attention_bias:
        out.append(Tensor("attention", ((c.q_lora_rank or nh * c.qk_head_dim)
                                        + c.kv_dim + h,), n))
    for _ in range(2):
        linear("dense MLP", c.intermediate_size, h, dense_layers)
    linear("dense MLP", h, c.intermediate_size, dense_layers)
    if moe_layers:
        experts, inter = c.n_routed_experts or 0, c.moe_intermediate_size
        # Stacked [gate; up] experts stay fp8 only when no scale row straddles both (moe.py).
        straddles = c.fp8_block_size is not None and inter % c.fp8_block_size[0] != 0
        out.append(Tensor("router gate", (experts, h), moe_layers, float32=True))
        if c.topk_method == "noaux_tc":
            out.append(Tensor("router gate", (experts,), moe_layers, float32=True,
                              stored_float32=True))
        for rows, cols in ((inter, h), (inter, h), (h, inter)):
            linear("routed experts", rows, cols, experts * moe_layers, True, straddles)
        if c.n_shared_experts:
            shared = inter * c.n_shared_experts
            for _ in range(2):
                linear("shared experts", shared, h, moe_layers)
            linear("shared experts", h, shared, moe_layers)
    return [t for t in out if t.count]


def checkpoint_bytes(c: ModelConfig) -> dict[str, int]:
    """Bytes per dtype of the checkpoint's tensors, as `moeserve make-checkpoint` writes them:
    fp8 weights and float32 scales for an fp8 config, the router's bias in float32, everything
    else in ``torch_dtype``."""
    out: dict[str, int] = {}
    dtype = _dtype(c.torch_dtype, "config.json torch_dtype")
    for t in model_tensors(c):
        if t.fp8 and c.fp8_block_size:
            _add(out, FP8, t.numel)
            _add(out, "float32", 4 * t.scale_numel(c.fp8_block_size))
        elif t.stored_float32:
            _add(out, "float32", 4 * t.numel)
        else:
            _add(out, dtype, t.numel * DTYPE_BYTES[dtype])
    return out


def routed_slots(c: ModelConfig, ep: int, redundant_experts: int = 0) -> int:
    """Routed experts one rank holds per MoE layer."""
    experts = c.n_routed_experts or 0
    if ep < 1 or redundant_experts < 0:
        raise PlanError(f"ep must be >= 1 and redundant experts >= 0, got ep={ep}, "
                        f"redundant={redundant_experts}")
    if ep == 1:
        return experts
    if (experts + redundant_experts) % ep:
        raise PlanError(f"ep ({ep}) must divide n_routed_experts + redundant experts "
                        f"({experts} + {redundant_experts})")
    return (experts + redundant_experts) // ep


def resident_bytes(c: ModelConfig, dtype: str, ep: int = 1, redundant_experts: int = 0,
                   fp8_weights: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes per dtype, bytes per group) one rank holds. ``fp8_weights`` False: an fp8
    checkpoint dequantized at load (every weight in ``dtype``)."""
    dtype = _dtype(dtype, "dtype")
    experts = c.n_routed_experts or 0
    share = routed_slots(c, ep, redundant_experts) / experts if experts else 0.0
    by_dtype: dict[str, int] = {}
    by_group: dict[str, int] = {}
    block = c.fp8_block_size if fp8_weights else None
    for t in model_tensors(c):
        part = share if t.routed else 1.0
        parts: list[tuple[str, int]]
        if t.fp8 and block and not t.dequantized:
            parts = [(FP8, t.numel), ("float32", 4 * t.scale_numel(block))]
        elif t.float32:
            parts = [("float32", 4 * t.numel)]
        else:
            parts = [(dtype, DTYPE_BYTES[dtype] * t.numel)]
        for kind, nbytes in parts:
            nbytes = round(nbytes * part)
            _add(by_dtype, kind, nbytes)
            _add(by_group, t.group, nbytes)
    return by_dtype, by_group


def kv_bytes_per_token(c: ModelConfig, dtype: str) -> int:
    """One token's latent cache over every layer: (kv_lora_rank + qk_rope_head_dim) values."""
    return c.kv_dim * c.num_hidden_layers * DTYPE_BYTES[_dtype(dtype, "dtype")]


def default_max_model_len(c: ModelConfig, configured: int = 0) -> int:
    length = configured or min(c.max_position_embeddings, MAX_MODEL_LEN_DEFAULT_CAP)
    if length > c.max_position_embeddings:
        raise PlanError(f"max-model-len {length} exceeds the model's max_position_embeddings "
                        f"({c.max_position_embeddings})")
    return length


def batch_at_length(num_blocks: int, block_size: int, length: int) -> int:
    """Sequences of ``length`` tokens the cache holds at once (block 0 is reserved)."""
    return max(num_blocks - 1, 0) // -(-length // block_size)


@dataclass(frozen=True)
class EngineSettings:
    """The engine flags the plan depends on (moeserve/worker/config.py), resolved: ``dtype``
    is the serving dtype (the engine's ``auto`` is the checkpoint's dtype on a GPU and
    float32 on the CPU)."""

    dtype: str = "bfloat16"
    fp8_weights: bool = True
    block_size: int = 64
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 0
    max_num_seqs: int = 256
    num_kv_blocks: int = 0
    kv_cache_memory_gb: float = 1.0

    def __post_init__(self) -> None:
        _dtype(self.dtype, "dtype")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise PlanError("gpu-memory-utilization must be in (0, 1], got "
                            f"{self.gpu_memory_utilization}")
        for name in ("block_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, name)}")
        if self.max_model_len < 0 or self.num_kv_blocks < 0 or self.kv_cache_memory_gb <= 0:
            raise PlanError("max-model-len and num-kv-blocks must be >= 0 and "
                            "kv-cache-memory-gb > 0")


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's memory. ``gpu_bytes`` None: a CPU rank (KV from kv_cache_memory_gb)."""

    ep: int
    experts_per_rank: int
    weights_by_dtype: dict[str, int]
    weights_by_group: dict[str, int]
    kv_bytes_per_token: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    gpu_bytes: int | None
    utilization: float
    runtime_bytes: int
    kv_cache_bytes: int
    kv_blocks: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights_by_dtype.values())

    @property
    def usable_bytes(self) -> int | None:
        """What weights and KV cache may take: util * HBM less the runtime reserve."""
        if self.gpu_bytes is None:
            return None
        return int(self.utilization * self.gpu_bytes) - self.runtime_bytes

    @property
    def workspace_bytes(self) -> int | None:
        """Left free for activations, CUDA graphs and communication buffers."""
        return None if self.gpu_bytes is None else self.gpu_bytes - int(
            self.utilization * self.gpu_bytes)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_blocks - 1, 0) * self.block_size

    @property
    def batch_at_max_len(self) -> int:
        return batch_at_length(self.kv_blocks, self.block_size, self.max_model_len)

    def summary(self) -> str:
        """One line: the numbers a refusal or a start-up log names."""
        if not self.fits:
            return "; ".join(self.problems)
        text = (f"weights {gib(self.weight_bytes)} per GPU ({_by_dtype(self.weights_by_dtype)}),"
                f" KV cache {gib(self.kv_cache_bytes)} = {self.kv_blocks} blocks of "
                f"{self.block_size} tokens ({self.kv_bytes_per_token} B/token), "
                f"{self.batch_at_max_len} sequences of {self.max_model_len} tokens")
        if self.usable_bytes is not None:
            text += f"; usable {gib(self.usable_bytes)} of {gib(self.gpu_bytes or 0)}"
        return text


def plan_memory(c: ModelConfig, settings: EngineSettings, *, ep: int = 1,
                redundant_experts: int = 0, gpu_bytes: int | None = None,
                runtime_bytes: int = RUNTIME_RESERVE_BYTES) -> MemoryPlan:
    """The plan of one rank. Raises PlanError for inputs that describe no deployment; a
    deployment that does not fit comes back with ``problems`` naming the numbers."""
    if gpu_bytes is not None and gpu_bytes <= 0:
        raise PlanError(f"GPU memory must be positive, got {gpu_bytes} bytes")
    by_dtype, by_group = resident_bytes(c, settings.dtype, ep, redundant_experts,
                                        settings.fp8_weights)
    weights = sum(by_dtype.values())
    per_token = kv_bytes_per_token(c, settings.dtype)
    per_block = per_token * settings.block_size
    length = default_max_model_len(c, settings.max_model_len)
    problems: list[str] = []
    notes: list[str] = []
    if gpu_bytes is None:
        kv = settings.kv_cache_memory_gb * GIB
        runtime_bytes = 0
    else:
        usable = int(settings.gpu_memory_utilization * gpu_bytes) - runtime_bytes
        kv = usable - weights
        where = (f"{gib(usable)} usable ({settings.gpu_memory_utilization:g} of "
                 f"{gib(gpu_bytes)} less {gib(runtime_bytes)} runtime)")
        if weights > usable:
            problems.append(f"weights {gib(weights)} per GPU > {where}")
        elif settings.num_kv_blocks and settings.num_kv_blocks * per_block > kv:
            problems.append(f"num-kv-blocks {settings.num_kv_blocks} need "
                            f"{gib(settings.num_kv_blocks * per_block)} but weights "
                            f"{gib(weights)} leave {gib(kv)} of {where}")
        elif kv < 2 * per_block:
            problems.append(f"weights {gib(weights)} per GPU leave {gib(kv)} of {where} for "
                            f"the KV cache, less than 2 blocks of {gib(per_block)}")
    if settings.num_kv_blocks:
        kv = settings.num_kv_blocks * per_block
    blocks = max(int(kv // per_block), 0)
    if not problems and batch_at_length(blocks, settings.block_size, length) == 0:
        notes.append(f"the KV cache holds {(blocks - 1) * settings.block_size} tokens, fewer "
                     f"than max-model-len {length}: the engine caps max-model-len there")
    return MemoryPlan(
        ep=ep, experts_per_rank=routed_slots(c, ep, redundant_experts),
        weights_by_dtype=by_dtype, weights_by_group=by_group, kv_bytes_per_token=per_token,
        block_size=settings.block_size, max_model_len=length,
        max_num_seqs=settings.max_num_seqs, gpu_bytes=gpu_bytes,
        utilization=settings.gpu_memory_utilization, runtime_bytes=runtime_bytes,
        kv_cache_bytes=int(kv), kv_blocks=blocks, problems=problems, notes=notes,
    )


def gib(nbytes: float) -> str:
    """Bytes for people: GiB, or MiB / KiB below one."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= size or unit == "KiB":
            return f"{nbytes / size:.2f} {unit}"
    raise AssertionError("unreachable")


def _by_dtype(by_dtype: dict[str, int]) -> str:
    return ", ".join(f"{k} {gib(v)}" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1]))


def _dtype(name: str, what: str) -> str:
    if name not in DTYPE_BYTES or name == FP8:
        raise PlanError(f"{what} must be one of float32, bfloat16, float16, got {name!r}")
    return name


def _add(acc: dict[str, int], key: str, value: int) -> None:
    acc[key] = acc.get(key, 0) + value


def engine_memory_report(c: ModelConfig, held: Iterable[tuple[str, int]], *, dtype: str,
                         fp8_weights: bool, ep: int, redundant_experts: int, num_blocks: int,
                         block_size: int, max_model_len: int, max_num_seqs: int,
                         buffer_bytes: int = 0,
                         gpu_free_total: tuple[int, int] | None = None) -> str:
    """The engine's start-up line: what this rank holds, measured (``held``: (dtype, bytes) of
    every parameter; ``buffer_bytes``: RoPE tables and the like), beside what the plan
    predicts for its weights."""
    measured: dict[str, int] = {}
    for kind, nbytes in held:
        _add(measured, kind, nbytes)
    try:
        planned = gib(sum(resident_bytes(c, dtype, ep, redundant_experts, fp8_weights)[0]
                          .values()))
    except PlanError as exc:
        planned = f"none: {exc}"
    per_token = kv_bytes_per_token(c, dtype)
    batch = batch_at_length(num_blocks, block_size, max_model_len)
    kv = num_blocks * block_size * per_token
    text = (f"memory: weights {gib(sum(measured.values()))} ({_by_dtype(measured)}; plan "
            f"{planned}), buffers {gib(buffer_bytes)}, KV cache {gib(kv)} = {num_blocks} "
            f"blocks of {block_size} tokens at {per_token} B/token, largest batch at "
            f"max_model_len {max_model_len}: {min(batch, max_num_seqs)} (KV {batch}, "
            f"max_num_seqs {max_num_seqs})")
    if gpu_free_total is not None:
        free, total = gpu_free_total
        text += f"; GPU {gib(total - free)} of {gib(total)} in use"
    return text
