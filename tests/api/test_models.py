"""``GET /v1/models`` lists what every provider serves; the service documents itself."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import NO_LOCAL_MODEL, Relay, fake_provider_toml, start_tokenrelay
from fake_upstream import FakeUpstream


def test_models_lists_the_providers_models(openai_client: openai.OpenAI) -> None:
    models = list(openai_client.models.list())

    ids = [model.id for model in models]
    assert set(ids) == {"fake-model", "fake-other"}
    assert {model.object for model in models} == {"model"}


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["other-1", "other-2", "shared"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def two_provider_relay(
    fake_upstream: FakeUpstream,
    second_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Relay]:
    """One provider with a fixed list, one serving whatever its upstream lists."""
    toml = fake_provider_toml(
        fake_upstream.base_url, name="fixed", models=("alpha", "beta", "shared")
    ) + fake_provider_toml(second_upstream.base_url, name="listed", models=("*",))
    with start_tokenrelay(
        tmp_path_factory.mktemp("two-providers"), config_toml=toml, env=NO_LOCAL_MODEL
    ) as running:
        yield running


def test_models_is_the_union_of_all_providers(two_provider_relay: Relay) -> None:
    with openai.OpenAI(base_url=two_provider_relay.v1, api_key="unused", max_retries=0) as client:
        ids = [model.id for model in client.models.list()]

    assert sorted(ids) == ["alpha", "beta", "other-1", "other-2", "shared"]


def test_requests_go_to_the_provider_serving_the_model(
    two_provider_relay: Relay, fake_upstream: FakeUpstream, second_upstream: FakeUpstream
) -> None:
    second_upstream.reset()
    with openai.OpenAI(base_url=two_provider_relay.v1, api_key="unused", max_retries=0) as client:
        client.chat.completions.create(
            model="other-2", messages=[{"role": "user", "content": "hi"}]
        )
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}])

    assert second_upstream.last_request().json["model"] == "other-2"
    assert fake_upstream.last_request().json["model"] == "beta"


def test_openapi_and_docs_answer(relay: Relay) -> None:
    spec = httpx.get(f"{relay.url}/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/api/ask"):
        assert path in paths

    docs = httpx.get(f"{relay.url}/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")


def test_health_answers(relay: Relay) -> None:
    response = httpx.get(f"{relay.url}/health")
    assert response.status_code == 200
