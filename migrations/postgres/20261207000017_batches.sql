-- The Batch API (SPEC §11). Files hold their content in the store, so every replica reads
-- them and a restart keeps them; each is deleted after its `expires_at`. A batch's lines
-- are rows a replica leases a few at a time: a lease that lapses (its replica died) gives
-- the line to another, and a line's usage record is keyed by batch and line, so running
-- it again never bills it twice. Lines go once the batch's output files are written.
CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    purpose     TEXT NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    line_count  BIGINT NOT NULL,
    content     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX files_tenant ON files (tenant_id, created_at);
CREATE INDEX files_expiry ON files (expires_at);

CREATE TABLE batches (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    endpoint       TEXT NOT NULL,
    input_file_id  TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('validating', 'in_progress', 'finalizing',
                       'completed', 'failed', 'cancelling', 'cancelled', 'expired')),
    -- What the batch ends as once its lines are done: completed, cancelled, expired, failed.
    ending         TEXT,
    metadata       TEXT,
    errors         TEXT,
    total          BIGINT NOT NULL,
    completed      BIGINT NOT NULL DEFAULT 0,
    failed         BIGINT NOT NULL DEFAULT 0,
    output_file_id TEXT,
    error_file_id  TEXT,
    created_at     BIGINT NOT NULL,
    in_progress_at BIGINT,
    finalizing_at  BIGINT,
    completed_at   BIGINT,
    failed_at      BIGINT,
    cancelling_at  BIGINT,
    cancelled_at   BIGINT,
    expired_at     BIGINT,
    expires_at     BIGINT NOT NULL
);
CREATE INDEX batches_tenant ON batches (tenant_id, created_at);
CREATE INDEX batches_open ON batches (status);

CREATE TABLE batch_lines (
    batch_id     TEXT NOT NULL,
    line         BIGINT NOT NULL,
    custom_id    TEXT NOT NULL,
    body         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    result       TEXT,
    lease_owner  TEXT,
    lease_until  BIGINT,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_lines_pending ON batch_lines (batch_id, status, lease_until);
