-- Concurrency slots a reservation holds: 1 for a request; a replica's quota lease
-- (request_id 'lease:<replica>:<scope>') holds as many as it was granted, and releasing
-- an expired lease gives all of them back.
ALTER TABLE reservations ADD COLUMN slots BIGINT NOT NULL DEFAULT 1;
