"""Every response carries its request's id; every request is counted by its route's template."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import NO_LOCAL_MODEL, Relay, scrape, start_tokenrelay

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _requests(relay: Relay, route: str, status: int, model: str = "") -> float:
    key = f'tokenrelay_requests_total{{model="{model}",route="{route}",status="{status}"}}'
    return scrape(relay).get(key, 0.0)


def test_every_response_carries_a_request_id(relay: Relay) -> None:
    with httpx.Client(base_url=relay.url) as client:
        answers = [
            client.post("/v1/chat/completions", json=CHAT),  # the fast path
            client.post("/v1/chat/completions", json={**CHAT, "stream": True}),  # streamed
            client.get("/v1/models"),  # FastAPI's routing
            client.get("/no/such/path"),  # 404
            client.post("/v1/chat/completions", json={"model": "fake-model"}),  # 400
            client.post("/v1/chat/completions", content="{}"),  # 415, from a guard
            client.get("/v1/models", headers={"Host": "evil.example"}),  # 403, the first guard
        ]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 404, 400, 415, 403]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert all(request_id.startswith("req_") and len(request_id) == 28 for request_id in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("trace-4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("0af7651916cd43dd8448eb211c80319c.span:01", True),
        ("a" * 128, True),
        ("a" * 129, False),  # too long to repeat in every log line
        ("two words", False),
        ('"quoted"', False),
        ("-leading-dash", False),
    ],
)
def test_a_client_request_id_is_kept_when_it_is_a_sane_token(
    relay: Relay, given: str, kept: bool
) -> None:
    answer = httpx.get(f"{relay.url}/healthz", headers={"X-Request-Id": given})
    returned = answer.headers["x-request-id"]
    if kept:
        assert returned == given
    else:
        assert returned.startswith("req_") and returned != given


def test_requests_are_counted_by_route_template_model_and_status(relay: Relay) -> None:
    conversation = "/api/conversations/{conversation_id}"
    before = {
        "chat": _requests(relay, "/v1/chat/completions", 200, "fake-model"),
        "invalid": _requests(relay, "/v1/chat/completions", 400),
        "conversation": _requests(relay, conversation, 404),
        "other": _requests(relay, "other", 404),
    }
    with httpx.Client(base_url=relay.url) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "x"}).status_code == 400
        for number in range(3):  # three ids, one series
            assert client.get(f"/api/conversations/c_missing{number}").status_code == 404
        assert client.get("/wp-login.php").status_code == 404
    assert _requests(relay, "/v1/chat/completions", 200, "fake-model") == before["chat"] + 1
    assert _requests(relay, "/v1/chat/completions", 400) == before["invalid"] + 1
    assert _requests(relay, conversation, 404) == before["conversation"] + 3
    assert _requests(relay, "other", 404) == before["other"] + 1
    assert not any("c_missing" in key or "wp-login" in key for key in scrape(relay))


def test_a_page_on_an_allowed_origin_may_send_and_read_the_request_id(tmp_path: Path) -> None:
    origin = "https://app.example"
    env = {**NO_LOCAL_MODEL, "TOKENRELAY_CORS_ORIGINS": origin}
    with start_tokenrelay(tmp_path, env=env) as relay, httpx.Client(base_url=relay.url) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-request-id",
            },
        )
        answer = client.get("/healthz", headers={"Origin": origin, "X-Request-Id": "page-1"})
    assert preflight.headers["access-control-allow-headers"] == "content-type, x-request-id"
    assert answer.headers["x-request-id"] == "page-1"
    exposed = answer.headers["access-control-expose-headers"]
    assert "X-Request-Id" in [name.strip() for name in exposed.split(",")]
