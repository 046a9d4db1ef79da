-- Only invoiced records need finding by invoice: index those, so recording new (not yet
-- invoiced) usage writes one index fewer. Postgres has had this partial index since its
-- table was partitioned.
DROP INDEX usage_records_invoice;
CREATE INDEX usage_records_invoice ON usage_records (invoice_id) WHERE invoice_id IS NOT NULL;
