"""n > 1 and logprobs over the router's HTTP app with a scripted model: the official openai
client's typed models parse completions and chat, streamed and not; choices carry their
index; usage sums like OpenAI's; the other choices start once the first has its first token
(its prompt KV is then in the decode worker's prefix cache)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient

from moeserve.common.sampling import SamplingParams, TokenLogprobs
from moeserve.router.choices import choice_params
from moeserve.router.frontend import Frontend
from moeserve.router.http_app import create_app
from moeserve.router.metrics import RouterMetrics
from moeserve.router.serving import Chunk
from moeserve.router.settings import RouterSettings
from moeserve.router.tokenizer import ModelTokenizer, load_tokenizer
from moeserve.worker.tokenizer_files import write_tokenizer

LENGTH = 4


class ScriptedRouter:
    """Router.generate's interface: ``LENGTH`` tokens, seed-dependent, one per chunk, with
    logprobs when asked; records when each call started and how far the others were."""

    def __init__(self, tok: ModelTokenizer) -> None:
        self.settings = RouterSettings()
        self.tok = tok
        self.words = [tok.encode(w, add_special_tokens=False)[0]
                      for w in ("alpha", "beta", "gamma", "delta", "omega")]
        self.yielded: list[int] = []  # tokens sent, per call
        self.started_after: list[int] = []  # tokens call 0 had sent when each call started

    async def generate(self, rid, prompt, params: SamplingParams, timeout_s=None):  # noqa: ANN001, ANN201
        call = len(self.yielded)
        self.started_after.append(self.yielded[0] if self.yielded else 0)
        self.yielded.append(0)
        offset = (params.seed or 0) % len(self.words)
        for i in range(LENGTH):
            await asyncio.sleep(0.001)
            token = self.words[(offset + i) % len(self.words)]
            lps = None
            if params.logprobs is not None:
                other = self.words[(offset + i + 1) % len(self.words)]
                top = ((token, -0.25), (other, -2.0))[: params.logprobs]
                lps = [TokenLogprobs(token, -0.25, top)]
            self.yielded[call] += 1
            last = i == LENGTH - 1
            yield Chunk([token], last, "length" if last else None, num_cached_tokens=3,
                        logprobs=lps)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, vocab_size=512, bos_id=0, eos_id=1)
    return load_tokenizer(path)


@pytest.fixture
def app(tok: ModelTokenizer) -> Iterator[tuple[ScriptedRouter, openai.OpenAI]]:
    router = ScriptedRouter(tok)
    frontend = Frontend(router, tok, "m", 10**6, 512, RouterMetrics())  # type: ignore[arg-type]
    with TestClient(create_app(frontend, lambda: True)) as http:
        yield router, openai.OpenAI(base_url="http://testserver/v1", api_key="x",
                                    http_client=http, max_retries=0)


def test_choice_params_give_each_choice_its_seed():
    p = SamplingParams(seed=2**63 - 1)
    assert [c.seed for c in choice_params(p, 3)] == [2**63 - 1, 0, 1]
    assert choice_params(SamplingParams(), 2) == [SamplingParams()] * 2


def test_completions_n_with_logprobs(app):
    router, client = app
    resp = client.completions.create(model="m", prompt="hello", n=3, logprobs=2, seed=10,
                                     max_tokens=LENGTH)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.text for c in resp.choices]
    assert len(set(texts)) == 3  # seeds 10, 11, 12: different choices
    for c in resp.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == LENGTH
        assert "".join(lp.tokens) == c.text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(LENGTH)]
        assert all(len(top) == 2 for top in lp.top_logprobs)
        assert lp.token_logprobs == [-0.25] * LENGTH
    u = resp.usage
    assert u.completion_tokens == 3 * LENGTH and u.prompt_tokens == len(router.tok.encode("hello"))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The other two started once the first had its first token (prompt KV cached by then).
    assert router.started_after[0] == 0 and min(router.started_after[1:]) >= 1


def test_completions_stream_n_with_logprobs(app):
    _, client = app
    stream = client.completions.create(model="m", prompt="hello", n=2, logprobs=0, seed=3,
                                       max_tokens=LENGTH, stream=True,
                                       stream_options={"include_usage": True})
    text, tokens, finish, usage = {0: "", 1: ""}, {0: [], 1: []}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens
            assert c.logprobs.top_logprobs == [{}] * len(c.logprobs.tokens)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert all(len(tokens[i]) == LENGTH and "".join(tokens[i]) == text[i] for i in (0, 1))
    assert usage.completion_tokens == 2 * LENGTH


def test_chat_logprobs_whole_and_streamed(app):
    _, client = app
    messages = [{"role": "user", "content": "hi"}]
    resp = client.chat.completions.create(model="m", messages=messages, logprobs=True,
                                          top_logprobs=2, max_tokens=LENGTH)
    (choice,) = resp.choices
    content = choice.logprobs.content
    assert len(content) == LENGTH and "".join(c.token for c in content) == choice.message.content
    for c in content:
        assert c.logprob == -0.25 and bytes(c.bytes).decode() == c.token
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
    # no logprobs asked: none returned
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=LENGTH)
    assert plain.choices[0].logprobs is None

    stream = client.chat.completions.create(model="m", messages=messages, logprobs=True,
                                            top_logprobs=1, n=2, max_tokens=LENGTH, stream=True)
    got: dict[int, list] = {0: [], 1: []}
    roles: dict[int, list] = {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            roles[c.index].append(c.delta.role)
            if c.logprobs is not None:
                got[c.index] += c.logprobs.content
    for i in (0, 1):
        assert len(got[i]) == LENGTH and all(len(t.top_logprobs) == 1 for t in got[i])
        assert roles[i][0] == "assistant" and set(roles[i][1:]) <= {None}


def test_bad_n_and_logprobs_are_400s(app):
    _, client = app
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=3)
    assert info.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="x", n=0)
    assert info.value.body["param"] == "n"


class _Context:
    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code, details, trailing_metadata=()):  # noqa: ANN001, ANN201
        raise AssertionError(f"aborted: {code} {details}")


def test_grpc_generate_with_n_and_logprobs(tok):
    from moeserve.api import router_pb2
    from moeserve.api.wire import sampling_to_proto
    from moeserve.router.server import RouterServicer

    router = ScriptedRouter(tok)
    frontend = Frontend(router, tok, "m", 10**6, 512, RouterMetrics())  # type: ignore[arg-type]
    servicer = RouterServicer(frontend, None)  # type: ignore[arg-type]
    req = router_pb2.GenerateRequest(
        token_ids=router_pb2.TokenIds(ids=[5, 6, 7]), n=2,
        sampling=sampling_to_proto(SamplingParams(max_tokens=LENGTH, seed=1, logprobs=1)))

    async def go() -> list:
        return [m async for m in servicer.Generate(req, _Context())]

    msgs = asyncio.run(go())
    by_index: dict[int, list] = {0: [], 1: []}
    for m in msgs:
        by_index[m.index].append(m)
    for i in (0, 1):
        assert sum(len(m.token_ids) for m in by_index[i]) == LENGTH
        assert all(len(m.logprobs) == len(m.token_ids) for m in by_index[i])
        assert by_index[i][-1].finished
    assert msgs[-1].usage.completion_tokens == 2 * LENGTH and msgs[-1].usage.prompt_tokens == 3
