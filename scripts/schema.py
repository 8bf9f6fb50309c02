"""Schema tools for `make db-up`, `make db-reset`, the seeder, the benchmark and the tests.

The schema is the chain of Alembic revisions in `migrations/`. `upgrade_to_head` brings a
database at any earlier state to head in place, never dropping a row: an empty database is
built by the revisions, one at an earlier revision is upgraded, and one made by the
`sql/up.sql` of before migrations (no version table) is compared with the baseline revision
and stamped before it is upgraded. It ends by comparing the result with models.py, so a
schema that is only partly there is never reported as in place. The SQL scripts run as they
are, over a plain PyMySQL connection, so the scripts are what gets tested. Nothing on a
request path uses this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pymysql.constants import CLIENT
from sqlalchemy import Connection, create_engine, text
from sqlmodel import SQLModel

import models  # noqa: F401  (registers the tables)
from settings import PROJECT_ROOT, Settings

SQL_DIR = PROJECT_ROOT / "sql"
CHARSET = "utf8mb4"
COLLATION = "utf8mb4_bin"  # on MySQL 8.0 and 8.4 and on MariaDB 10.6+, alike
BASELINE = "0001"  # the revision a database made by the sql/up.sql of before migrations is at
VERSION_TABLE = "alembic_version"
STATUS_COUNT_ROWS = 48  # 3 statuses x 16 shards


class SchemaError(Exception):
    """A database whose schema cannot be brought to head as it is; the message says why and
    what to do."""


def admin_connection(config: Settings, database: str | None = None) -> pymysql.Connection:
    """A connection as the schema's owner (DB_SCHEMA_USER, else DB_USER)."""
    user, password = config.schema_credentials
    return pymysql.connect(
        host=config.db_host,
        port=config.db_port,
        user=user,
        password=password,
        database=database,
        connect_timeout=config.db_connect_timeout,
        client_flag=CLIENT.MULTI_STATEMENTS,
        autocommit=True,
        charset=CHARSET,
        init_command="SET time_zone = '+00:00'",
    )


def run_sql_script(connection: pymysql.Connection, script: Path) -> None:
    with connection.cursor() as cursor:
        cursor.execute(script.read_text(encoding="utf-8"))
        while cursor.nextset():
            pass


def create_database(config: Settings, *, recreate: bool = False, name: str | None = None) -> None:
    name = name or config.db_name
    with admin_connection(config) as connection, connection.cursor() as cursor:
        if recreate:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(
            f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET {CHARSET} COLLATE {COLLATION}"
        )


def drop_database(config: Settings, name: str) -> None:
    with admin_connection(config) as connection, connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def apply_script(config: Settings, name: str) -> None:
    with admin_connection(config, config.db_name) as connection:
        run_sql_script(connection, SQL_DIR / name)


def count_new_invoices(cursor: Any, statuses: Mapping[str, int]) -> None:
    """For tools that insert invoices with plain SQL: add them to the counts per status, in
    the inserting transaction, as the app does for each invoice it creates."""
    cursor.executemany(
        "UPDATE invoice_status_count SET invoice_count = invoice_count + %s "
        "WHERE invoice_status = %s AND shard = CONNECTION_ID() %% 16",
        [(count, status) for status, count in statuses.items()],
    )


@contextmanager
def schema_connection(config: Settings, database: str | None = None) -> Iterator[Connection]:
    """A SQLAlchemy connection as the schema's owner, for Alembic and the comparisons."""
    url = config.database_url("pymysql", schema_owner=True)
    if database is not None:
        url = url.set(database=database)
    engine = create_engine(url, connect_args={"init_command": "SET time_zone = '+00:00'"})
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def alembic_config(connection: Connection | None = None) -> Config:
    """The project's Alembic configuration (`[tool.alembic]` in pyproject.toml)."""
    config = Config(toml_file=PROJECT_ROOT / "pyproject.toml")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # migrations/versions is never empty
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def migrate(config: Settings, revision: str = "head", database: str | None = None) -> None:
    """Run the revisions up to `revision` on the database (DB_URL's unless named)."""
    with schema_connection(config, database) as connection:
        command.upgrade(alembic_config(connection), revision)


def table_names(connection: Connection) -> set[str]:
    rows = connection.execute(
        text("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()")
    )
    return {row[0] for row in rows}


# What `signature` reads from information_schema, one query per part of the schema.
SIGNATURE_QUERIES = {
    "tables": """
        SELECT table_name, engine, table_collation FROM information_schema.tables
        WHERE table_schema = DATABASE()""",
    "columns": """
        SELECT table_name, column_name, ordinal_position, column_type, is_nullable,
               column_default, extra, character_set_name, collation_name, generation_expression
        FROM information_schema.columns WHERE table_schema = DATABASE()""",
    "indexes": """
        SELECT table_name, index_name, non_unique, seq_in_index, column_name, sub_part
        FROM information_schema.statistics WHERE table_schema = DATABASE()""",
    "checks": """
        SELECT tc.table_name, tc.constraint_name, cc.check_clause
        FROM information_schema.table_constraints tc
        JOIN information_schema.check_constraints cc
          ON cc.constraint_schema = tc.constraint_schema
         AND cc.constraint_name = tc.constraint_name
        WHERE tc.constraint_schema = DATABASE() AND tc.constraint_type = 'CHECK'""",
    "foreign keys": """
        SELECT k.table_name, k.constraint_name, k.column_name, k.referenced_table_name,
               k.referenced_column_name, r.update_rule, r.delete_rule
        FROM information_schema.key_column_usage k
        JOIN information_schema.referential_constraints r
          ON r.constraint_schema = k.constraint_schema AND r.constraint_name = k.constraint_name
        WHERE k.constraint_schema = DATABASE() AND k.referenced_table_name IS NOT NULL""",
    "triggers": """
        SELECT event_object_table, trigger_name, action_timing, event_manipulation,
               action_statement
        FROM information_schema.triggers WHERE trigger_schema = DATABASE()""",
}
Signature = dict[str, set[tuple[Any, ...]]]


