"""A small DeepSeek-V3-architecture model trained from scratch on the CPU, written as a V3-style
fp8 checkpoint (for benchmarks/fp8_accuracy.py).

The text is the Python standard library's top-level .py files of the running interpreter
(offline, deterministic for one Python build): sorted by name, every 16th file held out. A
byte-level BPE tokenizer is trained on the training files with the `tokenizers` library. The
model is transformers' DeepseekV3ForCausalLM (MLA with q_lora / kv_lora, a dense first layer,
then MoE layers with sigmoid noaux_tc group routing and a shared expert), trained in float32
with AdamW. transformers never updates `e_score_correction_bias`; V3's auxiliary-loss-free
balancing does (after each step, bias += 0.001 * sign(mean load - expert load)), and so does
`train` here, so the exported router has a trained bias like V3's.

The export names tensors as DeepSeek's release does (experts split per expert) and goes through
moeserve's own writer (`moeserve.worker.checkpoint.write_checkpoint`), so exactly the tensors a
V3 checkpoint ships in fp8 are fp8 with 128x128 float32 block scales.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeserve.common.model_presets import FP8_QUANTIZATION_CONFIG
from moeserve.worker.checkpoint import checkpoint_tensors, preset_config, write_checkpoint
from moeserve.worker.model.fp8_linear import FP8_DTYPE, dequantize_blocks

__all__ = ["SHAPE", "BIAS_UPDATE", "Corpus", "load_corpus", "model_config", "hf_model", "train",
           "release_tensors", "export_fp8", "round_to_checkpoint", "hf_logits", "next_token_loss"]

# Block-aligned where fp8 needs it (hidden, moe_intermediate, q_lora multiples of 128, so
# routed experts and merged projections stay fp8); V3's proportions elsewhere: rope dims half
# the nope dims, a dense first layer, groups of experts of which half are eligible.
SHAPE: dict[str, Any] = {
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
    "moe_intermediate_size": 256, "num_hidden_layers": 4, "first_k_dense_replace": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128,
    "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
    "n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "n_shared_experts": 1,
}
BIAS_UPDATE = 1e-3  # V3's bias update speed for auxiliary-loss-free balancing
HOLD_OUT_EVERY = 16


class Corpus:
    """Token streams of the training and held-out files, and the tokenizer."""

    def __init__(self, tokenizer: Tokenizer, train: torch.Tensor, held_out: torch.Tensor,
                 files: tuple[int, int], digest: str):
        self.tokenizer, self.train, self.held_out = tokenizer, train, held_out
        self.files, self.digest = files, digest

    def windows(self, count: int, length: int) -> list[list[int]]:
        """`count` held-out windows of `length` tokens at evenly spaced offsets."""
        span = len(self.held_out) - length
        if span < 0:
            raise ValueError(f"held-out text has {len(self.held_out)} tokens, < {length}")
        starts = [span * i // max(count - 1, 1) for i in range(count)]
        return [self.held_out[s:s + length].tolist() for s in starts]


def load_corpus(vocab_size: int, root: Path | None = None, max_files: int | None = None,
                ) -> Corpus:
    """The standard library's top-level .py files (or `root`'s), the first `max_files` of them
    in name order; every HOLD_OUT_EVERY-th held out, the tokenizer trained on the rest."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:max_files]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    held = [t for i, t in enumerate(texts) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    train = [t for i, t in enumerate(texts) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    def stream(parts: list[str]) -> torch.Tensor:
        return torch.tensor([i for e in tok.encode_batch(parts) for i in e.ids])

    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:12]
    return Corpus(tok, stream(train), stream(held), (len(train), len(held)), digest)


