"""Each key sees only its own: another key's conversations and stored responses are not
there for it (404, as if they did not exist), listed nowhere, and cannot be continued."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from access.conftest import ADMIN, ADMIN_KEY, bearer, make_key
from conftest import Relay, assert_openai_error, relay_to
from fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def keyed(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with relay_to(
        fake_upstream, tmp_path_factory.mktemp("owners"), env={"TOKENRELAY_ADMIN_KEY": ADMIN_KEY}
    ) as relay:
        yield relay


def test_a_conversation_is_its_keys_alone(keyed: Relay) -> None:
    alice, bob = bearer(make_key(keyed, "alice-c")), bearer(make_key(keyed, "bob-c"))
    url = f"{keyed.url}/api/conversations"
    made = httpx.post(url, json={"model": "fake-model", "title": "secret plans"}, headers=alice)
    conversation = made.json()["id"]
    answer = httpx.post(f"{url}/{conversation}/messages", json={"content": "Hi"}, headers=alice)
    assert answer.status_code == 200
    assert [c["id"] for c in httpx.get(url, headers=alice).json()["data"]] == [conversation]
    for other in (bob, ADMIN):
        assert httpx.get(url, headers=other).json()["data"] == []
    for method, path, body in (
        ("GET", "", None),
        ("PATCH", "", {"title": "mine now"}),
        ("POST", "/messages", {"content": "Hello?"}),
        ("POST", "/regenerate", {}),
        ("POST", "/stop", None),
        ("DELETE", "", None),
    ):
        response = httpx.request(
            method, f"{url}/{conversation}{path}", json=body, headers=bob, timeout=10
        )
        assert_openai_error(response, 404)
    detail = httpx.get(f"{url}/{conversation}", headers=alice).json()
    assert detail["title"] == "secret plans" and len(detail["messages"]) == 2


def test_a_stored_response_is_its_keys_alone(keyed: Relay) -> None:
    alice, bob = bearer(make_key(keyed, "alice-r")), bearer(make_key(keyed, "bob-r"))
    made = httpx.post(
        f"{keyed.v1}/responses", json={"model": "fake-model", "input": "Hi"}, headers=alice
    )
    assert made.status_code == 200, made.text
    response_id = made.json()["id"]
    assert httpx.get(f"{keyed.v1}/responses/{response_id}", headers=alice).status_code == 200
    for method, path in (
        ("GET", ""),
        ("GET", "/input_items"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ):
        response = httpx.request(method, f"{keyed.v1}/responses/{response_id}{path}", headers=bob)
        assert_openai_error(response, 404)
    chained = httpx.post(
        f"{keyed.v1}/responses",
        json={"model": "fake-model", "input": "And?", "previous_response_id": response_id},
        headers=bob,
    )
    assert_openai_error(chained, 404, param="previous_response_id")
    mine = httpx.post(
        f"{keyed.v1}/responses",
        json={"model": "fake-model", "input": "And?", "previous_response_id": response_id},
        headers=alice,
    )
    assert mine.status_code == 200, mine.text
