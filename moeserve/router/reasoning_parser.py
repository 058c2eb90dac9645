"""R1-style reasoning in generated text (``--reasoning-parser deepseek_r1``).

DeepSeek-R1 thinks first, then answers: ``<think>reasoning</think>answer``. Its chat template
puts ``<think>`` in the prompt, so the output usually starts inside the reasoning and only
``</think>`` shows; an output that never closes it is all reasoning (it ran out of tokens while
thinking). ``ReasoningStream`` splits text deltas, cut anywhere, into (reasoning, content)
deltas, holding back what might still become a tag. Reasoning tokens are counted on token ids
when ``</think>`` is one token (as in DeepSeek's vocabulary): every token up to and including it.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeserve.router.tool_parser import partial_tail

__all__ = ["REASONING_PARSERS", "ReasoningStream", "THINK", "END_THINK", "parse_reasoning"]

THINK, END_THINK = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1",)


class ReasoningStream:
    def __init__(self, end_token_id: int | None = None) -> None:
        self._buf = ""
        self._started = False  # past a leading <think> (or sure there is none)
        self.thinking = True
        self._end_id = end_token_id
        self._counting = True
        self.reasoning_tokens = 0

    def count(self, token_ids: Sequence[int]) -> None:
        """Count a delta's reasoning tokens; call before pushing its text (without a
        ``</think>`` token id, a delta counts whole while the text is still thinking)."""
        if self._end_id is None:
            self.reasoning_tokens += len(token_ids) if self.thinking else 0
            return
        for t in token_ids:
            if not self._counting:
                return
            self.reasoning_tokens += 1
            self._counting = t != self._end_id

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) that ``text`` completes."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        buf, reasoning, content = self._buf, "", ""
        if not self._started:
            stripped = buf.lstrip()
            if stripped.startswith(THINK):
                buf, self._started = stripped[len(THINK):], True
            elif final or not THINK.startswith(stripped):
                self._started = True
            else:
                return "", ""  # may still be the opening tag
        if self.thinking:
            i = buf.find(END_THINK)
            if i < 0:
                keep = 0 if final else partial_tail(buf, (END_THINK,))
                self._buf = buf[len(buf) - keep:]
                return buf[: len(buf) - keep], ""
            reasoning, buf, self.thinking = buf[:i], buf[i + len(END_THINK):], False
        self._buf = ""
        return reasoning, content + buf


def parse_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    stream = ReasoningStream()
    r1, c1 = stream.push(text)
    r2, c2 = stream.finish()
    return r1 + r2, c1 + c2