def model_config(vocab_size: int, shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json (DeepSeek's release layout) of the model, with V3's quantization_config;
    the rest (routing, yarn RoPE, norms) from moeserve's "tiny" preset, which has V3's."""
    cfg = preset_config("tiny", dtype="bfloat16")
    cfg.update(shape or SHAPE)
    cfg["vocab_size"] = vocab_size
    cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return cfg


def hf_model(cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM of `cfg`, float32, initialised from `seed`."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype")}
    config = DeepseekV3Config.from_dict(plain)
    config._attn_implementation = "sdpa"
    config._experts_implementation = "grouped_mm"  # ~1.3x eager's loop over experts on the CPU
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(config).float()


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


def train(model: torch.nn.Module, stream: torch.Tensor, *, steps: int, batch: int,
          seq_len: int, lr: float, seed: int,
          log: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW on random windows of `stream` (linear warm-up, cosine decay to lr / 10), with
    V3's bias balancing of the routers; returns the loss of every step. Reproducible for a
    given seed and thread count."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(s / max(steps - 1, 1), 1.0)))))
    routers = _routers(model)
    chosen: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [r.register_forward_hook(lambda m, i, out: chosen.__setitem__(m, out[2]))
             for r in routers]
    losses = []
    model.train()
    # Two threads made one backward differ in the 7th digit between two runs (transformers'
    # grouped_mm experts); deterministic algorithms keep the run reproducible.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for step in range(steps):
            starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
            x = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            with torch.no_grad():
                for router in routers:
                    load = torch.bincount(chosen[router].flatten(),
                                          minlength=router.num_experts).float()
                    router.e_score_correction_bias += BIAS_UPDATE * torch.sign(load.mean() - load)
            losses.append(loss.item())
            if log:
                log(step, losses[-1])
    finally:
        torch.use_deterministic_algorithms(deterministic)
        for h in hooks:
            h.remove()
        model.eval()
    return losses


def release_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' parameters under DeepSeek-V3's release names, as views: the stacked
    experts ([E, 2I, H] gate then up rows, [E, H, I]) split into
    experts.{e}.{gate,up,down}_proj."""
    for name, t in model.state_dict().items():  # views of the parameters
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("mlp.experts") and leaf == "gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
        elif prefix.endswith("mlp.experts") and leaf == "down_proj":
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def export_fp8(model: torch.nn.Module, cfg: dict[str, Any], out: Path) -> Path:
    """The model as an fp8 checkpoint in `out`, written by moeserve's checkpoint writer."""
    path = write_checkpoint(out, cfg, release_tensors(model))
    model.config.to_json_file(str(path / "transformers_config.json"))  # for reference only
    return path


@torch.no_grad()
def round_to_checkpoint(model: torch.nn.Module, cfg: dict[str, Any]) -> None:
    """Round transformers' float32 weights in place to the values the checkpoint of `cfg` will
    hold (e4m3 times its block scale, or cfg's dtype): then the model and the checkpoint are
    the same function, and moeserve's exact path must reproduce the model's logits."""
    dtype = getattr(torch, cfg["torch_dtype"])
    fp8 = cfg.get("quantization_config") is not None
    block = tuple(FP8_QUANTIZATION_CONFIG["weight_block_size"])
    for name, view in release_tensors(model):
        if view.dtype != torch.float32:
            raise TypeError(f"{name} is {view.dtype}: the model must be float32")
        stored = checkpoint_tensors(name, view, dtype, fp8)
        w = stored[name]
        view.copy_(dequantize_blocks(w, stored[name + "_scale_inv"], block)
                   if w.dtype == FP8_DTYPE else w.float())


@torch.inference_mode()
def hf_logits(model: torch.nn.Module, windows: list[list[int]]) -> torch.Tensor:
    """transformers' float32 logits of every position of each window, concatenated."""
    return torch.cat([model(input_ids=torch.tensor([w])).logits[0].float() for w in windows])


def next_token_loss(logits: torch.Tensor, windows: list[list[int]]) -> float:
    """Mean cross-entropy of each window's next tokens (logits concatenated as hf_logits)."""
    losses, start = [], 0
    for w in windows:
        part = logits[start:start + len(w)]
        losses.append(F.cross_entropy(part[:-1].double(), torch.tensor(w[1:]),
                                      reduction="sum"))
        start += len(w)
    return (sum(losses) / sum(len(w) - 1 for w in windows)).item()
