"""Swagger UI and ReDoc work offline, and the OpenAPI document is worth reading."""

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\\s*["']([^"']+)["']""")


def assets_of(html: str) -> list[str]:
    return [a or b for a, b in ASSET.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_app_itself(client: TestClient, page: str) -> None:
    response = client.get(page)

    assert response.status_code == 200
    assets = [url for url in assets_of(response.text) if not url.startswith("#")]
    assert assets, "the page references no scripts or styles"
    for url in assets:
        assert url.startswith("/"), f"{url} would be fetched from another host"
        fetched = client.get(url)
        assert fetched.status_code == 200, url
        assert len(fetched.content) > 100, url


def test_swagger_ui_bundle_is_the_packaged_javascript(client: TestClient) -> None:
    html = client.get("/docs").text
    (script,) = [url for url in assets_of(html) if url.endswith("swagger-ui-bundle.js")]

    response = client.get(script)

    assert "javascript" in response.headers["content-type"]
    assert "SwaggerUIBundle" in response.text


@pytest.fixture(scope="module")
def openapi(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def operations(openapi: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in openapi["paths"].items()
        for method, operation in methods.items()
    ]


def test_every_operation_has_summary_description_and_tags(openapi: dict[str, Any]) -> None:
    for method, path, operation in operations(openapi):
        assert operation.get("summary"), f"{method} {path}"
        assert operation.get("description"), f"{method} {path}"
        assert operation.get("tags"), f"{method} {path}"


def test_operation_ids_are_the_handler_names_a_client_calls(openapi: dict[str, Any]) -> None:
    ids = {
        (method, path): operation["operationId"] for method, path, operation in operations(openapi)
    }
    assert ids == {
        ("GET", "/health-check"): "health_check",
        ("GET", "/invoice/{invoice_id}"): "read_invoice",
        ("POST", "/invoice"): "create_invoice",
        ("POST", "/invoice/pay/{invoice_id}"): "pay_invoice",
        ("POST", "/invoice/cancel/{invoice_id}"): "cancel_invoice",
        ("GET", "/invoice/{invoice_id}/payments"): "read_invoice_payments",
        ("POST", "/invoice/{invoice_id}/payments/{payment_id}/resolve"): "resolve_payment",
        ("GET", "/payments"): "list_payments",
        ("GET", "/invoices"): "list_invoices",
        ("GET", "/invoices/scroll"): "scroll_invoices",
        ("POST", "/customer"): "create_customer",
        ("GET", "/customer/{customer_id}"): "read_customer",
        ("GET", "/customers"): "list_customers",
        ("GET", "/metrics"): "read_metrics",
    }


@pytest.mark.parametrize(
    ("method", "path", "codes"),
    [
        ("GET", "/health-check", {"200", "503"}),
        ("GET", "/invoice/{invoice_id}", {"200", "401", "403", "404", "422", "503"}),
        (
            "POST",
            "/invoice",
            {"201", "400", "401", "402", "403", "404", "409", "413", "422", "502", "503", "504"},
        ),
        (
            "POST",
            "/invoice/pay/{invoice_id}",
            {"201", "400", "401", "402", "403", "404", "409", "413", "422", "502", "503", "504"},
        ),
        ("GET", "/invoices", {"200", "401", "403", "422", "503"}),
        ("GET", "/invoices/scroll", {"200", "401", "403", "422", "503"}),
    ],
)
def test_every_status_an_operation_returns_is_documented_with_a_model(
    openapi: dict[str, Any], method: str, path: str, codes: set[str]
) -> None:
    responses = openapi["paths"][path][method.lower()]["responses"]

    assert set(responses) == codes
    for code, response in responses.items():
        assert "application/json" in response["content"], f"{method} {path} {code}"


def test_create_offers_the_challenge_bodies_as_named_examples(openapi: dict[str, Any]) -> None:
    body = openapi["paths"]["/invoice"]["post"]["requestBody"]["content"]["application/json"]

    examples = body["examples"]
    assert set(examples) == {"without card", "with card"}
    assert examples["without card"]["value"] == {
        "jobDescription": "Software Development and Testing",
        "amount": 199.99,
        "customerId": 2,
    }
    assert examples["with card"]["value"]["card"] == {
        "number": "1234567812345678",
        "name": "J Doe",
        "expiry": "01-2040",
    }


def test_pay_offers_the_work_card_and_a_seeded_pending_id(openapi: dict[str, Any]) -> None:
    operation = openapi["paths"]["/invoice/pay/{invoice_id}"]["post"]

    body = operation["requestBody"]["content"]["application/json"]["examples"]
    assert body["Work Card"]["value"] == {
        "number": "1234 5656 7822 5678",
        "expiry": "01-2040",
        "name": "Work Card",
    }
    (parameter,) = [parameter for parameter in operation["parameters"] if parameter["in"] == "path"]
    assert [example["value"] for example in parameter["examples"].values()] == [
        "6f53c715-0369-11f0-8d97-7c646cb7c0bc"
    ]
    assert "6f53c715-0369-11f0-8d97-7c646cb7c0bc" in operation["description"]


def test_list_documents_the_page_envelope(openapi: dict[str, Any]) -> None:
    schema = openapi["paths"]["/invoices"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    name = schema["$ref"].rsplit("/", 1)[1]

    envelope = openapi["components"]["schemas"][name]
    assert set(envelope["properties"]) == {"items", "total", "page", "size", "pages"}


@pytest.mark.parametrize("path", ["/invoice", "/invoice/pay/{invoice_id}"])
def test_both_posts_document_the_idempotency_key_header(openapi: dict[str, Any], path: str) -> None:
    parameters = openapi["paths"][path]["post"]["parameters"]

    (header,) = [parameter for parameter in parameters if parameter["in"] == "header"]
    assert header["name"] == "Idempotency-Key"
    assert header["required"] is False
    assert "Idempotent-Replayed" in header["description"]
