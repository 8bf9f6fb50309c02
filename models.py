"""Tables and API schemas.

Wire names are camelCase as in the original challenge; Python names are snake_case. The full
card number lives only in `Card` (as a secret, so no repr or log line can show it) and in the
outbound provider request; tables and responses hold the masked form.
"""

import base64
import random
import re
import secrets
import unicodedata
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, EmailStr, SecretStr, field_serializer, field_validator
from pydantic import Field as PydanticField
from pydantic.alias_generators import to_camel
from sqlalchemy import (
    CHAR,
    DECIMAL,
    BigInteger,
    CheckConstraint,
    Column,
    Computed,
    Index,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.mysql import DATETIME, TINYINT, VARCHAR
from sqlmodel import Field, SQLModel

CARD_NUMBER_SEPARATORS = re.compile(r"[ -]")
CARD_NUMBER = re.compile(r"[0-9]{16}")
CARD_EXPIRY = re.compile(r"(0[1-9]|1[0-2])-([0-9]{4})")
CARD_NAME = re.compile(r"[A-Za-z ]+")
# Whitespace, control and format characters (zero-width space, joiners, BOM): nothing to read.
INVISIBLE_CATEGORIES = {"Zs", "Zl", "Zp", "Cc", "Cf"}


class InvoiceStatus(StrEnum):
    PENDING = "PENDING"
    PAID = "PAID"
    CANCELLED = "CANCELLED"


class PaymentStatus(StrEnum):
    PROCESSING = "PROCESSING"  # claimed; the provider call is under way
    SUCCEEDED = "SUCCEEDED"  # provider answered 200; the invoice is PAID
    DECLINED = "DECLINED"  # provider answered 400
    FAILED = "FAILED"  # provider unreachable or answered another status
    UNKNOWN = "UNKNOWN"  # sent, no reply in time (or stalled): it may have been charged
    ABANDONED = "ABANDONED"  # older versions' stalled attempt; no longer written
    REFUND_DUE = "REFUND_DUE"  # charged after a later attempt replaced it: refund it


class ApiKeyScope(StrEnum):
    READ = "read"  # GET endpoints only
    WRITE = "write"  # every endpoint but the operators' ones
    ADMIN = "admin"  # every endpoint, including resolving unknown payment outcomes


def mask_card_number(number: str) -> str:
    """The only form of a card number that leaves the payment call: 123456********5678."""
    return f"{number[:6]}{'*' * 8}{number[-4:]}"


def uuid7(at: datetime | None = None, rng: random.Random | None = None) -> uuid.UUID:
    """RFC 9562 UUIDv7: Unix milliseconds, then 74 random bits. Ids made one after another
    sort by time, so new rows land at the end of the primary key, not at random pages."""
    millis = int((at or datetime.now(UTC)).timestamp() * 1000) & ((1 << 48) - 1)
    random_bits = rng.getrandbits(74) if rng else secrets.randbits(74)
    rand_a, rand_b = random_bits >> 62, random_bits & ((1 << 62) - 1)
    return uuid.UUID(int=millis << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)


def encode_cursor(created_at: datetime, invoice_id: str) -> str:
    """An opaque position in the newest-first order: the last invoice's (created_at, id)."""
    position = f"{created_at.isoformat()}|{invoice_id}"
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position in a cursor from `encode_cursor`; ValueError for anything else."""
    padded = cursor + "=" * (-len(cursor) % 4)
    created_at, invoice_id = base64.urlsafe_b64decode(padded).decode().split("|")
    return datetime.fromisoformat(created_at), str(uuid.UUID(invoice_id))


def is_invisible(character: str) -> bool:
    return unicodedata.category(character) in INVISIBLE_CATEGORIES


def require_utf8(value: str) -> str:
    """Reject lone surrogates, which JSON allows but MySQL's utf8mb4 cannot store."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


# Foreign keys get the names the schema has always given them (fk_invoice_customer, ...).
SQLModel.metadata.naming_convention = {"fk": "fk_%(table_name)s_%(referred_table_name)s"}

# Every table's options: one collation that MySQL 8 and MariaDB both have and compare alike,
# and no INSERT ... RETURNING, which SQLAlchemy would use on MariaDB only: the ORM takes the
# same path on both servers.
TABLE_OPTIONS = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "implicit_returning": False,
}


def timestamp_column() -> Any:
    return DATETIME(fsp=6)


def ascii_column(length: int) -> Any:
    """Case-sensitive ASCII text: keys compare byte for byte."""
    return VARCHAR(length, charset="ascii", collation="ascii_bin")


# Shared configuration of every API schema: camelCase on the wire, snake_case in Python.
class CamelModel(SQLModel):
    model_config = ConfigDict(  # type: ignore[assignment]  # SQLModel widens ConfigDict
        alias_generator=to_camel, populate_by_name=True
    )


