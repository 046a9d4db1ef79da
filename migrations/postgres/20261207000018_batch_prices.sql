-- A price version's discount on batch lines (SPEC §11), in percent of the interactive
-- charge; NULL: batch lines cost what interactive calls do. A batch line's usage record is
-- the one whose request id is `{batch}_req_{line}` (gateway-made ids; interactive ones are
-- `req_...`).
ALTER TABLE prices ADD COLUMN batch_discount_pct BIGINT;
