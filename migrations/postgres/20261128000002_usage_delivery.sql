-- Whether the response reached its client: delivered, undelivered (the client left
-- first), or unknown (the gateway stopped before it knew: the request was in flight).
ALTER TABLE usage_records ADD COLUMN delivery TEXT NOT NULL DEFAULT 'delivered';