# The customer fields a client sends; shared by the table, the create request and the response.
class CustomerBase(CamelModel):
    customer_name: str = Field(min_length=1, max_length=100)
    customer_email: str = Field(max_length=255)


# The customer table; its email is unique ignoring letter case only (the lower-cased key).
class Customer(CustomerBase, table=True):
    __table_args__ = (
        Index("uq_customer_email", "customer_email_key", unique=True),
        TABLE_OPTIONS,
    )

    customer_id: int | None = Field(default=None, primary_key=True)
    # Written by the database: LOWER() folds case and nothing else (no accents, no ß -> ss).
    customer_email_key: str | None = Field(
        default=None,
        sa_column=Column(String(255), Computed("LOWER(customer_email)", persisted=True)),
    )


# The body of POST /customer: a name to show and an address a maintained validator accepts.
class CustomerCreate(CustomerBase):
    customer_email: EmailStr = Field(max_length=255)

    @field_validator("customer_name")
    @classmethod
    def check_customer_name(cls, value: str) -> str:
        if all(is_invisible(character) for character in value):
            raise ValueError("customer name must not be blank")
        return require_utf8(value.strip())


# A customer as the API shows it.
class CustomerPublic(CustomerBase):
    customer_id: int


# The invoice fields a client sends; shared by the table, the create request and the response.
class InvoiceBase(CamelModel):
    job_description: str = Field(min_length=1, max_length=255)
    # 12 digits with 2 after the point caps it at 9999999999.99, as DECIMAL(12,2) does.
    amount: Decimal = Field(max_digits=12, decimal_places=2, gt=0, sa_type=DECIMAL(12, 2))
    # Strict: a JSON integer, not `true` or the string "1_0" that lax parsing would take.
    customer_id: int = Field(
        ge=1, le=2_147_483_647, foreign_key="customer.customer_id", schema_extra={"strict": True}
    )


# The invoice table: adds the server-owned id, status and timestamps.
class Invoice(InvoiceBase, table=True):
    __table_args__ = (
        # GET /invoices: newest first, with and without the status filter, by date range,
        # and for one customer (also the foreign key's index)
        Index("ix_invoice_created", "created_at", "id"),
        Index("ix_invoice_status_created", "invoice_status", "created_at", "id"),
        Index("ix_invoice_customer_created", "customer_id", "created_at", "id"),
        Index(
            "ix_invoice_customer_status_created",
            "customer_id",
            "invoice_status",
            "created_at",
            "id",
        ),
        CheckConstraint("amount > 0", name="ck_invoice_amount"),
        CheckConstraint(
            "invoice_status IN ('PENDING', 'PAID', 'CANCELLED')", name="ck_invoice_status"
        ),
        TABLE_OPTIONS,
    )

    id: str = Field(primary_key=True, max_length=36, sa_type=CHAR(36))
    invoice_status: InvoiceStatus = Field(
        default=InvoiceStatus.PENDING,
        sa_type=String(10),
        sa_column_kwargs={"server_default": InvoiceStatus.PENDING.value},
    )
    # Every claim writes the invoice row (this count), so on a multi-primary cluster a claim
    # and a concurrent settle or cancel of the invoice conflict instead of both committing.
    payment_attempts: int = Field(default=0, sa_column_kwargs={"server_default": text("0")})
    created_at: datetime | None = Field(
        default=None,
        nullable=False,
        sa_type=timestamp_column(),
        sa_column_kwargs={"server_default": text("CURRENT_TIMESTAMP(6)")},
    )
    modified_at: datetime | None = Field(
        default=None,
        nullable=False,
        sa_type=timestamp_column(),
        sa_column_kwargs={
            "server_default": text("CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)")
        },
    )


