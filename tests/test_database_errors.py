"""Only an outage is "database unavailable": any other error of the server is a 500 that
carries the request id, and is logged with it."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from observability import INTERNAL_ERROR
from scripts.schema import admin_connection
from tests.support import settings

REFUSED_NAME = "Refused By Check"


@pytest.fixture
def check_refusing_a_name(database: None) -> Iterator[None]:
    """A CHECK constraint the app knows nothing about: the server refuses one customer name
    (MariaDB error 4025, MySQL 3819, both raised by PyMySQL as OperationalError)."""
    with admin_connection(settings, settings.db_name) as connection, connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE customer ADD CONSTRAINT ck_test_refused CHECK "
            f"(customer_name <> '{REFUSED_NAME}')"
        )
        try:
            yield
        finally:
            cursor.execute("ALTER TABLE customer DROP CONSTRAINT ck_test_refused")


def test_a_statement_the_server_refuses_is_a_500_not_an_outage(
    client: TestClient, check_refusing_a_name: None
) -> None:
    body = {"customerName": REFUSED_NAME, "customerEmail": "refused@example.com"}

    response = client.post("/customer", json=body)

    assert response.status_code == 500
    assert response.json() == INTERNAL_ERROR
    assert "Retry-After" not in response.headers
    assert response.headers["X-Request-ID"]


def test_a_refused_statement_is_logged_with_the_request_id(
    client: TestClient, check_refusing_a_name: None, app_log: Path
) -> None:
    body = {"customerName": REFUSED_NAME, "customerEmail": "refused@example.com"}

    request_id = client.post("/customer", json=body).headers["X-Request-ID"]

    logged = [line for line in app_log.read_text().splitlines() if request_id in line]
    assert any('"unhandled error' in line and "ck_test_refused" in line for line in logged)
