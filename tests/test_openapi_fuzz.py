"""Schemathesis against the app's own OpenAPI: no server errors, every status documented,
every response matching its documented schema. Bounded so the whole run takes about a minute."""

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


from main import app  # noqa: E402  (after conftest has pointed the settings at the test stack)

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.usefixtures("client")
@schema.parametrize()
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_openapi(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)