def signature(
    connection: Connection, *, parts: tuple[str, ...] = tuple(SIGNATURE_QUERIES)
) -> Signature:
    """Everything that makes up the schema of the connection's database, as comparable sets:
    tables, columns (types, defaults, collations, generation), indexes, checks, foreign keys
    and triggers. Alembic's own version table is left out."""
    described: Signature = {}
    for part in parts:
        rows = connection.execute(text(SIGNATURE_QUERIES[part]))
        described[part] = {tuple(row) for row in rows if row[0] != VERSION_TABLE}
    return described


def differences(found: Signature, expected: Signature) -> list[str]:
    """What `found` lacks or has beyond `expected`, a line each."""
    lines = []
    for part, rows in expected.items():
        lines += [f"missing {part[:-1]}: {row}" for row in sorted(rows - found[part], key=str)]
        lines += [f"unexpected {part[:-1]}: {row}" for row in sorted(found[part] - rows, key=str)]
    return lines


def baseline_signature(config: Settings) -> Signature:
    """The baseline revision's schema, built in a scratch database and dropped again. The
    old script's triggers are not part of it: they are dropped by the next revision anyway,
    and a database where they failed to install is still a baseline one."""
    scratch = f"{config.db_name[:55]}_baseline"  # a name is at most 64 characters
    create_database(config, recreate=True, name=scratch)
    try:
        migrate(config, BASELINE, database=scratch)
        with schema_connection(config, scratch) as connection:
            return signature(connection, parts=BASELINE_PARTS)
    finally:
        drop_database(config, scratch)


BASELINE_PARTS = ("tables", "columns", "indexes", "checks", "foreign keys")


def adopt_unversioned(config: Settings, connection: Connection) -> None:
    """A database with the tables but no version table was made by the sql/up.sql of before
    migrations: stamp it at the baseline if its schema is exactly that one."""
    found = signature(connection, parts=BASELINE_PARTS)
    missing = differences(found, baseline_signature(config))
    if missing:
        shown = "\n  ".join(missing[:20])
        raise SchemaError(
            f"`{config.db_name}` has tables but no migration history, and they are not the "
            f"schema that sql/up.sql created before migrations:\n  {shown}\n"
            "Nothing was changed. If the database holds nothing you need, `make db-reset` "
            "recreates it; otherwise bring these tables to that schema by hand (or restore a "
            "backup) and run `make db-up` again."
        )
    command.stamp(alembic_config(connection), BASELINE)
    connection.commit()


def is_model_object(obj: object, name: str | None, kind: str, *_: object) -> bool:
    """For Alembic's comparisons: everything but Alembic's own version table."""
    return not (kind == "table" and name == VERSION_TABLE)


# What Alembic's comparison does not look at: collations, triggers, the counts table's rows.
SCHEMA_CHECKS = {
    "a table not in utf8mb4_bin": f"""
        SELECT table_name FROM information_schema.tables
        WHERE table_schema = DATABASE() AND table_collation <> '{COLLATION}'""",
    "a column in another collation": f"""
        SELECT CONCAT(table_name, '.', column_name) FROM information_schema.columns
        WHERE table_schema = DATABASE() AND collation_name NOT IN ('{COLLATION}', 'ascii_bin')""",
    "a trigger (the app keeps the counts)": """
        SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema = DATABASE()""",
    "a wrong number of invoice_status_count rows": f"""
        SELECT COUNT(*) FROM invoice_status_count HAVING COUNT(*) <> {STATUS_COUNT_ROWS}""",
}


def differences_from_models(connection: Connection) -> list[str]:
    """Where the database differs from models.py, as `alembic check` sees it, and from what
    the revisions make that Alembic does not compare."""
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": is_model_object}
    )
    found = [str(change) for change in compare_metadata(context, SQLModel.metadata)]
    for what, query in SCHEMA_CHECKS.items():
        found += [f"{what}: {row[0]}" for row in connection.execute(text(query))]
    return found


def upgrade_to_head(config: Settings) -> str:
    """Bring DB_URL's database to the head revision in place; what was done, in a sentence.

    Raises `SchemaError` when that cannot be done safely or the result is not the schema of
    models.py: the message names what is wrong and how to fix it.
    """
    create_database(config)
    head = head_revision()
    with schema_connection(config) as connection:
        before = current_revision(connection)
        tables = table_names(connection) - {VERSION_TABLE}
        if before is None and tables:
            adopt_unversioned(config, connection)
            before = f"{BASELINE} (an unversioned database made by the earlier sql/up.sql)"
        connection.commit()
        command.upgrade(alembic_config(connection), "head")
        connection.commit()
        wrong = differences_from_models(connection)
    if wrong:
        shown = "\n  ".join(wrong[:20])
        raise SchemaError(
            f"`{config.db_name}` is stamped at revision {head} but its schema differs from "
            f"models.py (a revision only partly applied, or a change by hand):\n  {shown}\n"
            "Repair these by hand and run `make db-up` again, or, if the database holds nothing "
            "you need, recreate it with `make db-reset`."
        )
    if before == head:
        return f"schema `{config.db_name}` is in place at revision {head}"
    if before is None:
        return f"created the schema and seed data in `{config.db_name}` (revision {head})"
    return f"upgraded `{config.db_name}` from revision {before} to {head}, keeping every row"
