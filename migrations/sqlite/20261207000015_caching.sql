-- Caching: prompt tokens read from a worker's prefix cache, and responses served whole
-- from the gateway's response cache, are recorded and priced apart.

-- A price version's rate for cached prompt tokens; NULL: they cost the input rate.
ALTER TABLE prices ADD COLUMN cached_input_minor_per_mtok BIGINT
    CHECK (cached_input_minor_per_mtok >= 0);

-- Of a record's prompt tokens, those read from the worker's prefix cache.
ALTER TABLE usage_records ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0
    CHECK (cached_tokens >= 0);
-- Set on a response served from the response cache: the plan's rate per million hits when
-- it was served, which replaces the token rates for that record.
ALTER TABLE usage_records ADD COLUMN cache_hit_minor_per_mreq BIGINT
    CHECK (cache_hit_minor_per_mreq >= 0);

-- A plan opts its tenants in to the response cache by giving entries a lifetime.
ALTER TABLE plans ADD COLUMN response_cache_ttl_s BIGINT CHECK (response_cache_ttl_s > 0);
ALTER TABLE plans ADD COLUMN cache_hit_minor_per_mreq BIGINT NOT NULL DEFAULT 0
    CHECK (cache_hit_minor_per_mreq >= 0);
