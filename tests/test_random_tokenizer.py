"""The tokenizer of random checkpoints: DeepSeek's layout (dense ids, specials at the config's
bos/eos ids), readable by the grammar engine at V2/V3 vocabulary sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeserve.worker.tokenizer_files import refresh_tokenizer, write_tokenizer


def test_v2_sized_vocab_is_dense_and_the_grammar_engine_reads_it(tmp_path: Path) -> None:
    pytest.importorskip("llguidance")
    from moeserve.worker.grammar import GrammarCompiler

    # V2-Lite / V3: 102400 / 129280 tokens, BOS/EOS at 100000/100001. The grammar engine
    # refused the sparse file ("EOS token ID 100001 is out of range (vocab_size=399)") and a
    # V2-Lite worker died in its warm-up.
    write_tokenizer(tmp_path, vocab_size=102400, bos_id=100000, eos_id=100001)
    ids = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"].values()
    assert sorted(ids) == list(range(100002))
    assert GrammarCompiler(tmp_path, 102400, 100001).prepare()


def test_a_tokenizer_the_engine_cannot_read_leaves_plain_serving_alone(tmp_path: Path) -> None:
    pytest.importorskip("llguidance")
    from moeserve.common.errors import InvalidRequestError
    from moeserve.worker.grammar import GrammarCompiler

    write_tokenizer(tmp_path, vocab_size=512, bos_id=0, eos_id=1)
    bad = GrammarCompiler(tmp_path, 512, eos_token_id=100001)  # no such token
    assert not bad.prepare()  # warm-up goes on; a structured request gets the named error
    with pytest.raises(InvalidRequestError, match="structured outputs are unavailable"):
        bad._llg_tokenizer()


def test_refresh_rewrites_a_sparse_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"vocab_size": 102400, "bos_token_id": 100000, "eos_token_id": 100001}))
    write_tokenizer(tmp_path, vocab_size=102400, bos_id=100000, eos_id=100001)
    assert not refresh_tokenizer(tmp_path)  # today's files stay
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items()
                              if not t.startswith("<unused")}  # an older moeserve's file
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert refresh_tokenizer(tmp_path)
    ids = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"].values()
    assert max(ids) + 1 == len(ids)
