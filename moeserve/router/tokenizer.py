"""Tokenizer, chat template and incremental detokenizer, loaded from a checkpoint directory.

The router owns text: workers see token ids only. A checkpoint without ``tokenizer.json`` still
serves token-id prompts; text prompts and chat requests then get a 400 naming the missing file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeserve.common.errors import CheckpointError, InvalidRequestError

__all__ = ["IncrementalDetokenizer", "ModelTokenizer", "load_tokenizer"]

_REPLACEMENT = "\ufffd"


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ModelTokenizer:
    """``tokenizers.Tokenizer`` plus what tokenizer_config.json says about using it."""

    def __init__(self, tokenizer: Any | None, config: dict[str, Any], source: str):
        self._tok = tokenizer
        self.source = source
        self.chat_template: str | None = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._special_id(self.bos_token)
        self.eos_token_id = self._special_id(self.eos_token)
        self._template = None

    def set_chat_template(self, source: str, origin: str) -> None:
        """Use ``source`` instead of the checkpoint's template (--chat-template ``origin``)."""
        import jinja2

        try:
            compiled = _compile_template(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{origin}: not a valid chat template: {e}") from None
        self.chat_template, self._template = source, compiled

    @property
    def available(self) -> bool:
        return self._tok is not None

    def token_id(self, text: str) -> int | None:
        """The id of ``text`` when it is one token of the vocabulary."""
        return self._special_id(text)

    def _special_id(self, text: str | None) -> int | None:
        if self._tok is None or text is None:
            return None
        return self._tok.token_to_id(text)

    def token_strs(self, token_ids: Sequence[int]) -> list[str | None]:
        """Each id's vocabulary entry (vLLM's ``token_strs``)."""
        tok = self.require("tokens")
        return [tok.id_to_token(i) for i in token_ids]

    def require(self, param: str) -> Any:
        if self._tok is None:
            raise InvalidRequestError(
                f"the model at {self.source} has no tokenizer (tokenizer.json missing): "
                "send the prompt as a list of token ids",
                param=param,
            )
        return self._tok

    def encode(
        self, text: str, add_special_tokens: bool = True, param: str = "prompt"
    ) -> list[int]:
        """Token ids of ``text``.

        Special tokens (BOS) come from tokenizer.json's post-processor, as HuggingFace's fast
        tokenizers add them; ``add_bos_token`` in tokenizer_config.json is not applied again.
        """
        tok = self.require(param)
        try:
            # encode_batch lets go of the GIL while it works (encode does not), so the event
            # loop keeps answering while a thread tokenizes a multi-megabyte prompt.
            return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except TypeError:  # the Rust tokenizer refuses text that is not valid UTF-8
            raise InvalidRequestError(
                f"{param} is not valid Unicode text (a lone surrogate escape such as \\ud800?)",
                param=param,
            ) from None

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
    ) -> list[int]:
        """Render the checkpoint's chat template and tokenize it (the template adds BOS).

        ``tools`` (OpenAI's tool definitions) and ``extra`` (chat_template_kwargs) are template
        variables, as HuggingFace passes them; a template without a tools section ignores them.
        """
        self.require("messages")
        if not self.chat_template:
            raise InvalidRequestError(
                f"the model at {self.source} has no chat_template in tokenizer_config.json: "
                "use /v1/completions",
                param="messages",
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            text = self._template.render(
                **(extra or {}),
                messages=list(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except Exception as e:  # a template's raise_exception() or a bad message shape
            raise InvalidRequestError(f"chat template failed: {e}", param="messages") from None
        return self.encode(text, add_special_tokens=False, param="messages")

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._tok is None:
            return ""
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, stop: Sequence[str] = ()) -> IncrementalDetokenizer:
        if stop:
            self.require("stop")
        return IncrementalDetokenizer(self, stop)


def _compile_template(source: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    # The environment HuggingFace renders chat templates with, so templates behave the same.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_tokenizer(checkpoint_dir: str | Path) -> ModelTokenizer:
    """Tokenizer of a checkpoint; ``available`` is False when it ships none."""
    path = Path(checkpoint_dir)
    config: dict[str, Any] = {}
    config_file, tokenizer_file = path / "tokenizer_config.json", path / "tokenizer.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file} must hold a JSON object")
    tokenizer = None
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for every parse error
            raise CheckpointError(f"{tokenizer_file} does not parse as a tokenizer: {e}") from None
    return ModelTokenizer(tokenizer, config, str(path))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting characters.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character; such a tail decodes to
    U+FFFD and is held back until the next token completes it (the offsets scheme of TGI and
    vLLM). Stop strings are matched on the text; text that might begin a stop string is held
    back until it cannot, so a stop string is never streamed.
    """

    def __init__(self, tokenizer: ModelTokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = [s for s in stop if s]
        self._firsts = {s[0] for s in self._stop}
        self._max_hold = max((len(s) - 1 for s in self._stop), default=0)
        self._pending = ""
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Text to emit after appending ``token_ids``; '' while a character is incomplete."""
        if self.stopped or not token_ids:
            return ""
        self._ids.extend(token_ids)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._apply_stop(delta)

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        if self.stopped:
            return ""
        tail = self._tokenizer.decode(self._ids[self._prefix_offset :])
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._pending + tail[len(prefix) :]
        self._pending = ""
        self._read_offset = self._prefix_offset = len(self._ids)
        if self._stop:
            idx = self._find_stop(text)
            if idx is not None:
                self.stopped = True
                return text[:idx]
        return text

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _apply_stop(self, delta: str) -> str:
        if not self._stop:
            return delta
        text = self._pending + delta
        idx = self._find_stop(text)
        if idx is not None:
            self.stopped = True
            self._pending = ""
            return text[:idx]
        hold = self._hold(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _hold(self, text: str) -> int:
        """How much of the end of ``text`` to hold back: from the first character, among the
        last (longest stop - 1), that begins some stop string. That covers every suffix that
        could grow into a stop string, and costs one C-level scan per distinct first
        character: testing each stop's every prefix was quadratic in the stop's length."""
        tail_start = max(len(text) - self._max_hold, 0)
        hits = [i for i in (text.find(c, tail_start) for c in self._firsts) if i >= 0]
        return len(text) - min(hits) if hits else 0
