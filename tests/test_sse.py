"""The SSE event ids of resumable streams: framed once per chunk, read back by the openai SDK's
own decoder, and parsed strictly when a client sends them back as Last-Event-ID."""

from __future__ import annotations

import pytest
from openai._streaming import SSEDecoder

from tokenrelay.errors import InvalidRequest
from tokenrelay.sse import event_id_prefix, parse_event_id, with_event_id


def test_an_event_id_names_its_stream_and_entry_and_parses_back() -> None:
    prefix = event_id_prefix("st_abc")
    framed = with_event_id(prefix, 42, b'data: {"x": 1}\n\n')
    assert framed == b'id: st_abc:42\ndata: {"x": 1}\n\n'
    assert parse_event_id("st_abc:42") == ("st_abc", 42)
    assert parse_event_id(" st_abc:0 ", stream_id="st_abc") == ("st_abc", 0)


def test_the_openai_sdk_reads_the_id_and_every_event_of_a_chunk() -> None:
    """A chunk may hold several events; the id line leads the first and stays in force."""
    chunk = b'data: {"n": 1}\n\ndata: {"n": 2}\n\n'
    body = with_event_id(event_id_prefix("st_abc"), 7, chunk)
    events = list(SSEDecoder().iter_bytes(iter([body])))
    assert [(e.id, e.data) for e in events] == [("st_abc:7", '{"n": 1}'), ("st_abc:7", '{"n": 2}')]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "st_abc",
        "st_abc:",
        ":5",
        "st_abc:-1",
        "st_abc:1.5",
        "st abc:1",
        "st_abc:1:2",
        "st_abc:" + "9" * 19,
        "st_abc:١٢",
    ],
)
def test_a_malformed_last_event_id_is_a_400_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_event_id(value)
    assert caught.value.status == 400
    assert caught.value.to_dict()["error"]["param"] == "Last-Event-ID"


def test_an_id_from_another_stream_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_event_id("st_other:3", stream_id="st_abc", param="last_event_id")
    assert caught.value.param == "last_event_id"
