"""Database access: one engine per process, one session per request."""

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pymysql
from fastapi import Depends
from pymysql.constants import CLIENT
from sqlalchemy import URL, Engine
from sqlalchemy import exc as sa_exc
from sqlmodel import Session, create_engine

from settings import PROJECT_ROOT, Settings, settings

SQL_DIR = PROJECT_ROOT / "sql"


def database_url(config: Settings) -> URL:
    return URL.create(
        "mysql+pymysql",
        username=config.db_user,
        password=config.db_password.get_secret_value(),
        host=config.db_host,
        port=config.db_port,
        database=config.db_name,
    )


def make_engine(config: Settings) -> Engine:
    """Fail fast when the server is gone: short connect timeout, pre-ping, bounded pool wait."""
    return create_engine(
        database_url(config),
        pool_pre_ping=True,
        pool_size=config.db_pool_size,
        max_overflow=0,
        pool_timeout=config.db_pool_timeout,
        pool_recycle=3600,
        connect_args={
            "connect_timeout": config.db_connect_timeout,
            "read_timeout": config.db_read_timeout,
            "write_timeout": config.db_read_timeout,
            "charset": "utf8mb4",
        },
    )


engine = make_engine(settings)


def get_session() -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# What a query raises when the server is down, unreachable, too slow, or the pool is empty.
DATABASE_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


# Schema management for `make db-up`, `make db-reset` and the test suite. These run the
# project's SQL scripts as they are, so the scripts are what gets tested.


def admin_connection(config: Settings, database: str | None = None) -> pymysql.Connection:
    return pymysql.connect(
        host=config.db_host,
        port=config.db_port,
        user=config.db_user,
        password=config.db_password.get_secret_value(),
        database=database,
        connect_timeout=config.db_connect_timeout,
        client_flag=CLIENT.MULTI_STATEMENTS,
        autocommit=True,
        charset="utf8mb4",
    )


def run_sql_script(connection: pymysql.Connection, script: Path) -> None:
    with connection.cursor() as cursor:
        cursor.execute(script.read_text(encoding="utf-8"))
        while cursor.nextset():
            pass


def create_database(config: Settings, *, recreate: bool = False) -> None:
    name = config.db_name
    with admin_connection(config) as connection, connection.cursor() as cursor:
        if recreate:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")


def existing_tables(config: Settings) -> set[str]:
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        return {row[0] for row in cursor.fetchall()}


def apply_script(config: Settings, name: str) -> None:
    with admin_connection(config, config.db_name) as connection:
        run_sql_script(connection, SQL_DIR / name)
