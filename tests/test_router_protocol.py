"""OpenAI request validation: every bad field becomes a 400 error object naming it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moeserve.common.errors import InvalidRequestError, ResourceExhaustedError
from moeserve.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    completion_chunk,
    completion_response,
    error_from_exception,
    usage_dict,
)


def _error(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    status, err = error_from_exception(info.value)
    assert status == 400
    return err["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "n": 129}, "n"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "frequency_penalty": "lots"}, "frequency_penalty"),
        ({"prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias"),
        ({"prompt": "x", "stream_options": {"include_usage": "maybe"}}, "stream_options"),
    ],
)
def test_completion_errors_name_the_field(body: dict, param: str) -> None:
    err = _error(CompletionRequest, body)
    assert err["type"] == "invalid_request_error"
    assert err["param"].startswith(param), err
    assert param in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 200}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
          "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_chat_errors_name_the_field(body: dict, param: str) -> None:
    assert _error(ChatCompletionRequest, body)["param"].startswith(param)


def test_sampling_bounds_are_checked_by_sampling_params() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "top_p": 0})
    with pytest.raises(InvalidRequestError) as info:
        req.sampling_params(default_max_tokens=16)
    status, body = error_from_exception(info.value)
    assert status == 400 and body["error"]["param"] == "top_p"


def test_valid_requests_normalise() -> None:
    req = CompletionRequest.model_validate(
        {
            "prompt": [[5, 6, 7]],
            "max_tokens": 4,
            "temperature": 0,
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": "\n",
            "return_token_ids": True,
            "user": "u-1",
        }  # fmt: skip
    )
    assert req.prompt == [5, 6, 7] and req.include_usage and req.stop_strings == ["\n"]
    params = req.sampling_params(default_max_tokens=16)
    assert params.max_tokens == 4 and params.greedy and params.seed == 3
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7,
        }  # fmt: skip
    )
    assert chat.messages[0].content == "hi"
    assert chat.sampling_params(default_max_tokens=100).max_tokens == 7
    assert CompletionRequest.model_validate({"prompt": "x"}).sampling_params(16).max_tokens == 16


def test_error_mapping_and_response_shapes() -> None:
    status, body = error_from_exception(ResourceExhaustedError("too many requests in flight"))
    assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
    status, body = error_from_exception(RuntimeError("boom"))
    assert status == 500 and "boom" not in body["error"]["message"]
    usage = usage_dict(3, 2, cached_tokens=1)
    assert usage["total_tokens"] == 5
    resp = completion_response("id", "m", "ab", "length", usage, token_ids=[1, 2])
    assert resp["choices"][0]["token_ids"] == [1, 2] and resp["object"] == "text_completion"
    assert completion_chunk("id", "m", None, usage=usage)["choices"] == []
    chunk = chat_chunk("id", "m", {"content": "x"}, "stop")
    assert chunk["choices"][0]["finish_reason"] == "stop" and "usage" not in chunk
