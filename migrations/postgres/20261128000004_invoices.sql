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

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END;
$$;
CREATE TRIGGER invoices_are_immutable BEFORE UPDATE OR DELETE ON invoices
FOR EACH ROW EXECUTE FUNCTION refuse_change('finalised invoices are immutable');
-- A record on a finalised invoice keeps its quantities, delivery and invoice.
CREATE TRIGGER invoiced_usage_is_frozen BEFORE UPDATE ON usage_records
FOR EACH ROW WHEN (OLD.invoice_id IS NOT NULL)
EXECUTE FUNCTION refuse_change('usage on a finalised invoice is frozen');
