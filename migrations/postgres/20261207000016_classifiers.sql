-- Classifiers trained on a tenant's own examples (SPEC §12). The examples are kept only
-- until training ends; the trained head (JSON) and its metrics stay. A replica trains a
-- classifier while it holds its lease, so replicas never train the same one twice at once
-- and a replica that died leaves its work to another.
CREATE TABLE classifiers (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    name         TEXT NOT NULL,
    model        TEXT NOT NULL,
    labels       TEXT NOT NULL,
    options      TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('training', 'ready', 'failed')),
    progress     TEXT,
    examples     TEXT,
    example_count BIGINT NOT NULL,
    metrics      TEXT,
    head         TEXT,
    error        TEXT,
    tokens       BIGINT NOT NULL DEFAULT 0,
    lease_owner  TEXT,
    lease_until  BIGINT,
    created_at   BIGINT NOT NULL,
    finished_at  BIGINT
);
CREATE INDEX classifiers_tenant ON classifiers (tenant_id, created_at);
CREATE INDEX classifiers_training ON classifiers (status, lease_until);
