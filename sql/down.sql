-- Drops the invoice tables from the current database (children first).

DROP TABLE IF EXISTS idempotency_key;
DROP TABLE IF EXISTS api_key;
DROP TABLE IF EXISTS payment;
DROP TABLE IF EXISTS invoice_status_count;
DROP TABLE IF EXISTS invoice;
DROP TABLE IF EXISTS customer;
