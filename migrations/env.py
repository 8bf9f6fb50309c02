"""How Alembic reaches the database: the schema owner's connection to DB_URL.

`scripts.schema` hands in a connection of its own (`config.attributes["connection"]`), so
`make db-up`, the tests and the benchmark migrate with the same code; the `alembic` command
(`make migration`, `alembic check`) connects from the settings. Models are the target of
autogenerate, so `alembic check` fails while models.py and the head revision disagree.
"""

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlmodel import SQLModel

import models  # noqa: F401  (registers the tables)
from scripts.schema import is_model_object
from settings import Settings

target_metadata = SQLModel.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=is_model_object,
        compare_type=True,
        # MySQL runs DDL outside transactions: one revision at a time, each stamped when done.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = create_engine(Settings().database_url("pymysql", schema_owner=True))
    with engine.connect() as connection:
        run_migrations(connection)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a server")
main()
