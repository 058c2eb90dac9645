"""Structured outputs in process: request fields -> StructuredOutput (400s naming the field),
the wire, the token bitmask, and the engine's outputs on the random tiny model (every
json_schema output validates; regex and choice match; a migration's replay continues the
grammar; async scheduling keeps the constraint)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from moeserve.api.wire import sampling_from_proto, sampling_to_proto
from moeserve.common.errors import InvalidRequestError
from moeserve.common.sampling import SamplingParams
from moeserve.common.structured import StructuredOutput, structured_from_json_schema
from moeserve.router.protocol import ChatCompletionRequest, CompletionRequest
from moeserve.worker.grammar import allocate_bitmask, apply_token_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["a", "bc"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "ok", "n", "kind", "tags"],
    "additionalProperties": False,
}
MSG = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MSG, **kw)


# ------------------------------------------------------------------ request fields


def test_response_format_json_schema_and_json_object() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    s = chat(response_format=rf).sampling_params(16).structured
    assert s.kind == "json_schema" and json.loads(s.spec) == SCHEMA and s.strict
    # property order is the schema's (generation follows it)
    assert list(json.loads(s.spec)["properties"]) == list(SCHEMA["properties"])
    assert chat(response_format={"type": "json_object"}).sampling_params(16).structured == \
        StructuredOutput("json_object")
    assert chat(response_format={"type": "text"}).sampling_params(16).structured is None
    assert chat().sampling_params(16).structured is None


def test_vllm_fields_regex_choice_grammar_json() -> None:
    def so(**kw):
        return CompletionRequest(prompt="x", **kw).sampling_params(16).structured

    assert so(structured_outputs={"regex": "[a-z]+"}) == StructuredOutput("regex", "[a-z]+")
    assert so(structured_outputs={"choice": ["yes", "no"]}).kind == "choice"
    assert so(structured_outputs={"grammar": 'root ::= "a" | "b"'}).kind == "grammar"
    assert json.loads(so(structured_outputs={"json": SCHEMA}).spec) == SCHEMA
    assert so(structured_outputs={"json_object": True}).kind == "json_object"
    assert so(guided_regex=r"\d+") == StructuredOutput("regex", r"\d+")
    assert json.loads(so(guided_choice=["a", "b"]).spec) == ["a", "b"]
    assert json.loads(so(guided_json=json.dumps(SCHEMA)).spec) == SCHEMA


@pytest.mark.parametrize("fields,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}}},
     "response_format.json_schema.schema", "nowhere"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex", "unclosed group"),
    ({"guided_regex": "(("}, "guided_regex", "unclosed group"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar",
     "nothing_here"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "not several"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "grammar"),
])
def test_uncompilable_or_conflicting_constraints_are_400s_naming_the_field(
        fields, param, words) -> None:
    start = time.monotonic()
    with pytest.raises(InvalidRequestError) as e:
        chat(**fields).sampling_params(16)
    assert time.monotonic() - start < 1.0
    assert e.value.param == param and words in str(e.value), (e.value.param, str(e.value))


def test_strict_false_ignores_keywords_the_engine_lacks() -> None:
    schema = {"type": "string", "format": "no-such-format"}
    with pytest.raises(InvalidRequestError, match="no-such-format"):
        structured_from_json_schema(schema)
    assert structured_from_json_schema(schema, strict=False).strict is False


def test_wire_round_trip() -> None:
    s = StructuredOutput("json_schema", json.dumps(SCHEMA), strict=False, replay=3)
    p = SamplingParams(max_tokens=9, structured=s)
    assert sampling_from_proto(sampling_to_proto(p)) == p
    assert sampling_from_proto(sampling_to_proto(SamplingParams())).structured is None


# ------------------------------------------------------------------ the mask


def test_bitmask_masks_exactly_the_clear_bits() -> None:
    vocab = 70  # three words, the last partial
    mask = allocate_bitmask(2, vocab)
    assert mask.shape == (2, 3) and mask.dtype == torch.int32
    mask[0].zero_()
    mask[0, 0] = 1 << 5
    mask[0, 1] = -(1 << 31)  # bit 31 of word 1: token 63
    logits = torch.randn(2, vocab)
    out = apply_token_bitmask(logits, mask)
    allowed = torch.isfinite(out)
    assert allowed[0].nonzero().flatten().tolist() == [5, 63]
    assert allowed[1].all() and torch.equal(out[1], logits[1])
    assert torch.isfinite(logits).all()  # not modified in place (raw logprobs read it)
    # the GPU's form (shifts) masks the same tokens
    from moeserve.worker.grammar import _apply_by_shifts

    assert torch.equal(_apply_by_shifts(logits, mask), out)


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def run(engine, prompts, params) -> list[tuple[list[int], str]]:
    """(tokens, finish_reason) per prompt."""
    ids = [f"t{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(rid, prompt, p)
    out = {rid: ([], None) for rid in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            if o.finished:
                out[o.request_id] = (out[o.request_id][0], o.finish_reason)
    return [out[rid] for rid in ids]


def test_every_json_schema_output_validates_on_random_weights(engine, tok) -> None:
    s = structured_from_json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=150, temperature=1.0, seed=i, structured=s)
              for i in range(24)]
    params += [SamplingParams(max_tokens=150, temperature=0.0, structured=s)]
    results = run(engine, [[5, 6, 7, 8 + i % 5] for i in range(len(params))], params)
    for tokens, reason in results:
        assert reason == "stop", tok.decode(tokens)
        jsonschema.validate(json.loads(tok.decode(tokens)), SCHEMA)


def test_max_tokens_cutting_the_json_finishes_with_length(engine, tok) -> None:
    s = structured_from_json_schema(SCHEMA)
    (tokens, reason), = run(engine, [[5, 6, 7]], [SamplingParams(max_tokens=5, structured=s)])
    assert reason == "length" and len(tokens) == 5
    with pytest.raises(ValueError):
        json.loads(tok.decode(tokens))
    text = tok.decode(tokens)
    assert text.startswith('{"name": "') or '{"name": "'.startswith(text), text


def test_regex_and_choice(engine, tok) -> None:
    pattern = r"[a-z]{2,4}-[0-9]{3}"
    choices = ["Paris", "London", "the capital"]
    n = 8
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                             structured=StructuredOutput("regex", pattern)) for i in range(n)]
    params += [SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                              structured=StructuredOutput("choice", json.dumps(choices)))
               for i in range(n)]
    results = run(engine, [[9, 10, 11]] * (2 * n), params)
    for tokens, reason in results[:n]:
        assert reason == "stop" and re.fullmatch(pattern, tok.decode(tokens))
    for tokens, reason in results[n:]:
        assert reason == "stop" and tok.decode(tokens) in choices


def test_migrated_request_replays_its_tokens_into_a_fresh_matcher(engine, tok) -> None:
    """As the router resumes a request on another worker: prompt + the tokens sent, with
    replay = their count; the joined output still validates."""
    s = structured_from_json_schema(SCHEMA)
    prompt = [5, 6, 7]
    (head, reason), = run(engine, [prompt], [SamplingParams(max_tokens=7, temperature=1.0,
                                                            seed=3, structured=s)])
    assert reason == "length"
    resumed = SamplingParams(max_tokens=143, temperature=1.0, seed=4,
                             structured=StructuredOutput(s.kind, s.spec, replay=len(head)))
    (tail, reason), = run(engine, [prompt + head], [resumed])
    assert reason == "stop"
    jsonschema.validate(json.loads(tok.decode(head + tail)), SCHEMA)


def test_async_scheduling_keeps_the_constraint_beside_free_requests(model_dir, tok) -> None:
    """Steps scheduled ahead still mask constrained rows with their previous token."""
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128,
                                 async_scheduling="on"))
    deferred = []
    sample_pending = eng.runner.sample_pending

    def counted(pending):
        deferred.append(len(pending.sample_reqs))
        return sample_pending(pending)

    eng.runner.sample_pending = counted
    s = StructuredOutput("choice", json.dumps(["alpha", "beta gamma"]))
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=i,
                             structured=s if i % 2 else None, ignore_eos=not i % 2)
              for i in range(8)]
    results = run(eng, [[3, 4, 5]] * 8, params)
    for i, (tokens, reason) in enumerate(results):
        if i % 2:
            assert tok.decode(tokens) in ("alpha", "beta gamma") and reason == "stop"
        else:
            assert len(tokens) == 30
    # constrained rows were stepped ahead too: forward queued, sampled once the token arrived
    assert deferred


def test_a_schema_that_panics_the_engine_is_a_400_not_a_crash() -> None:
    # llguidance 1.9 panics (a Rust panic, a BaseException in Python) cutting this error
    # message inside a multi-byte character; found by fuzzing
    schema = {"minimum": [[None, "a" + "\U000efbdd" * 40]]}
    with pytest.raises(InvalidRequestError, match="cannot be compiled") as e:
        structured_from_json_schema(schema)
    assert e.value.param == "response_format"


def test_worker_compile_error_and_a_rejected_token_end_the_output(engine) -> None:
    from moeserve.worker.grammar import Grammars

    compiler = engine.runner.grammars.compiler
    with pytest.raises(InvalidRequestError, match="cannot be compiled") as e:
        compiler.compile(StructuredOutput("regex", "(("))
    assert e.value.param == "structured_outputs"
    grammars = Grammars(compiler, torch.device("cpu"))

    class Req:
        request_id = "r"
        prompt_token_ids = [5]
        sampling_params = SamplingParams(structured=StructuredOutput("choice", '["ab"]'))
        output_token_ids: list[int] = []

    allowed = grammars.bitmask([Req], [0])
    eos = compiler.eos_token_id
    # a token the grammar never allowed (a peer that sampled without it): only EOS remains
    bad = next(t for t in range(compiler.vocab_size)
               if t != eos and not (allowed[0, t // 32] >> (t % 32)) & 1)
    Req.output_token_ids = [bad]
    after = apply_token_bitmask(torch.zeros(1, compiler.vocab_size), grammars.bitmask([Req], [0]))
    assert torch.isfinite(after[0]).nonzero().flatten().tolist() == [eos]
