"""An Idempotency-Key names the payment attempt its request started.

`idempotency_key.recovery_point` is now the last step the key's request reached, written in
the transaction of that step's change (`invoice_created`, `payment_started`, NULL once the
reply is stored). `payment_id` is the attempt of `payment_started`: the outcome of exactly that
attempt, and nothing else, may store the reply or rewind the key, so an outcome recorded late
(a settle's retry after a lost acknowledgement, the background recorder) can never overwrite
the row of a later request with the same key.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE idempotency_key ADD COLUMN payment_id INT NULL AFTER recovery_point")


def downgrade() -> None:
    op.execute("ALTER TABLE idempotency_key DROP COLUMN payment_id")