# One attempt to charge a card for an invoice; holds the masked number only.
class Payment(SQLModel, table=True):
    __table_args__ = (
        Index("ix_payment_invoice_status", "invoice_id", "payment_status"),
        Index("ix_payment_status", "payment_status", "id"),
        # At most one open and one successful attempt per invoice: the markers are 1 or NULL,
        # and NULLs never collide.
        Index("uq_payment_unsettled", "invoice_id", "unsettled", unique=True),
        Index("uq_payment_succeeded", "invoice_id", "succeeded", unique=True),
        CheckConstraint("unsettled = 1", name="ck_payment_unsettled"),
        CheckConstraint("succeeded = 1", name="ck_payment_succeeded"),
        CheckConstraint(
            "payment_status IN ('PROCESSING', 'SUCCEEDED', 'DECLINED', 'FAILED', 'UNKNOWN', "
            "'ABANDONED', 'REFUND_DUE')",
            name="ck_payment_status",
        ),
        TABLE_OPTIONS,
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInteger)
    invoice_id: str = Field(foreign_key="invoice.id", max_length=36, sa_type=CHAR(36))
    card_number: str = Field(max_length=18, sa_type=CHAR(18))
    card_name: str = Field(max_length=50)
    card_expiry: str = Field(max_length=7, sa_type=CHAR(7))
    payment_status: PaymentStatus = Field(
        default=PaymentStatus.PROCESSING,
        sa_type=String(10),
        sa_column_kwargs={"server_default": PaymentStatus.PROCESSING.value},
    )
    reason: str | None = Field(default=None, max_length=255)
    unsettled: int | None = Field(default=None, sa_type=TINYINT)  # 1: PROCESSING or UNKNOWN
    succeeded: int | None = Field(default=None, sa_type=TINYINT)  # 1: this attempt charged
    resolved_at: datetime | None = Field(default=None, sa_type=timestamp_column())
    resolved_by: str | None = Field(default=None, max_length=64)
    created_at: datetime | None = Field(
        default=None,
        nullable=False,
        sa_type=timestamp_column(),
        sa_column_kwargs={"server_default": text("CURRENT_TIMESTAMP(6)")},
    )
    modified_at: datetime | None = Field(
        default=None,
        nullable=False,
        sa_type=timestamp_column(),
        sa_column_kwargs={
            "server_default": text("CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)")
        },
    )


# The first reply to a request sent with an Idempotency-Key, replayed to the request's retries.
class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_key"
    __table_args__ = (Index("ix_idempotency_key_expires", "expires_at"), TABLE_OPTIONS)

    owner: str = Field(default="", primary_key=True, max_length=64, sa_type=ascii_column(64))
    idempotency_key: str = Field(primary_key=True, max_length=255, sa_type=ascii_column(255))
    fingerprint: str = Field(max_length=64, sa_type=CHAR(64))
    invoice_id: str = Field(max_length=36, sa_type=CHAR(36))
    # The last step its request reached, written with that step's change; NULL once replied.
    recovery_point: str | None = Field(default=None, max_length=16)
    payment_id: int | None = None  # the attempt of `payment_started`: only it may reply
    response_status: int | None = Field(default=None, sa_type=SmallInteger)
    response_body: str | None = Field(default=None, sa_type=Text)
    created_at: datetime | None = Field(
        default=None,
        nullable=False,
        sa_type=timestamp_column(),
        sa_column_kwargs={"server_default": text("CURRENT_TIMESTAMP(6)")},
    )
    expires_at: datetime = Field(sa_type=timestamp_column())


# An API key: only the SHA-256 of its secret is kept, and a prefix to recognise it by.
class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    __table_args__ = (
        Index("uq_api_key_name", "name", unique=True),
        Index("uq_api_key_secret_hash", "secret_hash", unique=True),
        CheckConstraint("scope IN ('read', 'write', 'admin')", name="ck_api_key_scope"),
        TABLE_OPTIONS,
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64)
    scope: ApiKeyScope = Field(sa_type=String(5))
    secret_hash: str = Field(max_length=64, sa_type=CHAR(64))
    prefix: str = Field(max_length=16)
    created_at: datetime | None = Field(
        default=None,
        nullable=False,
        sa_type=timestamp_column(),
        sa_column_kwargs={"server_default": text("CURRENT_TIMESTAMP(6)")},
    )
    last_used_at: datetime | None = Field(default=None, sa_type=timestamp_column())
    revoked_at: datetime | None = Field(default=None, sa_type=timestamp_column())


# Exact invoice totals per status in shard rows, kept in the transactions that change a status.
class InvoiceStatusCount(SQLModel, table=True):
    __tablename__ = "invoice_status_count"
    __table_args__ = (TABLE_OPTIONS,)

    invoice_status: str = Field(primary_key=True, max_length=10)
    shard: int = Field(primary_key=True, sa_type=TINYINT)
    invoice_count: int = Field(default=0, sa_type=BigInteger)


# A card as shown back to a client: masked number, expiry and name as sent to the provider.
class MaskedCard(CamelModel):
    number: str = Field(schema_extra={"examples": ["123456********5678"]})
    expiry: str = Field(schema_extra={"examples": ["01-2040"]})
    name: str = Field(schema_extra={"examples": ["J Doe"]})


