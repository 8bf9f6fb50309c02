"""Configuration: `.env` at the project root, each value overridable by an environment variable.

The app reads it once, in `main.create_app`, and hands it to requests with its lifespan
state; tests and tools build a `Settings` of their own."""

from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL

PROJECT_ROOT = Path(__file__).resolve().parent
# How often, and how long apart, recording a payment's outcome is retried through an outage.
SETTLE_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0)
STALE_MARGIN_S = 30


class Settings(BaseSettings):
    # Environment variables win over `.env`, so tests and benchmarks can point elsewhere.
    model_config = SettingsConfigDict(
        env_file=PROJECT_ROOT / ".env", env_file_encoding="utf-8", extra="ignore"
    )

    db_user: str = "root"
    db_password: SecretStr = SecretStr("example")
    # The schema's owner, for migrations and `make db-up`; the app itself needs only SELECT,
    # INSERT, UPDATE and DELETE. Unset: DB_USER owns the schema too.
    db_schema_user: str | None = None
    db_schema_password: SecretStr | None = None
    db_url: str = Field(
        default="127.0.0.1:3307/invoice_management",
        pattern=r"^[^:/\s]+(:\d+)?/\w+$",
        description="host:port/database",
    )
    # A dead or silent database must turn into a 503 within 3 s: a stale pooled connection
    # costs one read timeout (its ping), a new one at most the connect timeout.
    db_connect_timeout: float = Field(default=1.5, gt=0, le=2, description="seconds")
    db_read_timeout: float = Field(
        default=1.2, gt=0, description="seconds one query may wait for the server's reply"
    )
    # Below the read timeout, so a lock held too long is the server's lock-wait error (a lost
    # race: 409), not a silent connection (an outage: 503).
    db_lock_wait_timeout: int = Field(
        default=1, ge=1, description="seconds a statement may wait for a row lock"
    )
    db_pool_size: int = Field(default=20, ge=1, description="connections per process")
    db_pool_timeout: float = Field(default=2.0, gt=0, description="seconds to wait for one")

    fakepay_url: str = "http://127.0.0.1:9000/fakepay"
    fakepay_connect_timeout: float = Field(default=3.0, gt=0, description="seconds")
    fakepay_timeout: float = Field(default=10.0, gt=0, description="read timeout, seconds")
    fakepay_deadline: float = Field(
        default=15.0, gt=0, description="seconds one provider call may take in all"
    )
    fakepay_max_concurrency: int = Field(
        default=8, ge=1, description="provider calls in flight per process; more answer 503"
    )

    provider_deduplicates: bool = Field(
        default=False,
        description="whether the provider charges one transactionId at most once. FakePay "
        "does not: then an attempt with an unknown outcome blocks its invoice until an "
        "operator resolves it; with true, paying again re-sends the same transactionId",
    )

    max_page_offset: int = Field(
        default=200_000,
        ge=0,
        description="deepest offset GET /invoices pages reach; deeper is a 422 pointing to "
        "/invoices/scroll (chosen from BENCHMARKS.md: the deepest page within 250 ms)",
    )
    idempotency_ttl_hours: int = Field(
        default=24, ge=1, description="hours an Idempotency-Key and its reply are kept"
    )

    auth: Literal["off", "on"] = Field(
        default="off", description="on: every endpoint but the health check needs an API key"
    )
    allow_open: bool = Field(
        default=False, description="let `make serve` listen beyond loopback with AUTH=off"
    )

    log_level: str = "INFO"
    log_json: bool = False
    metrics: bool = Field(
        default=True,
        description="count requests, payments and the pool for GET /metrics; false: nothing "
        "is counted and /metrics answers 404",
    )

    @property
    def db_host(self) -> str:
        return self.db_url.split("/", 1)[0].split(":", 1)[0]

    @property
    def db_port(self) -> int:
        address = self.db_url.split("/", 1)[0]
        return int(address.split(":", 1)[1]) if ":" in address else 3306

    @property
    def db_name(self) -> str:
        return self.db_url.split("/", 1)[1]

    @property
    def payment_stale_after_s(self) -> float:
        """The longest one payment can take, plus a margin: the provider call's deadline, then
        every try at recording its outcome waiting its full time for a connection and three
        replies. A payment attempt (or an Idempotency-Key) still unfinished after this long
        belongs to a request that is gone."""
        per_try = self.db_pool_timeout + self.db_connect_timeout + 3 * self.db_read_timeout
        settle = sum(SETTLE_RETRY_DELAYS_S) + (len(SETTLE_RETRY_DELAYS_S) + 1) * per_try
        return self.fakepay_deadline + settle + STALE_MARGIN_S

    @property
    def schema_credentials(self) -> tuple[str, str]:
        """User and password of the schema's owner: DB_SCHEMA_USER, else DB_USER."""
        if self.db_schema_user is None:
            return self.db_user, self.db_password.get_secret_value()
        password = self.db_schema_password or SecretStr("")
        return self.db_schema_user, password.get_secret_value()

    def database_url(self, driver: str = "aiomysql", *, schema_owner: bool = False) -> URL:
        """The SQLAlchemy URL of DB_URL: aiomysql for the app, pymysql for sync tools; as the
        schema's owner for migrations."""
        user, password = (
            self.schema_credentials
            if schema_owner
            else (self.db_user, self.db_password.get_secret_value())
        )
        return URL.create(
            f"mysql+{driver}",
            username=user,
            password=password,
            host=self.db_host,
            port=self.db_port,
            database=self.db_name,
        )


async def get_settings(request: Request) -> Settings:
    """The settings the app was made with, from its lifespan state."""
    config: Settings = request.state.settings
    return config


SettingsDep = Annotated[Settings, Depends(get_settings)]
