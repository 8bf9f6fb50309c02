-- Creates the invoice tables in the current database and loads the seed data: the schema of
-- the head migration (migrations/), which the tests prove this script matches, stamped with
-- that revision so `make db-up` knows where the database stands.
-- MySQL 8.0.16 or later, or MariaDB 10.6 or later; needs no SUPER, binary logging on or off.

CREATE TABLE customer (
    customer_id        INT          NOT NULL AUTO_INCREMENT,
    customer_name      VARCHAR(100) NOT NULL,
    customer_email     VARCHAR(255) NOT NULL,
    -- unique ignoring letter case only: LOWER() folds no accents, and no ß into ss
    customer_email_key VARCHAR(255) AS (LOWER(customer_email)) STORED,
    PRIMARY KEY (customer_id),
    UNIQUE INDEX uq_customer_email (customer_email_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE invoice (
    id              CHAR(36)      NOT NULL,
    customer_id     INT           NOT NULL,
    job_description VARCHAR(255)  NOT NULL,
    amount          DECIMAL(12,2) NOT NULL,
    invoice_status  VARCHAR(10)   NOT NULL DEFAULT 'PENDING',
    -- claims so far: every claim writes the invoice row, so on a multi-primary cluster a
    -- claim and a concurrent settle or cancel of the invoice conflict at certification
    payment_attempts INT          NOT NULL DEFAULT 0,
    created_at      DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    modified_at     DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    CONSTRAINT fk_invoice_customer FOREIGN KEY (customer_id) REFERENCES customer (customer_id),
    CONSTRAINT ck_invoice_amount CHECK (amount > 0),
    CONSTRAINT ck_invoice_status CHECK (invoice_status IN ('PENDING', 'PAID', 'CANCELLED')),
    -- GET /invoices: newest first, with and without the status filter, by date range, and
    -- for one customer (also the foreign key's index)
    INDEX ix_invoice_created (created_at, id),
    INDEX ix_invoice_status_created (invoice_status, created_at, id),
    INDEX ix_invoice_customer_created (customer_id, created_at, id),
    INDEX ix_invoice_customer_status_created (customer_id, invoice_status, created_at, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per attempt to charge a card for an invoice; never the full card number. The
-- database refuses a second open (PROCESSING or UNKNOWN) and a second successful attempt for
-- an invoice: the markers `unsettled` and `succeeded` are 1 or NULL, and NULLs never collide.
CREATE TABLE payment (
    id             BIGINT       NOT NULL AUTO_INCREMENT,
    invoice_id     CHAR(36)     NOT NULL,
    card_number    CHAR(18)     NOT NULL,
    card_name      VARCHAR(50)  NOT NULL,
    card_expiry    CHAR(7)      NOT NULL,
    payment_status VARCHAR(10)  NOT NULL DEFAULT 'PROCESSING',
    reason         VARCHAR(255) NULL,
    unsettled      TINYINT      NULL,
    succeeded      TINYINT      NULL,
    resolved_at    DATETIME(6)  NULL,
    resolved_by    VARCHAR(64)  NULL,
    created_at     DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    modified_at    DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    CONSTRAINT ck_payment_status CHECK (
        payment_status IN
            ('PROCESSING', 'SUCCEEDED', 'DECLINED', 'FAILED', 'UNKNOWN', 'ABANDONED', 'REFUND_DUE')),
    INDEX ix_payment_invoice_status (invoice_id, payment_status),
    CONSTRAINT ck_payment_unsettled CHECK (unsettled = 1),
    CONSTRAINT ck_payment_succeeded CHECK (succeeded = 1),
    UNIQUE INDEX uq_payment_unsettled (invoice_id, unsettled),
    UNIQUE INDEX uq_payment_succeeded (invoice_id, succeeded),
    -- the attempts in one state, newest first: GET /payments?status=, the stalled-attempt sweep
    INDEX ix_payment_status (payment_status, id),
    CONSTRAINT fk_payment_invoice FOREIGN KEY (invoice_id) REFERENCES invoice (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Idempotency-Key: the first reply to a request, replayed to its retries. A row is written in
-- the same transaction as the first change its request makes (an invoice created, a payment
-- attempt recorded); `response_status` stays NULL until that request has answered.
CREATE TABLE idempotency_key (
    owner           VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
    idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    fingerprint     CHAR(64)     NOT NULL,
    invoice_id      CHAR(36)     NOT NULL,
    -- the last step its request reached (invoice_created, payment_started); NULL once replied
    recovery_point  VARCHAR(16)  NULL,
    -- the payment attempt of payment_started: only its outcome may store the reply
    payment_id      INT          NULL,
    response_status SMALLINT     NULL,
    response_body   TEXT         NULL,
    created_at      DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    expires_at      DATETIME(6)  NOT NULL,
    PRIMARY KEY (owner, idempotency_key),
    INDEX ix_idempotency_key_expires (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- API keys (AUTH=on): the SHA-256 of each secret, never the secret; a prefix to recognise it.
CREATE TABLE api_key (
    id           INT          NOT NULL AUTO_INCREMENT,
    name         VARCHAR(64)  NOT NULL,
    scope        VARCHAR(5)   NOT NULL,
    secret_hash  CHAR(64)     NOT NULL,
    prefix       VARCHAR(16)  NOT NULL,
    created_at   DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    last_used_at DATETIME(6)  NULL,
    revoked_at   DATETIME(6)  NULL,
    PRIMARY KEY (id),
    UNIQUE INDEX uq_api_key_name (name),
    UNIQUE INDEX uq_api_key_secret_hash (secret_hash),
    CONSTRAINT ck_api_key_scope CHECK (scope IN ('read', 'write', 'admin'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Exact invoice totals per status for GET /invoices without COUNT(*) over millions of rows.
-- Every transaction that inserts an invoice or changes its status updates them too. Each
-- status is spread over 16 shard rows, chosen by connection, so concurrent writers do not
-- queue on one hot row; a total is the sum of its shards.
CREATE TABLE invoice_status_count (
    invoice_status VARCHAR(10) NOT NULL,
    shard          TINYINT     NOT NULL,
    invoice_count  BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (invoice_status, shard)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Alembic's record of the revision this schema is at.
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    PRIMARY KEY (version_num)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

INSERT INTO alembic_version (version_num) VALUES ('0005');

INSERT INTO invoice_status_count (invoice_status, shard)
WITH RECURSIVE shards (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM shards WHERE n < 15)
SELECT statuses.invoice_status, shards.n
FROM (SELECT 'PENDING' AS invoice_status UNION ALL SELECT 'PAID' UNION ALL SELECT 'CANCELLED')
    AS statuses
CROSS JOIN shards;

INSERT INTO customer (customer_id, customer_name, customer_email) VALUES
    (1, 'John Doe', 'john.doe@example.com'),
    (2, 'Jane Smith', 'jane.smith@example.com'),
    (3, 'Seth Hall', 'seth.hall@paymark.co.nz'),
    (4, 'Amanda Lee', 'amanda.lee@paymark.co.nz'),
    (5, 'Robert Smith', 'rob.smith@email.com');

INSERT INTO invoice (id, customer_id, job_description, amount, invoice_status, created_at, modified_at) VALUES
    ('6f53c4e0-0369-11f0-8d97-7c646cb7c0bc', 1, 'Website Development', 450.75, 'PAID',
        '2025-03-17 09:00:00', '2025-03-17 09:00:00'),
    ('6f53c6a2-0369-11f0-8d97-7c646cb7c0bc', 1, 'Graphic Design Service', 220.50, 'PAID',
        '2025-03-17 09:05:00', '2025-03-17 09:05:00'),
    ('6f53c715-0369-11f0-8d97-7c646cb7c0bc', 3, 'SEO Optimization', 175.00, 'PENDING',
        '2025-03-17 09:10:00', '2025-03-17 09:10:00'),
    ('a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc', 4, 'Software License Fee', 99.99, 'CANCELLED',
        '2025-03-17 09:15:00', '2025-03-17 09:15:00'),
    ('6f53c7be-0369-11f0-8d97-7c646cb7c0bc', 3, 'Consultation Service', 300.25, 'PENDING',
        '2025-03-17 09:20:00', '2025-03-17 09:20:00');

-- The seed invoices' counts (PAID 2, PENDING 2, CANCELLED 1), in the first shard.
UPDATE invoice_status_count
SET invoice_count = (
    SELECT COUNT(*) FROM invoice WHERE invoice.invoice_status = invoice_status_count.invoice_status
)
WHERE shard = 0;