# A card a client pays with. The number is a secret: only the provider request reveals it.
class Card(CamelModel):
    number: SecretStr = Field(
        description="16 digits; spaces and dashes between them are ignored",
        schema_extra={"examples": ["1234 5656 7822 5678"]},
    )
    expiry: str = Field(
        description="MM-YYYY, not in the past", schema_extra={"examples": ["01-2040"]}
    )
    name: str = Field(
        description="letters and spaces, 1-50 characters", schema_extra={"examples": ["Work Card"]}
    )

    @field_validator("number", mode="before")
    @classmethod
    def normalise_number(cls, value: object) -> SecretStr:
        if not isinstance(value, str):
            raise ValueError("card number must be a JSON string of 16 digits")
        digits = CARD_NUMBER_SEPARATORS.sub("", value)
        if not CARD_NUMBER.fullmatch(digits):
            raise ValueError(
                "card number must be 16 digits, optionally grouped with spaces or dashes"
            )
        return SecretStr(digits)

    @field_validator("expiry")
    @classmethod
    def check_expiry(cls, value: str) -> str:
        match = CARD_EXPIRY.fullmatch(value)
        if match is None:
            raise ValueError("card expiry must be MM-YYYY with a month from 01 to 12")
        month, year = int(match.group(1)), int(match.group(2))
        now = datetime.now(UTC)
        if (year, month) < (now.year, now.month):
            raise ValueError("card has expired: expiry must not be before the current month")
        return value

    @field_validator("name")
    @classmethod
    def check_name(cls, value: str) -> str:
        name = value.strip(" ")  # spaces only: a tab or a no-break space is not a letter
        if not 1 <= len(name) <= 50 or not CARD_NAME.fullmatch(name):
            raise ValueError("card name must be 1-50 ASCII letters and spaces")
        return name

    def masked(self) -> MaskedCard:
        return MaskedCard(
            number=mask_card_number(self.number.get_secret_value()),
            expiry=self.expiry,
            name=self.name,
        )


# The body of POST /invoice: an invoice to create, optionally paid at once by card.
class InvoiceCreate(InvoiceBase):
    card: Card | None = None

    @field_validator("amount", mode="before")
    @classmethod
    def no_digit_separators(cls, value: object) -> object:
        """Lax parsing reads the string "1_000" as 1000, which no client means to send."""
        if isinstance(value, str) and "_" in value:
            raise ValueError("amount must be a plain number such as 1000.00, without underscores")
        return value

    @field_validator("job_description")
    @classmethod
    def check_job_description(cls, value: str) -> str:
        if all(is_invisible(character) for character in value):
            raise ValueError("job description must not be blank")
        return require_utf8(value)


# The challenge's InvoiceResponse: an invoice with its customer and, once paid, the card.
class InvoicePublic(InvoiceBase):
    id: uuid.UUID
    card: Annotated[MaskedCard | None, PydanticField(exclude_if=lambda card: card is None)] = None
    customer_name: str
    customer_email: str
    invoice_status: InvoiceStatus

    @field_serializer("amount", when_used="json")
    def amount_as_number(self, amount: Decimal) -> float:
        # At most 12 significant digits, so the float's shortest repr is exactly the decimal.
        return float(amount)


# One attempt to charge a card, as GET /invoice/{invoice_id}/payments shows it.
class PaymentPublic(CamelModel):
    payment_id: int
    status: PaymentStatus
    reason: str | None
    card: MaskedCard
    created_at: datetime
    modified_at: datetime
    resolved_by: str | None = Field(
        default=None,
        description="Who resolved an UNKNOWN outcome: the API key's name, or AUTH=off",
    )
    resolved_at: datetime | None = Field(default=None, description="When it was resolved")


# One attempt as GET /payments lists it: with the invoice it was for.
class PaymentListItem(PaymentPublic):
    invoice_id: uuid.UUID


# The body of POST /invoice/{invoice_id}/payments/{paymentId}/resolve: what the provider said.
class PaymentResolution(CamelModel):
    outcome: Literal[PaymentStatus.SUCCEEDED, PaymentStatus.FAILED] = Field(
        description="SUCCEEDED: the provider charged the card (the invoice turns PAID); "
        "FAILED: it did not (the invoice may be paid again)"
    )


# GET /invoice/{invoice_id}/payments: every attempt, newest first.
class PaymentHistory(CamelModel):
    items: list[PaymentPublic]


# One slice of GET /invoices/scroll: keyset pagination, as cheap at any depth as on page one.
class InvoiceScrollPage(CamelModel):
    items: list[InvoicePublic]
    total: int = Field(ge=0, description="Invoices matching the filter, over all slices")
    size: int = Field(ge=1)
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next slice; null after the last one"
    )


# GET /health-check: whether the database answered.
class HealthStatus(SQLModel):
    status: Literal["UP", "DOWN"]


# Body of every error reply but 422: FastAPI's shape, a message a person can act on.
class ErrorDetail(SQLModel):
    detail: str = Field(description="What went wrong, and what to do about it")
