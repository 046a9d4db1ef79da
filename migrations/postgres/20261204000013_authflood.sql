-- Replicas sync recent revocations into their key caches: find them without a scan.
CREATE INDEX api_keys_revoked_at ON api_keys (revoked_at) WHERE revoked_at IS NOT NULL;
