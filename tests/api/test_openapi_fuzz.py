"""A property-based fuzz of the whole OpenAPI schema: no request, however odd, is a 5xx.

Schemathesis generates requests for every operation of the spec ``/openapi.json`` serves, valid
and invalid (boundary values, wrong types, odd strings with NUL included, missing fields), and
sends them to a real ``tokenrelay serve`` relaying to the fake upstream with no local model, so
every answer is quick. Once on SQLite and once on PostgreSQL, which refuses more text. Bounded
and derandomized: it takes well under a minute and finds the same thing on every run.

The spec is read from the app itself when the module is collected (schemathesis makes one test
per operation then, before any server runs; its fixture-based loader does not work with
pytest 9), and the requests go to the server started for the module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from conftest import Relay, relay_to
from fake_upstream import FakeUpstream
from storage.conftest import module_database_url, postgres_admin_url
from tokenrelay.app import create_app
from tokenrelay.config import Settings

MAX_EXAMPLES = 60
"""Generated requests per operation, mode (valid, invalid) and backend: ~40 s in all."""

__all__ = ["module_database_url", "postgres_admin_url"]  # fixtures, shared with tests/storage


@pytest.fixture(scope="module")
def fuzzed(
    module_database_url: str,
    fake_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Relay]:
    """A tokenrelay of the fuzz's own, once on SQLite and once on PostgreSQL (which refuses
    more text than SQLite does), each with a database of its own."""
    with relay_to(
        fake_upstream,
        tmp_path_factory.mktemp("fuzz"),
        env={"TOKENRELAY_DATABASE_URL": module_database_url},
    ) as relay:
        yield relay


schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
"""The spec ``/openapi.json`` serves (the same app, built without starting it)."""


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_request_is_a_server_error(case: schemathesis.Case, fuzzed: Relay) -> None:
    case.call_and_validate(base_url=fuzzed.url, checks=[not_a_server_error], timeout=30)
