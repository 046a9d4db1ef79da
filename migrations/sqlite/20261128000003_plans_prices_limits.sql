-- Plans hold a tenant to limits; NULL means "no limit" for that dimension.
-- Spend is in minor units of the price book's currency (cents for USD).
CREATE TABLE plans (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    requests_per_minute  BIGINT CHECK (requests_per_minute > 0),
    tokens_per_minute    BIGINT CHECK (tokens_per_minute > 0),
    max_concurrent       BIGINT CHECK (max_concurrent > 0),
    monthly_tokens       BIGINT CHECK (monthly_tokens >= 0),
    monthly_spend_minor  BIGINT CHECK (monthly_spend_minor >= 0),
    created_at           BIGINT NOT NULL
);

ALTER TABLE tenants ADD COLUMN plan_id TEXT REFERENCES plans (id);

-- A key may narrow its tenant's plan: these apply to the key alone, on top of the plan.
ALTER TABLE api_keys ADD COLUMN requests_per_minute BIGINT CHECK (requests_per_minute > 0);
ALTER TABLE api_keys ADD COLUMN tokens_per_minute BIGINT CHECK (tokens_per_minute > 0);
ALTER TABLE api_keys ADD COLUMN max_concurrent BIGINT CHECK (max_concurrent > 0);
ALTER TABLE api_keys ADD COLUMN monthly_tokens BIGINT CHECK (monthly_tokens >= 0);
ALTER TABLE api_keys ADD COLUMN monthly_spend_minor BIGINT CHECK (monthly_spend_minor >= 0);

-- The price book: one row per model and version; a version applies from its
-- effective_from (Unix ms, inclusive) until the next version of the same model.
-- Prices are integer minor units per million tokens (or per million requests), so the
-- cost of any usage is an exact integer in millionths of a minor unit.
CREATE TABLE prices (
    model                      TEXT NOT NULL,
    effective_from             BIGINT NOT NULL,
    currency                   TEXT NOT NULL,
    input_minor_per_mtok       BIGINT NOT NULL CHECK (input_minor_per_mtok >= 0),
    output_minor_per_mtok      BIGINT NOT NULL CHECK (output_minor_per_mtok >= 0),
    request_minor_per_mreq     BIGINT NOT NULL CHECK (request_minor_per_mreq >= 0),
    created_at                 BIGINT NOT NULL,
    PRIMARY KEY (model, effective_from)
);

-- Admission state shared by every gateway replica, one row per limited scope
-- ('t:<tenant id>' for the plan, 'k:<key id>' for a key's own limits).
-- *_level: leaky buckets for the per-minute limits, in units x 60,000,000 (so a bucket
-- drains `limit` units' worth per microsecond and holds at most limit x 60,000,000),
-- as of levels_at_us (Unix microseconds).
-- used_* count the current period (UTC month, 'YYYY-MM'); reserved_* are admitted
-- requests not yet settled. Spend is in millionths of a minor unit.
CREATE TABLE limit_counters (
    scope            TEXT PRIMARY KEY,
    requests_level   BIGINT NOT NULL DEFAULT 0,
    tokens_level     BIGINT NOT NULL DEFAULT 0,
    levels_at_us     BIGINT NOT NULL DEFAULT 0,
    in_flight        BIGINT NOT NULL DEFAULT 0,
    period           TEXT NOT NULL DEFAULT '',
    used_tokens      BIGINT NOT NULL DEFAULT 0,
    reserved_tokens  BIGINT NOT NULL DEFAULT 0,
    used_spend       BIGINT NOT NULL DEFAULT 0,
    reserved_spend   BIGINT NOT NULL DEFAULT 0
);

-- One row per admitted, unsettled request. A replica that dies leaves its rows behind;
-- any replica releases them once expired.
CREATE TABLE reservations (
    request_id  TEXT PRIMARY KEY,
    scopes      TEXT NOT NULL,
    tokens      BIGINT NOT NULL,
    spend       BIGINT NOT NULL,
    period      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (expires_at);
