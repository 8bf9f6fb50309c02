"""Configuration: `.env` at the project root, each value overridable by an environment variable."""

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL

PROJECT_ROOT = Path(__file__).resolve().parent


class Settings(BaseSettings):
    # Environment variables win over `.env`, so tests and benchmarks can point elsewhere.
    model_config = SettingsConfigDict(
        env_file=PROJECT_ROOT / ".env", env_file_encoding="utf-8", extra="ignore"
    )

    db_user: str = "root"
    db_password: SecretStr = SecretStr("example")
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

    log_level: str = "INFO"
    log_json: bool = False

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

    def database_url(self, driver: str = "aiomysql") -> URL:
        """The SQLAlchemy URL of DB_URL: aiomysql for the app, pymysql for sync tools."""
        return URL.create(
            f"mysql+{driver}",
            username=self.db_user,
            password=self.db_password.get_secret_value(),
            host=self.db_host,
            port=self.db_port,
            database=self.db_name,
        )


settings = Settings()
