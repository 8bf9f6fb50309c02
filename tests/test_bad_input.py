"""Hostile or broken input gets a clear 4xx, never a 500."""

import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

VALID = {"jobDescription": "Fuzzed", "amount": 10, "customerId": 1}
CARD = {"number": "1234567812345678", "expiry": "01-2040", "name": "J Doe"}


def test_body_over_64_kib_is_413(client: TestClient) -> None:
    response = client.post("/invoice", json={**VALID, "jobDescription": "x" * 70_000})

    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large: the limit is 65536 bytes"}


def test_chunked_body_over_64_kib_is_413(http: httpx.Client) -> None:
    def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 4096

    response = http.post("/invoice", content=chunks(), headers={"Content-Type": "application/json"})

    assert response.status_code == 413


def test_malformed_json_is_422_saying_where(client: TestClient) -> None:
    response = client.post(
        "/invoice", content=b'{"amount": 1,', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["type"] == "json_invalid"
    assert error["msg"].startswith("Invalid JSON: ")


def test_body_that_is_not_utf8_is_400(client: TestClient) -> None:
    response = client.post(
        "/invoice", content=b"\xff\xfe\x00", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert "detail" in response.json()


@pytest.mark.parametrize(
    "body",
    [
        [VALID],
        "text",
        None,
        {**VALID, "jobDescription": 123},
        {**VALID, "jobDescription": ["a"]},
        {**VALID, "customerId": 1.5},
        {**VALID, "customerId": 10**30},
        {**VALID, "amount": 1e308},
        {**VALID, "amount": 1e-300},
        {**VALID, "amount": "Infinity"},
        {**VALID, "amount": "1e400"},
        {**VALID, "amount": {"value": 1}},
        {**VALID, "card": "1234567812345678"},
        {**VALID, "card": {**CARD, "number": ["1234567812345678"]}},
        {**VALID, "card": {**CARD, "name": None}},
        {**VALID, "jobDescription": "bad \ud800 surrogate"},
        {**VALID, "card": {**CARD, "name": "J \ud800 Doe"}},
    ],
)
def test_wrong_shapes_and_absurd_values_are_422(client: TestClient, body: Any) -> None:
    # json.dumps escapes lone surrogates as \ud800, as a hostile client would send them.
    response = client.post(
        "/invoice", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "text",
    [
        "Robert'); DROP TABLE invoice;--",
        "' OR '1'='1",
        "emoji 🧾💳 and RTL \u202eevil",
        "nul \x00 byte",
        "zero\u200bwidth and combining e\u0301",
    ],
)
def test_odd_but_valid_text_is_stored_verbatim(client: TestClient, text: str) -> None:
    created = client.post("/invoice", json={**VALID, "jobDescription": text})

    assert created.status_code == 201
    read = client.get(f"/invoice/{created.json()['id']}")
    assert read.json()["jobDescription"] == text


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    response = client.post("/invoice", json={**VALID, "invoiceStatus": "PAID", "id": "x"})

    assert response.status_code == 201
    assert response.json()["invoiceStatus"] == "PENDING"
    assert response.json()["id"] != "x"
