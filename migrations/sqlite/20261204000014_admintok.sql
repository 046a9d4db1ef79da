-- Revoked admin tokens by their `jti`: every admin request's token is looked up here
-- after its signature and claims check out. Rows are kept (revocations are rare and
-- small), so a revoked token stays refused whatever its lifetime.
CREATE TABLE admin_token_revocations (
    jti TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL,
    revoked_by TEXT NOT NULL
);
