"""Router tokenizer: chat template, BOS, incremental detokenizing, stop strings, no tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeserve.common.errors import InvalidRequestError
from moeserve.router.tokenizer import load_tokenizer
from moeserve.worker.tokenizer_files import write_tokenizer

TEXT = "Experts route tokens: héllo wörld, 世界 🚀 done."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, vocab_size=512, bos_id=0, eos_id=1)
    return path


def test_encode_matches_transformers_and_round_trips(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.available and tok.bos_token_id == 0 and tok.eos_token_id == 1
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert ids == hf(TEXT).input_ids
    chat = [{"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(chat) == list(
        hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


def test_chat_template_renders_once_with_bos(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert ids.count(0) == 1 and ids[0] == 0
    assert tok.decode(ids, skip_special_tokens=False).endswith("Hello<｜Assistant｜>")


def test_incremental_detokenizer_never_splits_characters(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.encode()) // 4  # non-ASCII falls back to byte tokens
    detok = tok.detokenizer()
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT
    # Several tokens at once give the same text.
    detok = tok.detokenizer()
    assert detok.push(ids[:7]) + detok.push(ids[7:]) + detok.flush() == TEXT


def test_stop_strings_are_never_streamed(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = tok.detokenizer(stop=["wörld"])
    out = ""
    for i in ids:
        out += detok.push([i])
        if detok.stopped:
            break
    assert detok.stopped and out == "Experts route tokens: héllo "
    detok = tok.detokenizer(stop=["not there"])
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == TEXT


def test_checkpoint_without_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(tmp_path)
    assert not tok.available
    assert tok.decode([1, 2, 3]) == ""
    with pytest.raises(InvalidRequestError, match="no tokenizer") as info:
        tok.encode("hello")
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequestError) as info:
        tok.detokenizer(stop=["x"])
    assert info.value.param == "stop"


def test_text_that_is_not_unicode_is_a_named_400(tok_dir: Path) -> None:
    """JSON may carry a lone surrogate escape ("\\ud800"): a 400 naming the field, not a 500."""
    tok = load_tokenizer(tok_dir)
    with pytest.raises(InvalidRequestError) as info:
        tok.encode("ok \ud800", param="prompt")
    assert info.value.param == "prompt" and info.value.http_status == 400
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template([{"role": "user", "content": "\ud800"}])
    assert info.value.param == "messages"


def test_an_older_cached_tokenizer_is_refreshed(tmp_path: Path) -> None:
    """`moeserve up`'s cached tiny model from before the tool tokens gets today's files."""
    import json

    from moeserve.worker.tokenizer_files import CHAT_TEMPLATE, refresh_tokenizer

    write_tokenizer(tmp_path, vocab_size=512, bos_id=0, eos_id=1)
    (tmp_path / "config.json").write_text(json.dumps(
        {"vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "x"}))
    assert refresh_tokenizer(tmp_path) and not refresh_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == CHAT_TEMPLATE and tok.token_id("<｜tool▁calls▁begin｜>")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "tokenizer.json", "tokenizer_config.json"]


def test_chat_template_flag_replaces_the_checkpoint_template(
        tok_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import argparse

    from moeserve.common.errors import CheckpointError
    from moeserve.router.chat import ChatOptions, prepare_tokenizer

    tools_on = ChatOptions("deepseek_v3", True)
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(tok_dir)
    with caplog.at_level("WARNING", logger="moeserve.router.chat"):
        prepare_tokenizer(tok, argparse.Namespace(chat_template=str(plain)), tools_on)
    assert tok.decode(tok.apply_chat_template([{"role": "user", "content": "Hi"}])) == "Hi"
    assert "never reads `tools`" in caplog.text  # tool calls on, tools never shown: said
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(CheckpointError, match="broken.jinja"):
        prepare_tokenizer(tok, argparse.Namespace(chat_template=str(broken)), tools_on)
