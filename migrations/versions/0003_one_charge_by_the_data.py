"""One charge per invoice, enforced by the data; operators resolve unknown outcomes.

- `payment.unsettled` is 1 while an attempt's outcome is open (PROCESSING, or UNKNOWN until
  it is resolved or replaced) and `payment.succeeded` is 1 on the attempt that charged the
  invoice; NULL otherwise. A unique key on each, with the invoice id, lets the database
  refuse a second open or a second successful attempt for an invoice, wherever it runs (on a
  cluster, at certification): NULLs never collide. Existing rows get the markers on the
  newest attempt of each kind per invoice.
- `invoice.payment_attempts` counts the attempts claimed: every claim writes the invoice row,
  so on a multi-primary cluster a claim and a concurrent settle or cancel of the same invoice
  conflict at certification instead of both committing.
- `ix_payment_status (payment_status, id)`: the attempts in one state, newest first, for
  `GET /payments?status=` and for the sweep that turns stalled PROCESSING attempts UNKNOWN.
- `payment.resolved_at` / `resolved_by`: when an operator settled an UNKNOWN attempt, and
  with which API key.
- API keys gain the `admin` scope (read < write < admin).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE payment
            ADD COLUMN unsettled TINYINT NULL AFTER reason,
            ADD COLUMN succeeded TINYINT NULL AFTER unsettled,
            ADD COLUMN resolved_at DATETIME(6) NULL AFTER succeeded,
            ADD COLUMN resolved_by VARCHAR(64) NULL AFTER resolved_at
        """
    )
    # The newest open and the newest successful attempt of each invoice carry the markers
    # (a backfill, not a change to the attempt: modified_at stays).
    for marker, states in (("unsettled", "'PROCESSING', 'UNKNOWN'"), ("succeeded", "'SUCCEEDED'")):
        op.execute(
            f"""
            UPDATE payment JOIN (
                SELECT MAX(id) AS id FROM payment
                WHERE payment_status IN ({states}) GROUP BY invoice_id
            ) AS newest ON newest.id = payment.id
            SET payment.{marker} = 1, payment.modified_at = payment.modified_at
            """
        )
    op.execute(
        """
        ALTER TABLE payment
            ADD CONSTRAINT ck_payment_unsettled CHECK (unsettled = 1),
            ADD CONSTRAINT ck_payment_succeeded CHECK (succeeded = 1),
            ADD UNIQUE INDEX uq_payment_unsettled (invoice_id, unsettled),
            ADD UNIQUE INDEX uq_payment_succeeded (invoice_id, succeeded),
            ADD INDEX ix_payment_status (payment_status, id)
        """
    )
    op.execute(
        "ALTER TABLE invoice ADD COLUMN payment_attempts INT NOT NULL DEFAULT 0 "
        "AFTER invoice_status"
    )
    op.execute("ALTER TABLE api_key DROP CONSTRAINT ck_api_key_scope")
    op.execute(
        "ALTER TABLE api_key ADD CONSTRAINT ck_api_key_scope "
        "CHECK (scope IN ('read', 'write', 'admin'))"
    )


def downgrade() -> None:
    raise NotImplementedError("0003 is not undone: restore a backup taken before the upgrade")
