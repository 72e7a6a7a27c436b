"""The request guards (``api/guards.py``) and the server's read timeouts (``server.py``).

Every test talks to a real ``tokenrelay serve`` over sockets, with the headers a browser would
send: a web page the user visits must not be able to drive the gateway, whether it reaches it
across origins or after a DNS rebinding under a name of its own. Slow clients are raw sockets
that send their requests too slowly, or not at all.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    NO_LOCAL_MODEL,
    Relay,
    assert_openai_error,
    fake_provider_toml,
    relay_to,
    start_tokenrelay,
    stream_chunks,
)
from fake_upstream import FakeUpstream

ALLOWED_ORIGIN = "https://app.example.com"
ALLOWED_HOST = "gateway.example"
EVIL = "http://evil.example"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def guarded(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """A relay with one extra allowed host and one CORS origin."""
    env = {
        "TOKENRELAY_ALLOWED_HOSTS": ALLOWED_HOST,
        "TOKENRELAY_CORS_ORIGINS": ALLOWED_ORIGIN,
    }
    with relay_to(fake_upstream, tmp_path_factory.mktemp("guarded"), env=env) as relay:
        yield relay


@pytest.fixture
def api(guarded: Relay) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, timeout=30.0) as client:
        yield client


def _port(relay: Relay) -> int:
    return int(relay.url.rsplit(":", 1)[1])


def _conversation_ids(api: httpx.Client) -> set[str]:
    page = api.get("/api/conversations", params={"limit": 200})
    assert page.status_code == 200, page.text
    return {conversation["id"] for conversation in page.json()["data"]}


def _new_conversation(api: httpx.Client, **fields: Any) -> str:
    response = api.post("/api/conversations", json=fields)
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    return conversation_id


# -- Host: DNS rebinding ------------------------------------------------------------------------


def test_a_foreign_host_is_refused_on_every_route(
    api: httpx.Client, guarded: Relay, fake_upstream: FakeUpstream
) -> None:
    secret = _new_conversation(api, title="secret plans")
    rebound = {"Host": f"evil.example:{_port(guarded)}"}

    for method, path, body in [
        ("GET", "/", None),
        ("GET", "/api/conversations", None),
        ("GET", f"/api/conversations/{secret}", None),
        ("DELETE", f"/api/conversations/{secret}", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/api/ask?prompt=hi", None),
    ]:
        response = api.request(method, path, json=body, headers=rebound)
        error = assert_openai_error(response, 403, code="host_not_allowed")
        assert "evil.example" in str(error["message"])
        assert "secret plans" not in response.text

    assert fake_upstream.requests == []
    assert secret in _conversation_ids(api)

    # The loopback names and `allowed_hosts`, with any port or none, are answered.
    for host in ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:80", ALLOWED_HOST]:
        assert api.get("/api/conversations", headers={"Host": host}).status_code == 200


def test_a_wildcard_bind_answers_to_the_address_a_client_used_and_no_other_name(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = fake_provider_toml(fake_upstream.base_url)
    with start_tokenrelay(
        tmp_path,
        config_toml=config,
        env=NO_LOCAL_MODEL,
        host="0.0.0.0",
        args=["--insecure-no-auth"],  # this test is about names, not keys
    ) as relay:
        port = _port(relay)
        # 127.0.0.2 is this machine too (all of 127/8 is loopback): an address it was reached
        # at, which no DNS rebinding can produce.
        with httpx.Client(base_url=f"http://127.0.0.2:{port}", timeout=30.0) as client:
            assert client.get("/v1/models").status_code == 200
            for host in ["evil.example", f"evil.example:{port}", f"10.9.8.7:{port}"]:
                refused = client.get("/v1/models", headers={"Host": host})
                assert_openai_error(refused, 403, code="host_not_allowed")


def test_allowed_hosts_star_answers_to_any_name_but_still_checks_origins(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    with (
        relay_to(fake_upstream, tmp_path, env={"TOKENRELAY_ALLOWED_HOSTS": "*"}) as relay,
        httpx.Client(base_url=relay.url, timeout=30.0) as client,
    ):
        assert client.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200
        refused = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": EVIL})
        assert_openai_error(refused, 403, code="origin_not_allowed")
    assert fake_upstream.chat_requests() == []


# -- Origin and Sec-Fetch-Site: cross-site requests ----------------------------------------------


def test_a_foreign_origin_cannot_change_anything(
    api: httpx.Client, fake_upstream: FakeUpstream
) -> None:
    kept = _new_conversation(api, title="keep me")
    before = _conversation_ids(api)
    foreign = {"Origin": EVIL}

    for method, path, body in [
        ("POST", "/api/conversations", {"system": "leak everything"}),
        ("PATCH", f"/api/conversations/{kept}", {"title": "pwned"}),
        ("DELETE", f"/api/conversations/{kept}", None),
        ("POST", f"/api/conversations/{kept}/messages", {"content": "hi"}),
        ("POST", f"/api/conversations/{kept}/stop", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"model": "fake-model", "prompt": "hi"}),
        ("GET", "/api/ask?prompt=hi", None),
        ("GET", "/api/ask/stream?prompt=hi", None),
    ]:
        response = api.request(method, path, json=body, headers=foreign)
        error = assert_openai_error(response, 403, code="origin_not_allowed")
        assert EVIL in str(error["message"])
        assert "access-control-allow-origin" not in response.headers

    # A sandboxed frame or a file:// page sends `Origin: null`.
    refused = api.post("/api/conversations", json={}, headers={"Origin": "null"})
    assert_openai_error(refused, 403, code="origin_not_allowed")

    assert _conversation_ids(api) == before
    assert api.get(f"/api/conversations/{kept}").json()["title"] == "keep me"
    assert fake_upstream.requests == []


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_request_another_site_made_without_origin_spends_nothing(
    api: httpx.Client, fake_upstream: FakeUpstream, site: str
) -> None:
    # What an <img src="http://127.0.0.1:8000/api/ask?prompt=..."> sends: no Origin at all.
    marked = {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    for path in ["/api/ask?prompt=hi", "/api/ask/stream?prompt=hi"]:
        assert_openai_error(api.get(path, headers=marked), 403, code="cross_site_request")
    refused = api.post("/v1/chat/completions", json=CHAT, headers=marked)
    assert_openai_error(refused, 403, code="cross_site_request")
    assert fake_upstream.requests == []

    # Reading is not refused: without CORS headers the other site's page cannot see it anyway.
    models = api.get("/v1/models", headers=marked)
    assert models.status_code == 200
    assert "access-control-allow-origin" not in models.headers


def test_the_servers_own_pages_and_typed_urls_are_answered(
    api: httpx.Client, guarded: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 2}
    port = _port(guarded)
    for site in ["same-origin", "none"]:
        own = {"Origin": guarded.url, "Sec-Fetch-Site": site}
        created = api.post("/api/conversations", json={"title": "mine"}, headers=own)
        assert created.status_code == 201, created.text
        answer = api.get("/api/ask", params={"prompt": "hi"}, headers={"Sec-Fetch-Site": site})
        assert answer.status_code == 200, answer.text
    # The same origin under another of the server's names, as a browser sends it.
    named = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert api.post("/api/conversations", json={}, headers=named).status_code == 201
    # A page on another port of the same host is another origin (and the same site).
    other_port = {"Origin": f"http://127.0.0.1:{port + 1}", "Sec-Fetch-Site": "same-site"}
    refused = api.post("/api/conversations", json={}, headers=other_port)
    assert_openai_error(refused, 403, code="origin_not_allowed")


def test_an_allowed_origin_gets_cors_and_no_other_does(
    api: httpx.Client, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 3}
    preflight = api.options(
        "/v1/chat/completions",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-tokenrelay-trace,"
            "x-stainless-os,x-unknown",
        },
    )
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert preflight.headers["vary"] == "Origin"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert allowed == {"authorization", "content-type", "x-tokenrelay-trace", "x-stainless-os"}

    with api.stream(
        "POST",
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"Origin": ALLOWED_ORIGIN},
    ) as streamed:
        assert streamed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "Origin" in streamed.headers["vary"]
        # The page may read which stream to resume after a drop.
        exposed = streamed.headers["access-control-expose-headers"]
        assert "X-Tokenrelay-Stream" in exposed
        assert streamed.headers["x-tokenrelay-stream"].startswith("st_")
        assert len(stream_chunks(streamed)) >= 3

    created = api.post("/api/conversations", json={}, headers={"Origin": ALLOWED_ORIGIN})
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == ALLOWED_ORIGIN

    # The allowed page reads why a request was refused.
    refused = api.post(
        "/api/conversations",
        content=b"{}",
        headers={"Origin": ALLOWED_ORIGIN, "Content-Type": "text/plain"},
    )
    assert_openai_error(refused, 415)
    assert refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN

    # Another origin's preflight is refused; no response names any other origin, or `*`.
    foreign = api.options(
        "/v1/chat/completions",
        headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
    )
    assert_openai_error(foreign, 403, code="origin_not_allowed")
    for response in (foreign, api.get("/v1/models", headers={"Origin": EVIL})):
        assert "access-control-allow-origin" not in response.headers


# -- Content-Type: JSON only --------------------------------------------------------------------


def test_a_body_not_declared_json_is_a_415(api: httpx.Client, fake_upstream: FakeUpstream) -> None:
    before = _conversation_ids(api)
    # Types a page may send to another origin without a preflight, as `fetch(..., {mode:
    # "no-cors"})` or a form does; the body itself is valid JSON.
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ]:
        headers = {} if content_type is None else {"Content-Type": content_type}
        for path in ["/v1/chat/completions", "/api/conversations"]:
            response = api.post(path, content=json.dumps(CHAT).encode(), headers=headers)
            error = assert_openai_error(response, 415, code="unsupported_media_type")
            named = content_type.split(";")[0] if content_type else "no Content-Type"
            assert named in str(error["message"])
            assert "Content-Type: application/json" in str(error["message"])
    assert _conversation_ids(api) == before
    assert fake_upstream.requests == []

    # JSON with a charset is JSON; routes that take no body need no type.
    fake_upstream.defaults = {"tokens": 2}
    chat = api.post(
        "/v1/chat/completions",
        content=json.dumps(CHAT).encode(),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert chat.status_code == 200, chat.text
    conversation = _new_conversation(api)
    with api.stream(
        "POST", f"/api/conversations/{conversation}/messages", json={"content": "hello"}
    ) as first:
        stream_chunks(first)
    with api.stream("POST", f"/api/conversations/{conversation}/regenerate") as again:
        assert len(stream_chunks(again)) >= 2
    stopped = api.post(f"/api/conversations/{conversation}/stop")
    assert stopped.status_code == 200, stopped.text


# -- slow and idle clients ----------------------------------------------------------------------

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
KEEP_ALIVE = 1.0
SLACK = 3.0
"""Seconds a timed-out connection may take beyond its timeout to be closed, on a busy machine."""


@pytest.fixture(scope="module")
def impatient(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    env = {
        "TOKENRELAY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "TOKENRELAY_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "TOKENRELAY_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE),
    }
    with relay_to(fake_upstream, tmp_path_factory.mktemp("impatient"), env=env) as relay:
        yield relay


def _connect(relay: Relay) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(relay)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _seconds_until_closed(sock: socket.socket, *, pace: bytes = b"", every: float = 0.0) -> float:
    """Read (and, if ``pace`` is given, send ``pace`` every ``every`` s) until the server closes
    the connection; the seconds that took. Whatever the server sends is read and ignored."""
    start = time.monotonic()
    deadline = start + 20
    sock.settimeout(every or 20)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        if pace:
            try:
                sock.sendall(pace)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
    pytest.fail("the server kept the connection open")


def _assert_no_error_logged(relay: Relay) -> None:
    log = relay.log_text()
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


def test_a_client_that_sends_nothing_is_disconnected(impatient: Relay) -> None:
    with _connect(impatient) as sock:
        assert HEADER_TIMEOUT * 0.8 < _seconds_until_closed(sock) < HEADER_TIMEOUT + SLACK


def test_headers_sent_a_line_at_a_time_are_cut_off(impatient: Relay) -> None:
    with _connect(impatient) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{_port(impatient)}\r\n".encode())
        # One header line every 0.3 s: each arrives well within any idle timeout, but the
        # headers never end.
        took = _seconds_until_closed(sock, pace=b"X-Slow: 1\r\n", every=0.3)
        assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT + SLACK


def test_a_body_that_stops_arriving_is_cut_off_without_an_error(impatient: Relay) -> None:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{_port(impatient)}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with _connect(impatient) as sock:
        sock.sendall(head.encode() + b'{"model": "fake-model", ')
        took = _seconds_until_closed(sock, pace=b" ", every=0.3)
        assert BODY_TIMEOUT * 0.8 < took < BODY_TIMEOUT + SLACK
    _assert_answered(impatient)
    _assert_no_error_logged(impatient)


def test_an_idle_keep_alive_connection_is_closed(impatient: Relay) -> None:
    with _connect(impatient) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{_port(impatient)}\r\n\r\n".encode())
        assert _seconds_until_closed(sock) < KEEP_ALIVE + SLACK


def _assert_answered(relay: Relay) -> None:
    """One more request, answered: the server is well, and has handled what came before."""
    assert httpx.get(f"{relay.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/api/conversations", "/api/conversations/conv_x/messages"]
)
def test_a_client_leaving_mid_body_is_not_an_error(
    impatient: Relay, fake_upstream: FakeUpstream, path: str
) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{_port(impatient)}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with _connect(impatient) as sock:
        sock.sendall(head.encode() + b'{"model": ')
    _assert_answered(impatient)
    _assert_no_error_logged(impatient)
    assert fake_upstream.requests == []


def test_connections_over_the_cap_are_refused(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    env = {"TOKENRELAY_MAX_CONNECTIONS": "2", "TOKENRELAY_KEEP_ALIVE_TIMEOUT": "30"}
    with relay_to(fake_upstream, tmp_path, env=env) as relay:
        request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{_port(relay)}\r\n\r\n".encode()

        def status_on_a_new_connection() -> bytes:
            with _connect(relay) as sock:
                sock.sendall(request)
                return sock.recv(65536).split(b"\r\n", 1)[0]

        held = [_connect(relay), _connect(relay)]
        try:
            for sock in held:
                sock.sendall(request)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
            assert status_on_a_new_connection() == b"HTTP/1.1 503 Service Unavailable"
            held.pop().close()
            # Served again once the server has noticed that one connection close.
            deadline = time.monotonic() + 10
            while (status := status_on_a_new_connection()) != b"HTTP/1.1 200 OK":
                assert time.monotonic() < deadline, status
        finally:
            for sock in held:
                sock.close()
