"""A Python client generated from the live app's /openapi.json with openapi-python-client
drives the app as its users would: the document is good enough to build a client from, and
the client's names are the operations' (`create_invoice.sync`, `pay_invoice.sync`, ...)."""

import importlib
import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest

from tests.support import UNKNOWN_ID, WORK_CARD, make_key

PACKAGE = "invoice_api_client"


@pytest.fixture(scope="module")
def generated(live_server_with_auth: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The generated package, imported; any warning of the generator fails the test."""
    where = tmp_path_factory.mktemp("generated")
    document = where / "openapi.json"
    document.write_bytes(httpx.get(f"{live_server_with_auth}/openapi.json").content)
    config = where / "config.yaml"
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    generator = [sys.executable, "-m", "openapi_python_client", "generate"]
    options = ["--path", str(document), "--meta", "none", "--config", str(config)]
    output = ["--output-path", str(where / PACKAGE), "--fail-on-warning"]
    subprocess.run([*generator, *options, *output], check=True, capture_output=True, text=True)
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))
        for name in [module for module in sys.modules if module.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def operation(name: str) -> Any:
    """One operation's module: `operation("invoices.pay_invoice").sync(...)`."""
    return importlib.import_module(f"{PACKAGE}.api.{name}")


def test_a_generated_client_creates_pays_pages_and_reads_errors(
    generated: Any, live_server_with_auth: str
) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    _, secret = make_key("write")
    client = generated.AuthenticatedClient(
        base_url=live_server_with_auth, token=secret, raise_on_unexpected_status=True
    )
    email = f"generated-{uuid.uuid4().hex[:8]}@example.com"

    customer = operation("customers.create_customer").sync(
        client=client, body=models.CustomerCreate(customer_name="Gen Client", customer_email=email)
    )
    created = [
        operation("invoices.create_invoice").sync(
            client=client,
            body=models.InvoiceCreate(
                job_description=f"Generated {n}", amount=10.5 + n, customer_id=customer.customer_id
            ),
        )
        for n in range(3)
    ]
    paid = operation("invoices.pay_invoice").sync(
        client=client, invoice_id=created[0].id, body=models.Card(**WORK_CARD)
    )
    pages = [
        operation("invoices.list_invoices").sync(
            client=client, customer_id=customer.customer_id, size=2, page=page
        )
        for page in (1, 2)
    ]
    missing = operation("invoices.read_invoice").sync_detailed(
        client=client, invoice_id=uuid.UUID(UNKNOWN_ID)
    )

    assert isinstance(customer, models.CustomerPublic)
    assert customer.customer_email == email
    assert [invoice.invoice_status for invoice in created] == [models.InvoiceStatus.PENDING] * 3
    assert isinstance(paid, models.InvoicePublic)
    assert paid.invoice_status == models.InvoiceStatus.PAID
    assert paid.card.number == "123456********5678"
    assert [(page.total, page.pages) for page in pages] == [(3, 2), (3, 2)]
    listed = [invoice.id for page in pages for invoice in page.items]
    assert listed == [invoice.id for invoice in reversed(created)]  # newest first
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models.ErrorDetail)
    assert missing.parsed.detail == f"Invoice {UNKNOWN_ID} not found"


def test_a_generated_client_reads_the_refusal_of_a_key_too_weak(
    generated: Any, live_server_with_auth: str
) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    name, secret = make_key("read")
    client = generated.AuthenticatedClient(base_url=live_server_with_auth, token=secret)

    refused = operation("invoices.create_invoice").sync_detailed(
        client=client,
        body=models.InvoiceCreate(job_description="Refused", amount=1, customer_id=1),
    )
    metrics = operation("operators.read_metrics").sync(client=client)

    assert refused.status_code == 403
    assert isinstance(refused.parsed, models.ErrorDetail)
    assert refused.parsed.detail == f"API key {name} may only read; POST needs a write key"
    assert "invoice_api_requests_total" in metrics
