"""Token logprobs in OpenAI's two shapes, from the workers' TokenLogprobs.

- /v1/completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"}``, the offsets continuing across a stream's chunks;
- /v1/chat/completions: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
  "refusal": None}``.

A token's text is its own decoding; ``bytes`` are its UTF-8 bytes, or for a byte-level BPE
token that is part of a multi-byte character (which decodes to U+FFFD alone) the raw bytes it
stands for. Without a tokenizer a token reads ``token_id:<id>`` (vLLM's spelling).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from moeserve.common.sampling import TokenLogprobs
from moeserve.router.tokenizer import ModelTokenizer

__all__ = ["LogprobsFormatter"]


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 bytes), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class LogprobsFormatter:
    """Renders one choice's logprobs chunk by chunk (``chat`` picks the shape)."""

    def __init__(self, tokenizer: ModelTokenizer, chat: bool):
        self._tokenizer = tokenizer
        self._chat = chat
        self._offset = 0  # legacy text_offset of the next token
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token."""
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        if not self._tokenizer.available:
            text = f"token_id:{token_id}"
            found = (text, list(text.encode()))
        else:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            raw = None
            if "\ufffd" in text:
                piece = self._tokenizer._tok.id_to_token(token_id) or ""
                alphabet = _byte_level_alphabet()
                if piece and all(c in alphabet for c in piece):
                    raw = [alphabet[c] for c in piece]
            found = (text, raw if raw is not None else list(text.encode("utf-8")))
        if len(self._cache) < 65536:
            self._cache[token_id] = found
        return found

    def render(self, logprobs: Sequence[TokenLogprobs]) -> dict:
        return self._chat_shape(logprobs) if self._chat else self._legacy_shape(logprobs)

    def _chat_shape(self, logprobs: Sequence[TokenLogprobs]) -> dict:
        content = []
        for lp in logprobs:
            text, raw = self.token(lp.token_id)
            top = []
            for token_id, value in lp.top:
                t, b = self.token(token_id)
                top.append({"token": t, "logprob": value, "bytes": b})
            content.append({"token": text, "logprob": lp.logprob, "bytes": raw,
                            "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _legacy_shape(self, logprobs: Sequence[TokenLogprobs]) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            text = self.token(lp.token_id)[0]
            tokens.append(text)
            values.append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in lp.top:  # tokens that read alike keep the likeliest's value
                top.setdefault(self.token(t)[0], v)
            tops.append(top)
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

