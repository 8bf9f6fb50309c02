"""POST /customer, GET /customer/{customer_id}, GET /customers."""

import uuid

import pytest
from fastapi.testclient import TestClient


def unique_email() -> str:
    return f"customer.{uuid.uuid4().hex[:12]}@example.com"


def test_create_customer_is_201_with_its_id(client: TestClient) -> None:
    email = unique_email()

    response = client.post(
        "/customer", json={"customerName": "Ada Lovelace", "customerEmail": email}
    )

    assert response.status_code == 201
    data = response.json()
    assert isinstance(data.pop("customerId"), int)
    assert data == {"customerName": "Ada Lovelace", "customerEmail": email}


def test_a_new_customer_can_be_read_and_invoiced(client: TestClient) -> None:
    body = {"customerName": "Grace Hopper", "customerEmail": unique_email()}
    created = client.post("/customer", json=body).json()

    read = client.get(f"/customer/{created['customerId']}")
    invoice = client.post(
        "/invoice",
        json={"jobDescription": "Compiler", "amount": 1, "customerId": created["customerId"]},
    )

    assert read.status_code == 200
    assert read.json() == created
    assert invoice.status_code == 201
    assert invoice.json()["customerEmail"] == body["customerEmail"]


def test_an_email_taken_in_any_case_is_409(client: TestClient) -> None:
    email = unique_email()
    client.post("/customer", json={"customerName": "First", "customerEmail": email})

    response = client.post(
        "/customer",
        json={
            "customerName": "Second",
            "customerEmail": email.upper().replace("@EXAMPLE.COM", "@example.com"),
        },
    )

    assert response.status_code == 409
    assert "already exists" in response.json()["detail"]


def test_a_seeded_email_is_taken(client: TestClient) -> None:
    body = {"customerName": "Someone", "customerEmail": "John.Doe@example.com"}

    response = client.post("/customer", json=body)

    assert response.status_code == 409


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customerName": "A", "customerEmail": "not-an-email"}, "customerEmail"),
        ({"customerName": "A", "customerEmail": "a@b"}, "customerEmail"),
        ({"customerName": "A", "customerEmail": "x" * 250 + "@example.com"}, "customerEmail"),
        ({"customerName": "", "customerEmail": "a@example.com"}, "customerName"),
        ({"customerName": " \u200b ", "customerEmail": "a@example.com"}, "customerName"),
        ({"customerName": "A" * 101, "customerEmail": "a@example.com"}, "customerName"),
        ({"customerEmail": "a@example.com"}, "customerName"),
    ],
)
def test_invalid_customer_is_422_naming_the_field(
    client: TestClient, body: dict[str, str], field: str
) -> None:
    response = client.post("/customer", json=body)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


def test_read_seeded_customer(client: TestClient) -> None:
    response = client.get("/customer/3")

    assert response.status_code == 200
    assert response.json() == {
        "customerId": 3,
        "customerName": "Seth Hall",
        "customerEmail": "seth.hall@paymark.co.nz",
    }


def test_read_unknown_customer_is_404(client: TestClient) -> None:
    response = client.get("/customer/99999999")

    assert response.status_code == 404
    assert response.json() == {"detail": "Customer 99999999 not found"}


@pytest.mark.parametrize("customer_id", ["0", "x", "3000000000"])
def test_read_malformed_customer_id_is_422(client: TestClient, customer_id: str) -> None:
    response = client.get(f"/customer/{customer_id}")

    assert response.status_code == 422


def test_customers_are_listed_by_id_in_page_envelopes(client: TestClient) -> None:
    client.post("/customer", json={"customerName": "Listed", "customerEmail": unique_email()})

    first = client.get("/customers", params={"size": 2}).json()
    second = client.get("/customers", params={"size": 2, "page": 2}).json()

    assert first["total"] == second["total"] >= 6
    assert first["pages"] == -(-first["total"] // 2)
    ids = [c["customerId"] for c in first["items"] + second["items"]]
    assert ids == sorted(ids)
    assert ids[:2] == [1, 2]


@pytest.mark.parametrize(
    ("stored", "other"),
    [
        ("é@exämple.com", "e@example.com"),
        ("ß@strasse.de", "ss@strasse.de"),
        ("jose@x.com", "josé@x.com"),
    ],
)
def test_emails_that_differ_by_more_than_case_are_two_customers(
    client: TestClient, stored: str, other: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    first, second = (f"{tag}.{email}" for email in (stored, other))

    created = client.post("/customer", json={"customerName": "One", "customerEmail": first})
    another = client.post("/customer", json={"customerName": "Two", "customerEmail": second})

    assert created.status_code == 201
    assert another.status_code == 201, another.text
    assert another.json()["customerId"] != created.json()["customerId"]
