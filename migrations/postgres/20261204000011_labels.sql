-- A record on a finalised invoice cannot be deleted either: the invoice counted it.
CREATE TRIGGER invoiced_usage_is_undeletable BEFORE DELETE ON usage_records
FOR EACH ROW WHEN (OLD.invoice_id IS NOT NULL)
EXECUTE FUNCTION refuse_change('usage on a finalised invoice is frozen');
