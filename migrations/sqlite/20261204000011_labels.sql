-- A record on a finalised invoice cannot be deleted either: the invoice counted it.
CREATE TRIGGER invoiced_usage_is_undeletable BEFORE DELETE ON usage_records
WHEN OLD.invoice_id IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'usage on a finalised invoice is frozen'); END;
