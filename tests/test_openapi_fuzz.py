"""Schemathesis against the app's own OpenAPI, over real HTTP to a live server: no server
errors, every status documented, every response matching its documented schema. With AUTH=off,
and with AUTH=on and an admin key, which reaches every operation. Bounded to about a minute
each."""

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from main import app
from scripts.processes import Running
from tests.support import bearer, make_key

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_dict(app.openapi())


@pytest.fixture(scope="module")
def admin_key() -> str:
    return make_key("admin")[1]


@pytest.fixture(params=["AUTH=off", "AUTH=on"])
def target(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """The live app's URL and the headers every request sends."""
    if request.param == "AUTH=off":
        server: Running = request.getfixturevalue("live_server")
        return server.url, {}
    url: str = request.getfixturevalue("live_server_with_auth")
    return url, bearer(request.getfixturevalue("admin_key"))


@schema.parametrize()
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_openapi(case: Any, target: tuple[str, dict[str, str]]) -> None:
    base_url, headers = target
    case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)
