"""Properties of card normalisation, masking and amounts, over generated inputs."""

import json
import uuid
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from models import Card, InvoiceCreate, InvoicePublic, InvoiceStatus, mask_card_number


def card_from(number: str) -> Card:
    return Card.model_validate({"number": number, "expiry": "01-2040", "name": "J Doe"})


digits16 = st.text(alphabet="0123456789", min_size=16, max_size=16)
separators = st.sampled_from(["", " ", "-", "  ", " - "])


@st.composite
def grouped_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """(16 digits, the same digits with spaces and dashes between some of them)."""
    digits = draw(digits16)
    spaced = "".join(digit + draw(separators) for digit in digits)
    return digits, spaced


@given(grouped_numbers())
def test_card_number_normalises_to_its_16_digits(numbers: tuple[str, str]) -> None:
    digits, spaced = numbers

    card = card_from(spaced)

    assert card.number.get_secret_value() == digits


@given(grouped_numbers())
def test_masked_number_keeps_first_six_and_last_four(numbers: tuple[str, str]) -> None:
    digits, spaced = numbers

    masked = card_from(spaced).masked().number

    assert masked == f"{digits[:6]}********{digits[-4:]}"
    assert masked == mask_card_number(digits)


@given(grouped_numbers())
def test_card_repr_and_str_never_show_the_number(numbers: tuple[str, str]) -> None:
    digits, spaced = numbers

    card = card_from(spaced)

    assert digits not in repr(card)
    assert digits not in str(card)
    assert digits not in card.model_dump_json()


@given(
    st.text(max_size=40).filter(
        lambda text: len([c for c in text if c.isascii() and c.isdigit()]) != 16
    )
)
def test_anything_without_exactly_16_ascii_digits_is_rejected(number: str) -> None:
    with pytest.raises(ValidationError):
        card_from(number)


amounts = st.decimals(
    min_value=Decimal("0.01"), max_value=Decimal("9999999999.99"), places=2, allow_nan=False
)


@given(amounts)
def test_valid_amounts_serialise_as_the_exact_json_number(amount: Decimal) -> None:
    invoice = InvoicePublic(
        id=uuid.UUID("8176929e-5484-462b-9758-c74ac68f7892"),
        job_description="x",
        amount=amount,
        customer_id=1,
        customer_name="n",
        customer_email="e",
        invoice_status=InvoiceStatus.PENDING,
    )

    sent = json.loads(invoice.model_dump_json(by_alias=True), parse_float=Decimal)["amount"]

    assert sent == amount


@given(amounts)
def test_valid_amounts_are_accepted_unchanged(amount: Decimal) -> None:
    request = InvoiceCreate.model_validate(
        {"jobDescription": "x", "amount": str(amount), "customerId": 1}
    )

    assert request.amount == amount


@given(
    st.decimals(min_value=Decimal("0.001"), max_value=Decimal("100000"), places=3).filter(
        lambda amount: amount != amount.quantize(Decimal("0.01"))
    )
)
def test_three_decimal_places_are_rejected_never_rounded(amount: Decimal) -> None:
    with pytest.raises(ValidationError, match="no more than 2 decimal places"):
        InvoiceCreate.model_validate(
            {"jobDescription": "x", "amount": str(amount), "customerId": 1}
        )
