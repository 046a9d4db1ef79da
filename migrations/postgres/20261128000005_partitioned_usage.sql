-- Usage records partitioned by month of `started_at` (UTC), for hundreds of millions of
-- rows: queries by period touch only their months, old months can be detached and
-- archived whole. A unique index on a partitioned table must contain the partition key,
-- so the forever-unique request id is enforced by `usage_request_ids`, which every insert
-- goes through (see billing/src/usage.rs); the records' key is (started_at, request_id).
-- Indexes are kept to what reads need, since each one costs every insert: the key, the
-- tenant's time index, and invoice ids only where set (the insert path never sets one).

ALTER TABLE usage_records RENAME TO usage_records_unpartitioned;
ALTER INDEX usage_records_tenant_time RENAME TO usage_records_unpartitioned_tenant_time;
ALTER INDEX usage_records_time RENAME TO usage_records_unpartitioned_time;
ALTER INDEX usage_records_invoice RENAME TO usage_records_unpartitioned_invoice;
DROP TRIGGER invoiced_usage_is_frozen ON usage_records_unpartitioned;

CREATE TABLE usage_request_ids (
    request_id  TEXT PRIMARY KEY,
    started_at  BIGINT NOT NULL
);

CREATE TABLE usage_records (
    request_id         TEXT NOT NULL,
    tenant_id          TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    endpoint           TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens  BIGINT NOT NULL CHECK (completion_tokens >= 0),
    started_at         BIGINT NOT NULL,
    finished_at        BIGINT NOT NULL,
    status             TEXT NOT NULL,
    delivery           TEXT NOT NULL DEFAULT 'delivered',
    invoice_id         TEXT,
    -- Time first: serves the exports' (started_at, request_id) order and period scans, and
    -- the ledger's replay lookups (both columns known).
    PRIMARY KEY (started_at, request_id)
) PARTITION BY RANGE (started_at);

-- Rows outside every monthly partition land here, so an insert never fails for want of a
-- partition; the gateway keeps partitions made a few months ahead.
CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

-- Creates the monthly partitions `usage_records_pYYYYMM` covering [from_ms, to_ms) that do
-- not exist yet; returns how many it made (another gateway making the same one at the same
-- moment is fine). A month whose rows already sit in the default
-- partition is left there (creating it would fail), so this never errors on old data.
CREATE FUNCTION ensure_usage_partitions(from_ms BIGINT, to_ms BIGINT) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    month_start TIMESTAMP := date_trunc('month', to_timestamp(from_ms / 1000.0) AT TIME ZONE 'UTC');
    month_end   TIMESTAMP;
    lo BIGINT;
    hi BIGINT;
    name TEXT;
    made INTEGER := 0;
BEGIN
    WHILE (EXTRACT(EPOCH FROM (month_start AT TIME ZONE 'UTC')) * 1000)::BIGINT < to_ms LOOP
        month_end := month_start + INTERVAL '1 month';
        lo := (EXTRACT(EPOCH FROM (month_start AT TIME ZONE 'UTC')) * 1000)::BIGINT;
        hi := (EXTRACT(EPOCH FROM (month_end AT TIME ZONE 'UTC')) * 1000)::BIGINT;
        name := 'usage_records_p' || to_char(month_start, 'YYYYMM');
        IF to_regclass(name) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF usage_records FOR VALUES FROM (%s) TO (%s)',
                               name, lo, hi);
                made := made + 1;
            EXCEPTION WHEN check_violation OR invalid_object_definition OR duplicate_table THEN
                RAISE NOTICE 'month % stays in the default partition', name;
            END;
        END IF;
        month_start := month_end;
    END LOOP;
    RETURN made;
END;
$$;

SELECT ensure_usage_partitions(
    COALESCE((SELECT MIN(started_at) FROM usage_records_unpartitioned),
             (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT),
    (EXTRACT(EPOCH FROM now() + INTERVAL '100 days') * 1000)::BIGINT);

INSERT INTO usage_records
SELECT request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens,
       started_at, finished_at, status, delivery, invoice_id
FROM usage_records_unpartitioned;
INSERT INTO usage_request_ids SELECT request_id, started_at FROM usage_records_unpartitioned;
DROP TABLE usage_records_unpartitioned;

CREATE INDEX usage_records_tenant_time ON usage_records (tenant_id, started_at);
CREATE INDEX usage_records_invoice ON usage_records (invoice_id) WHERE invoice_id IS NOT NULL;

CREATE TRIGGER invoiced_usage_is_frozen BEFORE UPDATE ON usage_records
FOR EACH ROW WHEN (OLD.invoice_id IS NOT NULL)
EXECUTE FUNCTION refuse_change('usage on a finalised invoice is frozen');
