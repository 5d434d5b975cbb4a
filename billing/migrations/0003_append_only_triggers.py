"""On PostgreSQL the database itself keeps billing's history: the usage log and the ledger refuse
UPDATE and DELETE, price book versions are never edited, and a final invoice never changes."""

from django.db import migrations

APPEND_ONLY = ["billing_usagerecord", "billing_ledgerentry", "billing_pricebookversion", "billing_priceitem",
               "billing_volumeband", "billing_packageoffer"]

CREATE = """
CREATE OR REPLACE FUNCTION billing_append_only() RETURNS trigger AS $$
BEGIN
    -- Rewriting a row with what it already holds changes no history (test fixtures reload rows so).
    IF TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION billing_final_invoice_frozen() RETURNS trigger AS $$
BEGIN
    IF OLD.status = 'final' AND NOT (TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD) THEN
        RAISE EXCEPTION 'invoice % is final and never changes (% refused)', OLD.number, TG_OP;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION billing_final_invoice_lines_frozen() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM billing_invoice WHERE id = OLD.invoice_id AND status = 'final')
       AND NOT (TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD) THEN
        RAISE EXCEPTION 'lines of a final invoice never change (% refused)', TG_OP;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_invoice_final_frozen BEFORE UPDATE OR DELETE ON billing_invoice
    FOR EACH ROW EXECUTE FUNCTION billing_final_invoice_frozen();
CREATE TRIGGER billing_invoiceline_final_frozen BEFORE UPDATE OR DELETE ON billing_invoiceline
    FOR EACH ROW EXECUTE FUNCTION billing_final_invoice_lines_frozen();
CREATE TRIGGER billing_chargeday_final_frozen BEFORE UPDATE OR DELETE ON billing_chargeday
    FOR EACH ROW EXECUTE FUNCTION billing_final_invoice_lines_frozen_day();
"""

CHARGE_DAY = """
CREATE OR REPLACE FUNCTION billing_final_invoice_lines_frozen_day() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM billing_invoiceline l JOIN billing_invoice i ON i.id = l.invoice_id
               WHERE l.id = OLD.line_id AND i.status = 'final')
       AND NOT (TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD) THEN
        RAISE EXCEPTION 'days of a final invoice never change (% refused)', TG_OP;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$ LANGUAGE plpgsql;
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(CHARGE_DAY, params=None)
    schema_editor.execute(CREATE, params=None)
    for table in APPEND_ONLY:
        schema_editor.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION billing_append_only();",
            params=None,
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in APPEND_ONLY:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table};", params=None)
    schema_editor.execute(
        "DROP TRIGGER IF EXISTS billing_invoice_final_frozen ON billing_invoice;"
        "DROP TRIGGER IF EXISTS billing_invoiceline_final_frozen ON billing_invoiceline;"
        "DROP TRIGGER IF EXISTS billing_chargeday_final_frozen ON billing_chargeday;"
        "DROP FUNCTION IF EXISTS billing_append_only();"
        "DROP FUNCTION IF EXISTS billing_final_invoice_frozen();"
        "DROP FUNCTION IF EXISTS billing_final_invoice_lines_frozen();"
        "DROP FUNCTION IF EXISTS billing_final_invoice_lines_frozen_day();",
        params=None,
    )


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_seed_price_book")]
    operations = [migrations.RunPython(create, drop)]
