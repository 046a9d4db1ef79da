-- Tenants own keys; keys are stored only as SHA-256 hashes of the full secret.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,          -- the public id embedded in the key
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    name            TEXT NOT NULL,
    secret_hash     TEXT NOT NULL,             -- hex SHA-256 of the whole key
    allowed_models  TEXT,                      -- comma-separated; NULL = every model
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT,
    revoked_at      BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- One row per served request; the request id is unique forever.
CREATE TABLE usage_records (
    request_id         TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    endpoint           TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens  BIGINT NOT NULL CHECK (completion_tokens >= 0),
    started_at         BIGINT NOT NULL,
    finished_at        BIGINT NOT NULL,
    status             TEXT NOT NULL
);
CREATE INDEX usage_records_tenant_time ON usage_records (tenant_id, started_at);
CREATE INDEX usage_records_time ON usage_records (started_at);
