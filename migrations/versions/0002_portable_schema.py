"""A schema that behaves the same on MySQL 8.0.16+ and MariaDB 10.6+, and needs no SUPER.

- One explicit collation everywhere, `utf8mb4_bin`, which both servers have and compare alike
  (each server's default differs: `utf8mb4_0900_ai_ci` on MySQL 8, `utf8mb4_general_ci` on
  MariaDB, so names such as 'straße' and 'strasse' were one key on one and two on the other).
  Idempotency keys keep their `ascii_bin` columns.
- A customer's email is unique ignoring letter case only: a stored `customer_email_key`,
  `LOWER(customer_email)`, carries the unique index, so `é@exämple.com` and `e@example.com`
  are two customers, `John@x.com` and `john@x.com` one.
- The counts per status are kept by the app in the transactions that change a status, not by
  triggers (which need SUPER with binary logging on, and which some MySQL-compatible servers
  lack): the triggers go, and the counts are set again from the rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLLATION = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
TRIGGERS = (
    "invoice_count_after_insert",
    "invoice_count_after_update",
    "invoice_count_after_delete",
)
RECOUNT = (
    "UPDATE invoice_status_count SET invoice_count = 0",
    """
    UPDATE invoice_status_count
    SET invoice_count = (
        SELECT COUNT(*) FROM invoice WHERE invoice.invoice_status = invoice_status_count.invoice_status
    )
    WHERE shard = 0
    """,
)


def upgrade() -> None:
    # Only those that exist: with binary logging on, even DROP TRIGGER IF EXISTS needs SUPER.
    present = op.get_bind().execute(
        sa.text(
            "SELECT trigger_name FROM information_schema.triggers "
            "WHERE trigger_schema = DATABASE() AND trigger_name IN :names"
        ).bindparams(sa.bindparam("names", expanding=True)),
        {"names": list(TRIGGERS)},
    )
    for (trigger,) in present.all():
        op.execute(f"DROP TRIGGER {trigger}")
    for statement in RECOUNT:
        op.execute(statement)
    op.execute(f"ALTER DATABASE {COLLATION}")
    # A foreign key's two columns must change collation together: drop it, convert, re-add
    # (MariaDB refuses the conversion under the key with error 1832).
    op.drop_constraint("fk_payment_invoice", "payment", type_="foreignkey")
    op.drop_index("uq_customer_email", "customer")
    tables = (
        "customer",
        "invoice",
        "payment",
        "api_key",
        "invoice_status_count",
        "alembic_version",
    )
    for table in tables:
        op.execute(f"ALTER TABLE {table} CONVERT TO {COLLATION}")
    op.execute(
        f"""
        ALTER TABLE idempotency_key
            DEFAULT {COLLATION},
            MODIFY fingerprint CHAR(64) {COLLATION} NOT NULL,
            MODIFY invoice_id CHAR(36) {COLLATION} NOT NULL,
            MODIFY response_body TEXT {COLLATION} NULL
        """
    )
    op.execute(
        "ALTER TABLE customer ADD COLUMN customer_email_key VARCHAR(255) "
        "AS (LOWER(customer_email)) STORED AFTER customer_email, "
        "ADD UNIQUE INDEX uq_customer_email (customer_email_key)"
    )
    op.create_foreign_key("fk_payment_invoice", "payment", "invoice", ["invoice_id"], ["id"])


def downgrade() -> None:
    raise NotImplementedError("0002 is not undone: restore a backup taken before the upgrade")
