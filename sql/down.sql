-- Drops the invoice tables from the current database (children first), with Alembic's
-- record of the revision they were at.

DROP TABLE IF EXISTS idempotency_key;
DROP TABLE IF EXISTS api_key;
DROP TABLE IF EXISTS payment;
DROP TABLE IF EXISTS invoice_status_count;
DROP TABLE IF EXISTS invoice;
DROP TABLE IF EXISTS customer;
DROP TABLE IF EXISTS alembic_version;
