"""Plain text chunks of an SSE stream are built from a template of the protocol's own chunk
(router/http_app.py: _TextEvents): each must parse to exactly the chunk the protocol builds."""

from __future__ import annotations

import json

import pytest

from moeserve.router import protocol as P
from moeserve.router.http_app import _TextEvents

TEXTS = ["", " hello", 'quote " and \\ backslash', "line\nbreak\ttab", "\x00\x1f control",
         "ünïcödé 漢字 🙂", "\ud800 lone surrogate", "</script>", "\u2028\u2029"]


def _parse(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:-2])


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_template_events_equal_the_protocols_chunks(kind: str, with_ids: bool) -> None:
    rid, model = "cmpl-abc", 'model "quoted" \\ name'
    if kind == "completion":
        def build(i: int, text: str, ids: object) -> dict:
            return P.completion_chunk(rid, model, text, None, ids, index=i)
    else:
        def build(i: int, text: str, ids: object) -> dict:
            return P.chat_chunk(rid, model, {"content": text}, None, ids, index=i)
    events = _TextEvents(build, with_ids)
    created = None
    for index in (0, 3):
        for n, text in enumerate(TEXTS):
            ids = list(range(100_000, 100_000 + n))  # none, one, several
            got = _parse(events.event(index, text, ids))
            want = build(index, text, ids if with_ids else None)
            created = created or got["created"]
            assert got["created"] == created  # one for the whole stream
            got["created"] = want["created"]
            assert got == want


def test_a_name_holding_the_marker_falls_back_to_whole_chunks() -> None:
    from moeserve.router.http_app import _MARK

    model = f"m{_MARK}"  # the marker twice in the serialized chunk: no template
    events = _TextEvents(lambda i, text, ids: P.completion_chunk("id", model, text, None, ids,
                                                                 index=i), True)
    got = _parse(events.event(0, "x", [5, 6]))
    assert got["model"] == model and got["choices"][0]["text"] == "x"
    assert got["choices"][0]["token_ids"] == [5, 6]
