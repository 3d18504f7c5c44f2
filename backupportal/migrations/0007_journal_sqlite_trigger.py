"""On SQLite, the same append-only rule as PostgreSQL's trigger (0002): no UPDATE, no DELETE.

The one UPDATE allowed is the one record() makes: signing a row just inserted (hmac '' -> its
value), every other column unchanged. SQLite rebuilds a table to alter it, which drops its
triggers: a later migration that alters the journal table must create these again.
"""

from django.db import migrations

# Every column but hmac: unchanged by the signing UPDATE. `IS` also compares NULLs.
COLUMNS = [
    "id",
    "at",
    "actor",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "server",
    "outcome",
    "details",
    "prev_hmac",
]

SIGNING = " AND ".join(["OLD.hmac = ''", "NEW.hmac <> ''"] + [f"NEW.{c} IS OLD.{c}" for c in COLUMNS])

TRIGGERS = [
    f"""CREATE TRIGGER journal_append_only_update BEFORE UPDATE ON backupportal_journalentry
    FOR EACH ROW WHEN NOT ({SIGNING})
    BEGIN SELECT RAISE(ABORT, 'the operations journal is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER journal_append_only_delete BEFORE DELETE ON backupportal_journalentry
    FOR EACH ROW
    BEGIN SELECT RAISE(ABORT, 'the operations journal is append-only: DELETE refused'); END""",
]

DROP = [
    "DROP TRIGGER IF EXISTS journal_append_only_update",
    "DROP TRIGGER IF EXISTS journal_append_only_delete",
]


def create_triggers(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        for statement in TRIGGERS:
            schema_editor.execute(statement, params=None)


def drop_triggers(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        for statement in DROP:
            schema_editor.execute(statement, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("backupportal", "0006_login_failures"),
    ]

    operations = [
        migrations.RunPython(create_triggers, drop_triggers),
    ]
