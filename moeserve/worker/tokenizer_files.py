"""tokenizer.json + tokenizer_config.json for random checkpoints.

A byte-level BPE trained (with the `tokenizers` library) on a small built-in text, with
DeepSeek's special tokens at the checkpoint's bos/eos ids and a DeepSeek-style chat template.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["BOS", "EOS", "CHAT_TEMPLATE", "TOOL_TOKENS", "refresh_tokenizer", "write_tokenizer"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# DeepSeek-V3's tool-call and R1's reasoning tokens: added, not special, so decoded text keeps
# them and the router's parsers (moeserve/router/tool_parser.py, reasoning_parser.py) see them.
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
THINK, END_THINK = "<think>", "</think>"
TOOL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, OUTPUTS_BEGIN, OUTPUTS_END,
               OUTPUT_BEGIN, OUTPUT_END, THINK, END_THINK)
# DeepSeek-V3's conversation layout: system text first, then the tools (the release template
# has no tools section; this one describes them so a model can be prompted with them), user
# and assistant turns, an assistant's calls in tool-call tokens with JSON arguments in a fenced
# block, and tool results in one outputs block that the assistant's next turn continues.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages if m['role'] in ('system', 'developer') %}{{ m['content'] }}"
    "{% endfor %}"
    "{% if tools %}{{ '\\n\\n' }}## Tools\nCall a function with " + CALLS_BEGIN + CALL_BEGIN
    + "function" + SEP + "NAME\n```json\nARGUMENTS\n```" + CALL_END + CALLS_END + ".\n"
    "{% for t in tools %}{{ '\\n' }}### {{ t['function']['name'] }}\n"
    "{% if t['function']['description'] %}{{ t['function']['description'] }}\n{% endif %}"
    "Parameters: {{ t['function']['parameters'] | tojson }}\n{% endfor %}{% endif %}"
    "{% set ns = namespace(outputs=false) %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if ns.outputs %}" + OUTPUTS_END + "{% set ns.outputs = false %}{% endif %}"
    + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% if ns.outputs %}" + OUTPUTS_END + "{% set ns.outputs = false %}"
    "{% else %}" + ASSISTANT + "{% endif %}"
    "{% set text = m['content'] or '' %}"
    "{% if '" + END_THINK + "' in text %}{% set text = text.split('" + END_THINK + "')[-1] %}"
    "{% endif %}{{ text }}"
    "{% if m['tool_calls'] %}" + CALLS_BEGIN + "{% for c in m['tool_calls'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}" + CALL_BEGIN + "{{ c['type'] }}" + SEP
    + "{{ c['function']['name'] }}\n```json\n{{ c['function']['arguments'] }}\n```"
    + CALL_END + "{% endfor %}" + CALLS_END + "{% endif %}"
    "{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if ns.outputs %}{{ '\\n' }}{% else %}" + OUTPUTS_BEGIN
    + "{% set ns.outputs = true %}{% endif %}"
    + OUTPUT_BEGIN + "{{ m['content'] }}" + OUTPUT_END +
    "{% endif %}{% endfor %}"
    "{% if ns.outputs %}" + OUTPUTS_END + "{% elif add_generation_prompt %}" + ASSISTANT
    + "{% endif %}"
)
_CORPUS = """
Mixture-of-Experts models route every token to a few experts out of many, so a model with
hundreds of billions of parameters reads only a small fraction of them per token. Serving them
well means spreading experts across many accelerators, sending tokens to the experts that own
them, and keeping the attention cache compact. Multi-head latent attention stores one small
latent vector per token instead of full keys and values. Prefill computes the cache for a
prompt; decode extends it one token at a time. Splitting the two onto separate workers lets
each run the batch shape it likes best, and the cache moves between them over the network.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine,
thank you. What is the capital of France? Paris is the capital of France. 0123456789
""" * 4


def _filler(i: int) -> str:
    return f"<unused{i}>"


def _sparse(tokenizer_file: Path) -> bool:
    ids = json.loads(tokenizer_file.read_text())["model"]["vocab"].values()
    return max(ids) + 1 != len(ids)


def write_tokenizer(out_dir: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """Train a small BPE, place the specials at bos_id/eos_id, write both tokenizer files."""
    target = min(vocab_size - 2, 384)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    spec = json.loads(tok.to_str())
    # Regular tokens take the lowest ids not reserved for the special tokens.
    free = (i for i in range(vocab_size) if i not in (bos_id, eos_id))
    old_vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    spec["model"]["vocab"] = {token: next(free) for token, _ in old_vocab}
    vocab = spec["model"]["vocab"]
    taken = set(vocab.values()) | {bos_id, eos_id}
    spare = (i for i in range(vocab_size) if i not in taken)
    specials = [(bos_id, BOS, True), (eos_id, EOS, True)]
    # A vocabulary too small for all of them goes without the last ones.
    named = (USER, ASSISTANT, *TOOL_TOKENS)
    specials += [(i, text, False) for i, text in zip(spare, named, strict=False)]
    # Added tokens keep their ids only when the model vocab has them too (as DeepSeek's files do).
    vocab.update({text: i for i, text, _ in specials})
    # Ids are dense up to the highest one, as in DeepSeek's files (llguidance counts tokens, and
    # V2/V3 put BOS/EOS at 100000/100001, or 0/1): the gap holds tokens no merge produces.
    used = set(vocab.values())
    vocab.update({_filler(i): i for i in range(max(used)) if i not in used})
    spec["added_tokens"] = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, text, special in specials
    ]
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "model_max_length": 16384,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))


def refresh_tokenizer(model_dir: Path) -> bool:
    """Rewrite a random checkpoint's tokenizer files made by an older moeserve (a chat template
    other than today's: no tool or reasoning tokens; ids with gaps) in place; True when it
    did. Each file is replaced whole (os.replace), so a reader sees the old file or the new
    one."""
    config_file = model_dir / "tokenizer_config.json"
    try:
        if json.loads(config_file.read_text()).get("chat_template") == CHAT_TEMPLATE \
                and not _sparse(model_dir / "tokenizer.json"):  # fmt: skip
            return False
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False  # not ours to fix: loading reports what is wrong with it
    with tempfile.TemporaryDirectory(prefix=".tok-", dir=model_dir) as tmp:
        write_tokenizer(Path(tmp), cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.replace(Path(tmp) / name, model_dir / name)
    return True
