"""An Idempotency-Key whose first reply said "try again" is resumed, not replayed.

`idempotency_key.recovery_point` is NULL while the key's request runs (or after it stopped
without a reply), and names the last step done when the request ended with a reply that asks
the client to retry (a 503, or a 409 with Retry-After): `invoice_created` for POST /invoice
with a card whose payment could not start. A retry with the same key resumes from there (it
pays the invoice already created) instead of replaying the 503 or creating a second invoice.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE idempotency_key ADD COLUMN recovery_point VARCHAR(16) NULL AFTER invoice_id"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE idempotency_key DROP COLUMN recovery_point")
