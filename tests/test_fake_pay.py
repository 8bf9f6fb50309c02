"""fake_pay.py over real HTTP: each rule, in order, with its exact reason."""

from typing import Any

import httpx
import pytest

from tests.support import FakePayProcess

VALID_ID = "8176929e-5484-462b-9758-c74ac68f7892"
VALID_CARD = {"number": "1234567812345678", "expiry": "01-2040", "name": "J Doe"}


def post(fakepay: FakePayProcess, content: bytes | str) -> httpx.Response:
    return httpx.post(
        fakepay.url, content=content, headers={"Content-Type": "application/json"}, timeout=5
    )


def post_json(fakepay: FakePayProcess, body: Any) -> httpx.Response:
    return httpx.post(fakepay.url, json=body, timeout=5)


def assert_rejected(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "payment failed", "reason": reason}


def test_valid_payment_succeeds(fakepay: FakePayProcess) -> None:
    response = post_json(fakepay, {"transactionId": VALID_ID, "card": VALID_CARD})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "Payment processed successfully"}


def test_non_json_body_is_invalid_json_payload(fakepay: FakePayProcess) -> None:
    response = post(fakepay, "{not json")

    assert response.status_code == 400
    data = response.json()
    assert data["error"] == "Invalid JSON payload"
    assert "Expecting property name" in data["reason"]


@pytest.mark.parametrize("body", ["[1, 2]", '"text"', "42", "null"])
def test_json_that_is_not_an_object_is_rejected(fakepay: FakePayProcess, body: str) -> None:
    response = post(fakepay, body)

    assert_rejected(response, "Incorrect body format supplied, I need to extract dict from json")


def test_missing_transaction_id_is_rejected(fakepay: FakePayProcess) -> None:
    assert_rejected(post_json(fakepay, {"card": VALID_CARD}), "Missing transactionId")


def test_missing_card_is_rejected(fakepay: FakePayProcess) -> None:
    assert_rejected(post_json(fakepay, {"transactionId": VALID_ID}), "Missing Card Object")


def test_missing_transaction_id_is_reported_before_missing_card(
    fakepay: FakePayProcess,
) -> None:
    assert_rejected(post_json(fakepay, {}), "Missing transactionId")


@pytest.mark.parametrize(
    "transaction_id",
    ["8176929e5484462b9758c74ac68f7892", "8176929e-5484-462b-9758-c74ac68f789", "zz", 7],
)
def test_transaction_id_must_be_a_uuid(fakepay: FakePayProcess, transaction_id: object) -> None:
    response = post_json(fakepay, {"transactionId": transaction_id, "card": VALID_CARD})

    assert_rejected(response, "Invalid transactionId. It must match UUID")


@pytest.mark.parametrize(
    "number", ["123456781234567", "12345678123456789", "1234 5678 1234 5678", "abcd567812345678"]
)
def test_card_number_must_be_16_digits(fakepay: FakePayProcess, number: str) -> None:
    card = {**VALID_CARD, "number": number}

    response = post_json(fakepay, {"transactionId": VALID_ID, "card": card})

    assert_rejected(response, "Invalid card pan. It must be a 16-digit number.")


@pytest.mark.parametrize("expiry", ["13-2040", "00-2040", "1-2040", "01/2040", "01-40"])
def test_card_expiry_must_be_mm_yyyy(fakepay: FakePayProcess, expiry: str) -> None:
    card = {**VALID_CARD, "expiry": expiry}

    response = post_json(fakepay, {"transactionId": VALID_ID, "card": card})

    assert_rejected(response, "Invalid card expiry. It must be in MM-YYYY format.")


@pytest.mark.parametrize("name", ["J. Doe", "J0hn", "", "Zoë"])
def test_card_name_must_be_letters_and_spaces(fakepay: FakePayProcess, name: str) -> None:
    card = {**VALID_CARD, "name": name}

    response = post_json(fakepay, {"transactionId": VALID_ID, "card": card})

    assert_rejected(response, "Invalid card name. It must contain only letters and spaces.")


def test_rules_apply_in_order_uuid_before_card(fakepay: FakePayProcess) -> None:
    bad_card = {"number": "1", "expiry": "x", "name": "1"}

    response = post_json(fakepay, {"transactionId": "nope", "card": bad_card})

    assert_rejected(response, "Invalid transactionId. It must match UUID")


def test_other_paths_are_not_found(fakepay: FakePayProcess) -> None:
    base = fakepay.url.removesuffix("/fakepay")

    assert httpx.post(f"{base}/other", json={}, timeout=5).status_code == 404
    assert httpx.get(fakepay.url, timeout=5).status_code == 404


def test_log_line_masks_the_card_number(fakepay: FakePayProcess) -> None:
    transaction_id = "0f53c715-0369-11f0-8d97-7c646cb7c0bc"

    post_json(fakepay, {"transactionId": transaction_id, "card": VALID_CARD})

    (entry,) = fakepay.requests_for(transaction_id)
    assert entry["request"]["card"]["number"] == "123456********5678"
    assert entry["status"] == 200
    assert "1234567812345678" not in fakepay.server.log_path.read_text()
