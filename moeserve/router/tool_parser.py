"""DeepSeek-V3 tool calls in generated text (``--tool-call-parser deepseek_v3``).

The model writes its calls after any plain content, as::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>  (more calls, newline-separated)  <｜tool▁calls▁end｜>

``ToolCallStream`` turns text deltas, split anywhere (a marker or the closing fence may arrive
over several deltas), into content deltas and OpenAI ``tool_calls`` deltas: one opening delta
per call (index, id, type, name, empty arguments), then argument chunks. Text that might still
become a marker is held back until it cannot. The non-streamed response runs the same machine
over the whole text, so both shapes agree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CALLS_BEGIN", "CALLS_END", "CALL_BEGIN", "CALL_END", "SEP", "TOOL_PARSERS",
           "ParsedCall", "ToolCallStream", "parse_tool_calls", "partial_tail"]

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_FENCE_OPEN = "```json\n"
_CLOSINGS = ("\n```" + CALL_END, "```" + CALL_END, CALL_END)
TOOL_PARSERS = ("deepseek_v3",)


def partial_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some marker (and might complete it)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str = ""

    def message_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


@dataclass
class _Out:
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


class ToolCallStream:
    """Incremental parser; ``push`` text as it comes, ``finish`` at the end of the output."""

    def __init__(self, max_calls: int | None = None) -> None:
        self._buf = ""
        self._state = "content"  # content | calls | header | fence | args | after
        self._max_calls = max_calls  # parallel_tool_calls=false: the first call only
        self.calls: list[ParsedCall] = []

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls deltas) that ``text`` completes."""
        self._buf += text
        out = _Out()
        while self._step(out, final=False):
            pass
        return out.content, out.calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is held back, at the end: an unterminated call keeps the arguments it had."""
        out = _Out()
        while self._step(out, final=True):
            pass
        if self._state in ("fence", "args") and self._buf:
            self._args(out, self._buf)
        elif self._buf:
            out.content += self._buf  # a marker that never completed is text
        self._buf = ""
        return out.content, out.calls

    def _step(self, out: _Out, final: bool) -> bool:
        """One transition; False when the buffer needs more text."""
        buf, state = self._buf, self._state
        if state == "content":
            i = buf.find(CALLS_BEGIN)
            if i < 0:
                keep = 0 if final else partial_tail(buf, (CALLS_BEGIN,))
                out.content += buf[: len(buf) - keep]
                self._buf = buf[len(buf) - keep:]
                return False
            out.content += buf[:i]
            self._buf, self._state = buf[i + len(CALLS_BEGIN):], "calls"
            return True
        if state == "calls":
            rest = buf.lstrip()
            for marker, nxt in ((CALL_BEGIN, "header"), (CALLS_END, "after")):
                if rest.startswith(marker):
                    self._buf, self._state = rest[len(marker):], nxt
                    return True
            if rest and not any(m.startswith(rest) for m in (CALL_BEGIN, CALLS_END)):
                self._state = "after"  # not a call: whatever follows is content
                return True
            return False
        if state == "header":
            sep = buf.find(SEP)
            end = buf.find("\n", sep + len(SEP)) if sep >= 0 else -1
            if end < 0:
                return False
            self._open_call(out, buf[sep + len(SEP): end].strip())
            self._buf, self._state = buf[end + 1:], "fence"
            return True
        if state == "fence":
            return self._fence_step(final)
        if state == "args":
            return self._args_step(out, final)
        out.content += buf  # after the calls: plain text again (rare)
        self._buf = ""
        return False

    def _fence_step(self, final: bool) -> bool:
        """The arguments' opening fence, when there is one, is not part of them."""
        buf = self._buf
        if not final and len(buf) < len(_FENCE_OPEN) and _FENCE_OPEN.startswith(buf):
            return False  # the fence may still be arriving
        if buf.startswith(_FENCE_OPEN):
            self._buf = buf[len(_FENCE_OPEN):]
        self._state = "args"
        return True

    def _args_step(self, out: _Out, final: bool) -> bool:
        buf = self._buf
        ends = [(i, c) for c in _CLOSINGS if (i := buf.find(c)) >= 0]
        if ends:
            i, closing = min(ends)
            self._args(out, buf[:i])
            self._buf, self._state = buf[i + len(closing):], "calls"
            return True
        keep = 0 if final else partial_tail(buf, _CLOSINGS)
        self._args(out, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _open_call(self, out: _Out, name: str) -> None:
        call = ParsedCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", name)
        self.calls.append(call)
        if self._emits(call):
            out.calls.append({"index": call.index, "id": call.id, "type": "function",
                              "function": {"name": name, "arguments": ""}})  # fmt: skip

    def _args(self, out: _Out, text: str) -> None:
        if not text or not self.calls:
            return
        call = self.calls[-1]
        call.arguments += text
        if self._emits(call):
            out.calls.append({"index": call.index, "function": {"arguments": text}})

    def message_calls(self) -> list[dict[str, Any]]:
        """The calls so far, as an assistant message's ``tool_calls``."""
        return [c.message_dict() for c in self.calls if self._emits(c)]

    def _emits(self, call: ParsedCall) -> bool:
        return self._max_calls is None or call.index < self._max_calls


def parse_tool_calls(text: str, max_calls: int | None = None) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a whole output."""
    stream = ToolCallStream(max_calls)
    content, _ = stream.push(text)
    tail, _ = stream.finish()
    calls = stream.calls[:max_calls] if max_calls is not None else stream.calls
    return content + tail, calls
