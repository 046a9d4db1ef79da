-- Volume tiers of a price version, as JSON: [{"from_tokens", "input_minor_per_mtok",
-- "output_minor_per_mtok"}, ...] by increasing from_tokens; NULL: flat rates.
ALTER TABLE prices ADD COLUMN tiers TEXT;
