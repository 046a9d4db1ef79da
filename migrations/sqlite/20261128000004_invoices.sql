-- Which finalised invoice counted a usage record (billed or rejected); NULL: none yet.
ALTER TABLE usage_records ADD COLUMN invoice_id TEXT;
CREATE INDEX usage_records_invoice ON usage_records (invoice_id);

-- Finalised invoices: one per tenant and month, never changed (see the triggers).
-- `document` is the invoice's canonical JSON, lines included.
CREATE TABLE invoices (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    period        TEXT NOT NULL,
    currency      TEXT NOT NULL,
    total_minor   BIGINT NOT NULL,
    records       BIGINT NOT NULL,
    document      TEXT NOT NULL,
    finalised_at  BIGINT NOT NULL,
    UNIQUE (tenant_id, period)
);

CREATE TRIGGER invoices_are_immutable_update BEFORE UPDATE ON invoices
BEGIN SELECT RAISE(ABORT, 'finalised invoices are immutable'); END;
CREATE TRIGGER invoices_are_immutable_delete BEFORE DELETE ON invoices
BEGIN SELECT RAISE(ABORT, 'finalised invoices are immutable'); END;
-- A record on a finalised invoice keeps its quantities, delivery and invoice.
CREATE TRIGGER invoiced_usage_is_frozen BEFORE UPDATE ON usage_records
WHEN OLD.invoice_id IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'usage on a finalised invoice is frozen'); END;
