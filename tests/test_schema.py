"""The schema is the migrations' head: sql/up.sql makes the same one, models.py describes it,
and `make db-up` (`upgrade_to_head`) brings any earlier database to it without losing a row."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text

from scripts.schema import (
    SchemaError,
    admin_connection,
    apply_script,
    create_database,
    differences,
    differences_from_models,
    drop_database,
    head_revision,
    schema_connection,
    signature,
    upgrade_to_head,
)
from settings import Settings
from tests.support import SEEDED_PAID, SEEDED_PENDING, app_process, settings

BEFORE_MIGRATIONS = Path(__file__).parent / "data" / "up-before-migrations.sql"
PAYMENT_STATES = ["PROCESSING", "SUCCEEDED", "DECLINED", "FAILED", "UNKNOWN", "ABANDONED"]


@pytest.fixture
def scratch() -> Iterator[Settings]:
    """Settings for a database of this test's own, named after the tests' database (so the
    least-privilege run's grants cover it), dropped afterwards."""
    name = f"{settings.db_name}_scratch"
    config = settings.model_copy(update={"db_url": f"{settings.db_url.rsplit('/', 1)[0]}/{name}"})
    create_database(config, recreate=True)
    yield config
    drop_database(config, name)


def made_before_migrations(config: Settings) -> None:
    """The database as the sql/up.sql of before migrations left it, on a server whose default
    collation is MariaDB's (the script named none). Where binary logging is on and the schema
    owner has no SUPER (`make test-mysql8`), its triggers are refused as they were then: the
    database is the rest of the script, which `make db-up` takes just the same."""
    script = BEFORE_MIGRATIONS.read_text()
    execute(config, "ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT @@log_bin")
        if (cursor.fetchone() or (0,))[0]:
            triggers = script.index("CREATE TRIGGER")
            script = script[:triggers] + script[script.index("INSERT INTO customer") :]
        cursor.execute(script)
        while cursor.nextset():
            pass


def execute(config: Settings, *statements: str) -> None:
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def rows_of(connection: Connection, table: str, order_by: str) -> list[dict[str, Any]]:
    query = text(f"SELECT * FROM {table} ORDER BY {order_by}")
    return [dict(row) for row in connection.execute(query).mappings()]


TABLE_ORDER = {
    "customer": "customer_id",
    "invoice": "id",
    "payment": "id",
    "idempotency_key": "owner, idempotency_key",
    "api_key": "id",
}


def every_row(config: Settings) -> dict[str, list[dict[str, Any]]]:
    with schema_connection(config) as connection:
        return {table: rows_of(connection, table, order) for table, order in TABLE_ORDER.items()}


def status_totals(config: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """(the counts table's totals, COUNT(*) per status)."""
    with schema_connection(config) as connection:
        counted = connection.execute(
            text("SELECT invoice_status, SUM(invoice_count) FROM invoice_status_count GROUP BY 1")
        )
        actual = connection.execute(text("SELECT invoice_status, COUNT(*) FROM invoice GROUP BY 1"))
        return (
            {status: int(total) for status, total in counted},
            {status: int(total) for status, total in actual},
        )


def test_up_sql_makes_the_schema_the_migrations_make(scratch: Settings) -> None:
    apply_script(scratch, "up.sql")

    with schema_connection(scratch) as script, schema_connection(settings) as migrated:
        found, expected = signature(script), signature(migrated)

    assert differences(found, expected) == []
    assert expected["columns"]  # the comparison compared something


def test_up_sql_is_stamped_at_the_head_revision(scratch: Settings) -> None:
    apply_script(scratch, "up.sql")

    with schema_connection(scratch) as connection:
        stamped = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()

    assert stamped == head_revision()


def test_models_describe_the_head_revision() -> None:
    with schema_connection(settings) as connection:
        assert differences_from_models(connection) == []


def test_every_table_and_text_column_has_one_explicit_collation() -> None:
    with schema_connection(settings) as connection:
        tables = connection.execute(
            text(
                "SELECT table_name, table_collation FROM information_schema.tables "
                "WHERE table_schema = DATABASE()"
            )
        ).all()
        columns = connection.execute(
            text(
                "SELECT DISTINCT collation_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND collation_name IS NOT NULL"
            )
        ).all()

    assert {collation for _, collation in tables} == {"utf8mb4_bin"}
    assert {collation for (collation,) in columns} == {"utf8mb4_bin", "ascii_bin"}


def test_db_up_on_a_new_database_creates_the_schema_and_seed_rows(scratch: Settings) -> None:
    message = upgrade_to_head(scratch)

    assert message.startswith("created the schema and seed data")
    rows = every_row(scratch)
    assert [row["customer_id"] for row in rows["customer"]] == [1, 2, 3, 4, 5]
    assert len(rows["invoice"]) == 5


def test_db_up_twice_changes_nothing(scratch: Settings) -> None:
    upgrade_to_head(scratch)
    before = every_row(scratch)

    message = upgrade_to_head(scratch)

    assert message == f"schema `{scratch.db_name}` is in place at revision {head_revision()}"
    assert every_row(scratch) == before


def test_db_up_upgrades_a_database_made_before_migrations_keeping_every_row(
    scratch: Settings,
) -> None:
    made_before_migrations(scratch)
    execute(
        scratch,
        "INSERT INTO customer (customer_name, customer_email) "
        "VALUES ('Mixed', 'Mixed.Case@Example.com')",
        *[
            f"INSERT INTO payment (invoice_id, card_number, card_name, card_expiry, payment_status,"
            f" reason) VALUES ('{SEEDED_PENDING}', '123456********5678', 'J Doe', '01-2040',"
            f" '{state}', 'kept')"
            for state in [*PAYMENT_STATES, "REFUND_DUE"]
        ],
        "INSERT INTO idempotency_key (owner, idempotency_key, fingerprint, invoice_id, "
        f"response_status, response_body, expires_at) VALUES ('', 'key-1', REPEAT('a', 64), "
        f"'{SEEDED_PAID}', 201, '{{}}', NOW() + INTERVAL 1 DAY)",
        "INSERT INTO api_key (name, scope, secret_hash, prefix) VALUES "
        "('ops', 'write', REPEAT('b', 64), 'inv_ab')",
        "UPDATE invoice SET invoice_status = 'CANCELLED' "
        "WHERE id = '6f53c7be-0369-11f0-8d97-7c646cb7c0bc'",
    )
    before = every_row(scratch)

    message = upgrade_to_head(scratch)

    assert message.startswith(f"upgraded `{scratch.db_name}` from revision 0001")
    after = every_row(scratch)
    for table, rows in before.items():  # every row and column kept; new columns beside them
        assert [
            {name: row[name] for name in was} for row, was in zip(after[table], rows, strict=True)
        ] == rows
    markers = [
        (row["payment_status"], row["unsettled"], row["succeeded"]) for row in after["payment"]
    ]
    assert ("UNKNOWN", 1, None) in markers  # the newest open attempt holds the open slot
    assert ("PROCESSING", None, None) in markers
    assert ("SUCCEEDED", None, 1) in markers
    counted, actual = status_totals(scratch)
    assert counted == {"PENDING": 1, "PAID": 2, "CANCELLED": 2} == actual


def test_an_upgraded_database_is_served_by_the_api(scratch: Settings, tmp_path: Path) -> None:
    made_before_migrations(scratch)
    upgrade_to_head(scratch)

    with app_process(tmp_path / "app.log", env={"DB_URL": scratch.db_url}) as app:
        listed = httpx.get(f"{app.url}/invoices", params={"invoiceStatus": "PAID"})
        paid = httpx.get(f"{app.url}/invoice/{SEEDED_PAID}")
        taken = httpx.post(
            f"{app.url}/customer",
            json={"customerName": "Again", "customerEmail": "JOHN.DOE@example.com"},
        )

    assert listed.status_code == 200
    assert listed.json()["total"] == 2
    assert paid.status_code == 200
    assert paid.json()["jobDescription"] == "Website Development"
    assert taken.status_code == 409


def test_db_up_adopts_a_database_whose_triggers_failed_and_recounts_it(
    scratch: Settings,
) -> None:
    # sql/up.sql stopped at its first trigger (no SUPER with binary logging on): the tables are
    # there, the triggers and seed rows are not, and invoices written since were never counted.
    script = BEFORE_MIGRATIONS.read_text()
    execute(scratch, "ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    with admin_connection(scratch, scratch.db_name) as connection, connection.cursor() as cursor:
        cursor.execute(script[: script.index("CREATE TRIGGER")])
        while cursor.nextset():
            pass
    execute(
        scratch,
        "INSERT INTO customer (customer_name, customer_email) VALUES ('A', 'a@example.com')",
        "INSERT INTO invoice (id, customer_id, job_description, amount) "
        "VALUES ('00000000-0000-4000-8000-00000000000a', 1, 'Uncounted', 1.00)",
    )

    upgrade_to_head(scratch)

    counted, actual = status_totals(scratch)
    assert counted["PENDING"] == actual["PENDING"] == 1


def test_db_up_refuses_tables_that_are_not_the_earlier_schema(scratch: Settings) -> None:
    execute(scratch, "CREATE TABLE invoice (id CHAR(36) NOT NULL PRIMARY KEY)")

    with pytest.raises(SchemaError) as refused:
        upgrade_to_head(scratch)

    message = str(refused.value)
    assert "not the schema that sql/up.sql created before migrations" in message
    assert "missing table: ('customer'," in message
    assert "make db-reset" in message
    with schema_connection(scratch) as connection:  # nothing was changed
        assert connection.execute(text("SHOW TABLES")).scalars().all() == ["invoice"]


def test_db_up_reports_a_schema_that_differs_from_its_revision(scratch: Settings) -> None:
    upgrade_to_head(scratch)
    execute(scratch, "ALTER TABLE invoice DROP INDEX ix_invoice_status_created")

    with pytest.raises(SchemaError) as refused:
        upgrade_to_head(scratch)

    assert "ix_invoice_status_created" in str(refused.value)
    assert "differs from models.py" in str(refused.value)
