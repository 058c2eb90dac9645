"""The memory plan of a manifest's pools, before any pod starts.

`moeserve operator render` and the operator refuse a deployment whose pools' GPUs cannot hold
the weights (:func:`check_memory`); `moeserve operator plan -f` prints the whole plan
(:func:`plan_markdown`). The model's shape comes from ``spec.model`` (``shape``, ``config`` or a
known name), the GPU's memory from the pool's ``gpuMemoryGiB`` or its ``nvidia.com/gpu.product``
node selector, and the engine flags the plan depends on from the pool's ``extraArgs``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from moeserve.common import spec as s
from moeserve.common.memory_plan import (
    GIB,
    EngineSettings,
    MemoryPlan,
    PlanError,
    gib,
    plan_memory,
)
from moeserve.common.spec import MoEDeployment, PoolSpec, Role, SpecError

__all__ = ["GPU_MEMORY_MIB", "PRODUCT_LABEL", "MemoryPlanError", "PoolMemory", "pool_gpu_bytes",
           "engine_settings", "plan_deployment", "check_memory", "plan_markdown"]

PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
# Memory of one GPU as nvidia-smi reports it (MiB), by the product label's value.
GPU_MEMORY_MIB = {
    "NVIDIA-H200": 143771,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
}


class MemoryPlanError(SpecError):
    """A pool whose GPUs cannot hold what the plan puts on them; names the numbers."""


@dataclass(frozen=True)
class PoolMemory:
    """A pool's plan, or None with the reason there is none (``unknown``)."""

    role: Role
    plan: MemoryPlan | None
    unknown: str = ""


def pool_gpu_bytes(pool: PoolSpec) -> int | None:
    """One GPU's memory: the pool's gpuMemoryGiB, else its product label's; None if unknown."""
    if pool.gpu_memory_gib is not None:
        return int(pool.gpu_memory_gib * GIB)
    mib = GPU_MEMORY_MIB.get(pool.node_selector.get(PRODUCT_LABEL, ""))
    return None if mib is None else mib << 20


