"""Structured outputs end to end on CPU through the official `openai` client: a prefill worker
samples the first token under the grammar, decode workers continue it, and a decode worker that
drops its streams makes requests migrate mid-output (the new worker replays the tokens sent
into a fresh matcher). Every output must parse; a schema the engine cannot compile is a 400
within 1 s."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from moeserve.deploy.local import ClusterSpec, LocalCluster
from tests.reliability_helpers import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "tiny-deepseek-v3"


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    city: Literal["Paris", "London", "Rome"]
    ok: bool
    n: int = Field(ge=0, le=99)
    tags: list[Literal["x", "yz"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def cluster(model_dir: Path):
    spec = ClusterSpec(
        model=str(model_dir), prefill=1, decode=2, port=0, num_kv_blocks=256, metrics=True,
        disagg_threshold=0,
        child_args={"decode-0": ["--faults", "drop_stream_after=4"],
                    "router": ["--policy", "random"]},
    )  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        yield c


def _client(c: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_parse_json_schema_over_prefill_decode_and_migration(cluster) -> None:
    client = _client(cluster)
    for seed in range(8):
        resp = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": f"answer {seed}"}],
            response_format=Answer, max_tokens=120, temperature=1.0, seed=seed,
        )  # fmt: skip
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Answer)
    assert metric(f"{cluster.url}/metrics", "moeserve:router_migrations_total") >= 1
    assert metric(f"{cluster.url}/metrics", "moeserve:router_disaggregated_requests_total",
                  'mode="remote"') >= 1


def test_streamed_json_object_and_low_max_tokens(cluster) -> None:
    client = _client(cluster)
    schema = Answer.model_json_schema()
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream"}], response_format=rf,
        max_tokens=120, temperature=1.0, seed=11, stream=True,
    )  # fmt: skip
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    cut = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "cut"}], max_tokens=3,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content.startswith("{")


def test_regex_and_choice_on_completions(cluster) -> None:
    client = _client(cluster)
    for seed in range(3):
        r = client.completions.create(
            model=MODEL, prompt="code:", max_tokens=30, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"regex": r"[a-z]{2,4}-[0-9]{3}"}},
        )  # fmt: skip
        assert re.fullmatch(r"[a-z]{2,4}-[0-9]{3}", r.choices[0].text), r.choices[0].text
        c = client.completions.create(
            model=MODEL, prompt="pick:", max_tokens=30, temperature=1.0, seed=seed,
            extra_body={"guided_choice": ["yes", "no", "maybe not"]},
        )  # fmt: skip
        assert c.choices[0].text in ("yes", "no", "maybe not")
        assert c.choices[0].finish_reason == "stop"


def test_uncompilable_schema_is_a_400_within_a_second(cluster) -> None:
    client = _client(cluster)
    rf = {"type": "json_schema",
          "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
              "a": {"$ref": "#/definitions/missing"}}}}}
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format=rf, max_tokens=8)  # fmt: skip
    assert time.monotonic() - start < 1.0
    body = e.value.body
    assert body["param"] == "response_format.json_schema.schema" and "missing" in body["message"]


def test_router_grpc_carries_the_constraint_and_refuses_a_bad_one(cluster) -> None:
    import grpc

    from moeserve.api import common_pb2, router_pb2, router_pb2_grpc

    def generate(stub, kind: str, spec: str):
        req = router_pb2.GenerateRequest(
            text="pick:", detokenize=True, sampling=common_pb2.SamplingParams(
                max_tokens=30, temperature=1.0, seed=5,
                structured=common_pb2.StructuredOutput(kind=kind, spec=spec)))
        return list(stub.Generate(req, timeout=60))

    with grpc.insecure_channel(cluster.grpc_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        msgs = generate(stub, "choice", json.dumps(["yes", "no"]))
        assert "".join(m.text for m in msgs) in ("yes", "no")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            generate(stub, "regex", "((")
        assert time.monotonic() - start < 1.0
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unclosed group" in e.value.details()
