"""Schemathesis against the app's own OpenAPI, over real HTTP to a live server: no server
errors, every status documented, every response matching its documented schema. Bounded to
about a minute."""

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from main import app
from scripts.processes import Running

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_dict(app.openapi())


@schema.parametrize()
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_openapi(case: Any, live_server: Running) -> None:
    case.call_and_validate(base_url=live_server.url, checks=CHECKS)
