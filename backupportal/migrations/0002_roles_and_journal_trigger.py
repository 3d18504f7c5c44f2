"""The DBA, Sysadmin and Auditor groups; on PostgreSQL, a trigger that keeps the journal append-only."""

from django.db import migrations

TRIGGER = """
CREATE OR REPLACE FUNCTION backupportal_journal_append_only() RETURNS trigger AS $$
BEGIN
    -- The one UPDATE allowed: signing a row just inserted (hmac '' -> its value), once.
    IF TG_OP = 'UPDATE' AND OLD.hmac = '' AND NEW.hmac <> ''
       AND (to_jsonb(OLD) - 'hmac') = (to_jsonb(NEW) - 'hmac') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'the operations journal is append-only: % refused', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON backupportal_journalentry
    FOR EACH ROW EXECUTE FUNCTION backupportal_journal_append_only();
"""

DROP = """
DROP TRIGGER IF EXISTS journal_append_only ON backupportal_journalentry;
DROP FUNCTION IF EXISTS backupportal_journal_append_only();
"""


def create_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        # params=None: the function's own '%' must not be read as a query placeholder.
        schema_editor.execute(TRIGGER, params=None)


def drop_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


def create_groups(apps, schema_editor):
    from backupportal.roles import sync_groups

    # sync_groups creates our apps' permissions first: normally that happens after all migrations.
    sync_groups(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("backupportal", "0001_initial"),
        ("backups", "0001_initial"),
        ("restores", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RunPython(create_groups, migrations.RunPython.noop),
        migrations.RunPython(create_trigger, drop_trigger),
    ]
