"""What the OpenAPI document says beyond the routes: description, tags, examples, error tables.

Kept apart from `main.py` so the routes read without scrolling past it. Every example works in
Swagger UI's Try it out against the seeded database.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import Example

from errors import Responses
from models import ErrorDetail

TITLE = "Invoice API"
SUMMARY = "Create invoices, pay them by card through FakePay, and list them page by page."
DESCRIPTION = """
Invoices for customers, paid by card through the FakePay provider.

* Field names are camelCase; `amount` is an exact decimal with at most two places.
* Card numbers are only ever shown masked (`123456********5678`).
* Every error body is `{"detail": ...}` with a message that says what to do.

Seeded data to try: customers 1-5; PENDING invoices `6f53c715-0369-11f0-8d97-7c646cb7c0bc`
and `6f53c7be-0369-11f0-8d97-7c646cb7c0bc`; CANCELLED `a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc`.
"""
TAGS = [
    {"name": "invoices", "description": "Create, pay, cancel, read and list invoices."},
    {"name": "customers", "description": "Create, read and list the customers invoices are for."},
    {"name": "operators", "description": "Resolve unknown payment outcomes, find refunds due."},
    {"name": "health", "description": "Is the service able to reach its database?"},
]

BAD_BODY: Responses = {
    400: {"model": ErrorDetail, "description": "The body could not be read (it is not UTF-8 text)"},
    413: {"model": ErrorDetail, "description": "The body is larger than 64 KiB"},
}

SEEDED_PENDING_ID = "6f53c715-0369-11f0-8d97-7c646cb7c0bc"
READ_EXAMPLES: dict[str, Example] = {
    "the challenge's CANCELLED invoice": {"value": "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc"},
    "a seeded PENDING invoice": {"value": SEEDED_PENDING_ID},
}
PAY_ID_EXAMPLES: dict[str, Example] = {"seeded PENDING invoice": {"value": SEEDED_PENDING_ID}}
CANCEL_ID_EXAMPLES: dict[str, Example] = {
    "the other seeded PENDING invoice": {"value": "6f53c7be-0369-11f0-8d97-7c646cb7c0bc"},
    "the seeded CANCELLED invoice (cancelling again changes nothing)": {
        "value": "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc"
    },
}
CUSTOMER_EXAMPLES: dict[str, Example] = {
    "a new customer": {
        "summary": "Its email must not be taken yet",
        "value": {"customerName": "Ada Lovelace", "customerEmail": "ada.lovelace@example.com"},
    }
}
CREATE_EXAMPLES: dict[str, Example] = {
    "without card": {
        "summary": "A PENDING invoice",
        "value": {
            "jobDescription": "Software Development and Testing",
            "amount": 199.99,
            "customerId": 2,
        },
    },
    "with card": {
        "summary": "An invoice paid at once",
        "value": {
            "jobDescription": "Software License Fee",
            "amount": 99.99,
            "customerId": 1,
            "card": {"number": "1234567812345678", "name": "J Doe", "expiry": "01-2040"},
        },
    },
}
PAY_EXAMPLES: dict[str, Example] = {
    "Work Card": {
        "summary": "The challenge's card, spaces and all",
        "value": {"number": "1234 5656 7822 5678", "expiry": "01-2040", "name": "Work Card"},
    }
}


def invalid(
    location: tuple[str, str], message: str, kind: str = "value_error"
) -> RequestValidationError:
    """A 422 for a rule checked outside a model, in the same shape as pydantic's."""
    return RequestValidationError([{"type": kind, "loc": location, "msg": message}])


def document_validation_errors(app: FastAPI) -> None:
    """Make the documented 422 body what the API sends: FastAPI's `{"detail": [{"type", "loc",
    "msg"}]}` without the `input` and `ctx` it would echo (they may hold a card number)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        error = schema.get("components", {}).get("schemas", {}).get("ValidationError")
        if error is not None:
            for echoed in ("input", "ctx"):
                error["properties"].pop(echoed, None)
            error["additionalProperties"] = False
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
