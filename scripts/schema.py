"""Schema tools for `make db-up`, `make db-reset`, the seeder, the benchmark and the tests.

They run the project's SQL scripts as they are, over a plain PyMySQL connection, so the scripts
are what gets tested. Nothing on a request path uses this module.
"""

from pathlib import Path

import pymysql
from pymysql.constants import CLIENT

from settings import PROJECT_ROOT, Settings

SQL_DIR = PROJECT_ROOT / "sql"


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
        init_command="SET time_zone = '+00:00'",
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
