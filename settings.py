"""Configuration: `.env` at the project root, each value overridable by an environment variable."""

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    db_connect_timeout: int = Field(default=2, ge=1, le=30, description="seconds")
    db_read_timeout: int = Field(default=10, ge=1, description="seconds")
    db_pool_size: int = Field(default=40, ge=1, description="matches the sync threadpool")
    db_pool_timeout: float = Field(default=2.0, gt=0, description="seconds")

    fakepay_url: str = "http://127.0.0.1:9000/fakepay"
    fakepay_connect_timeout: float = Field(default=3.0, gt=0, description="seconds")
    fakepay_timeout: float = Field(default=10.0, gt=0, description="read timeout, seconds")
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


settings = Settings()