def _engine_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", choices=("auto", "fp8", "dequant"))
    p.add_argument("--block-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=0)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    return p


def engine_settings(dep: MoEDeployment, role: Role, torch_dtype: str) -> EngineSettings:
    """The engine flags of ``role``'s workers, as `moeserve worker` will resolve them."""
    pool = dep.spec.pool(role)
    try:
        args, _ = _engine_flags().parse_known_args(pool.extra_args)
    except (argparse.ArgumentError, ValueError) as exc:
        raise PlanError(str(exc)) from None
    gpu = pool.gpus_per_pod > 0
    dtype = args.dtype if args.dtype != "auto" else (torch_dtype if gpu else "float32")
    return EngineSettings(
        dtype=dtype,
        fp8_weights=args.quantization == "fp8" or (args.quantization == "auto" and gpu),
        block_size=args.block_size or dep.spec.model.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb)


def plan_deployment(dep: MoEDeployment) -> dict[Role, PoolMemory]:
    """Every pool's plan; raises SpecError naming the field when an input is unusable."""
    config = dep.spec.model.model_config_for_plan()
    out: dict[Role, PoolMemory] = {}
    for role in s.ROLES:
        pool = dep.spec.pool(role)
        if config is None:
            out[role] = PoolMemory(role, None, "the model's shape is unknown: set spec.model.shape "
                                             "or spec.model.config")
            continue
        gpu = pool_gpu_bytes(pool)
        if pool.gpus_per_pod and gpu is None:
            out[role] = PoolMemory(role, None, f"the GPU's memory is unknown: set spec.{role}."
                                             f"gpuMemoryGiB or a known {PRODUCT_LABEL}")
            continue
        try:
            settings = engine_settings(dep, role, config.torch_dtype)
            plan = plan_memory(config, settings, ep=pool.parallelism.ep,
                               redundant_experts=pool.eplb.redundant_experts,
                               gpu_bytes=gpu if pool.gpus_per_pod else None)
        except PlanError as exc:
            field = "parallelism.ep" if str(exc).startswith("ep") else "extraArgs"
            raise SpecError([(f"spec.{role}.{field}", str(exc))]) from None
        out[role] = PoolMemory(role, plan)
    return out


def check_memory(dep: MoEDeployment) -> dict[Role, PoolMemory]:
    """The plans, or MemoryPlanError naming each pool whose GPUs cannot hold its share."""
    plans = plan_deployment(dep)
    problems = [(f"spec.{role}", f"does not fit its GPUs: {'; '.join(p.plan.problems)}")
                for role, p in plans.items() if p.plan is not None and not p.plan.fits]
    if problems:
        raise MemoryPlanError(problems)
    return plans


def plan_markdown(dep: MoEDeployment) -> str:
    """The plan of every pool as a Markdown table, the arithmetic spelled out."""
    plans = plan_deployment(dep)
    rows: list[tuple[str, ...]] = []

    def row(label: str, *cells: str) -> None:
        rows.append((label, *cells))

    shown = [p for p in plans.values() if p.plan is not None]
    lines = [f"### {dep.name} ({dep.spec.model.name})", ""]
    for p in plans.values():
        if p.plan is None:
            lines.append(f"- {p.role}: no plan, {p.unknown}")
    if not shown:
        return "\n".join(lines) + "\n"
    plans_shown = [p.plan for p in shown if p.plan is not None]
    pools = [dep.spec.pool(p.role) for p in shown]
    row("layout", *(f"EP{x.parallelism.ep}, attention DP{x.parallelism.dp}, "
                    f"{x.gpus_per_pod or 'CPU'} per pod" for x in pools))
    row("routed experts per rank and layer", *(str(m.experts_per_rank) for m in plans_shown))
    dtypes = sorted({d for m in plans_shown for d in m.weights_by_dtype})
    for d in dtypes:
        row(f"weights {d}", *(gib(m.weights_by_dtype.get(d, 0)) for m in plans_shown))
    groups = list(dict.fromkeys(g for m in plans_shown for g in m.weights_by_group))
    for g in groups:
        row(f"  of which {g}", *(gib(m.weights_by_group.get(g, 0)) for m in plans_shown))
    row("**weights per rank (GPU)**", *(f"**{gib(m.weight_bytes)}**" for m in plans_shown))
    row("GPU memory", *(gib(m.gpu_bytes) if m.gpu_bytes else "CPU" for m in plans_shown))
    row("usable = util x memory - runtime", *(
        f"{m.utilization:g} x {gib(m.gpu_bytes)} - {gib(m.runtime_bytes)} = "
        f"{gib(m.usable_bytes or 0)}" if m.gpu_bytes else "-" for m in plans_shown))
    row("left free (activations, graphs, comms)",
        *(gib(m.workspace_bytes or 0) if m.gpu_bytes else "-" for m in plans_shown))
    row("KV bytes per token", *(_kv_per_token(m, dep) for m in plans_shown))
    row("**KV cache per rank (GPU)**", *(f"**{gib(m.kv_cache_bytes)}** "
                                  f"({m.kv_cache_bytes / 1e9:.1f} GB)" for m in plans_shown))
    row("KV blocks", *(f"{m.kv_blocks} of {m.block_size} tokens" for m in plans_shown))
    row("KV tokens per rank", *(f"{m.kv_tokens:,}" for m in plans_shown))
    row("largest batch at max-model-len", *(
        f"{min(m.batch_at_max_len, m.max_num_seqs)} sequences of {m.max_model_len} tokens "
        f"(KV: {m.batch_at_max_len}, max-num-seqs: {m.max_num_seqs})" for m in plans_shown))
    row("fits", *("yes" if m.fits else "NO: " + "; ".join(m.problems) for m in plans_shown))
    header = ("", *(p.role for p in shown))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for p in shown:
        for note in p.plan.notes if p.plan else ():
            lines.append(f"\n{p.role}: {note}")
    return "\n".join(lines) + "\n"


def _kv_per_token(m: MemoryPlan, dep: MoEDeployment) -> str:
    c = dep.spec.model.model_config_for_plan()
    assert c is not None
    size = m.kv_bytes_per_token // (c.kv_dim * c.num_hidden_layers)
    return (f"({c.kv_lora_rank} + {c.qk_rope_head_dim}) x {c.num_hidden_layers} layers x "
            f"{size} B = {m.kv_bytes_per_token:,} B")
