"""Where restore tests restore waits for a DBA: the sandbox is read through Server.sandbox, held to
the HOST:PORT approved (sandbox_destination); two change request kinds ask for it.

Sandboxes chosen before are kept as they are: each server's present destination (its sandbox's,
or its own) is recorded as approved, so restore tests go on where they went."""

import django.db.models.deletion
from django.db import migrations, models
from psycopg.conninfo import conninfo_to_dict


def _destination(dsn):
    """HOST:PORT as backups.models.servers.destination_of reads it; frozen here, never live code."""
    try:
        parts = conninfo_to_dict(dsn)
        return f"{parts.get('host') or ''}:{int(parts.get('port') or 5432)}"
    except Exception:  # noqa: BLE001  psycopg's parser, or several ports (h1:5432,h2:5432): nothing connects with it
        return ""


def approve_present_destinations(apps, schema_editor):
    Server = apps.get_model("backups", "Server")
    for server in Server.objects.select_related("sandbox_server"):
        server.sandbox_destination = _destination((server.sandbox_server or server).dsn)
        server.save(update_fields=["sandbox_destination"])


class Migration(migrations.Migration):
    dependencies = [
        ("backups", "0019_encryption_keys"),
    ]

    operations = [
        migrations.RenameField(model_name="server", old_name="sandbox", new_name="sandbox_server"),
        migrations.AlterField(
            model_name="server",
            name="sandbox_server",
            field=models.ForeignKey(
                blank=True,
                help_text="Where restore tests restore; empty: this server, as the strategy does. "
                "A change waits for a DBA's approval.",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="backups.server",
                verbose_name="sandbox",
            ),
        ),
        migrations.AddField(
            model_name="server",
            name="sandbox_destination",
            field=models.CharField(
                blank=True,
                editable=False,
                help_text="HOST:PORT restore tests restore into, as approved (the sandbox's, or this server's own)",
                max_length=300,
            ),
        ),
        migrations.AlterField(
            model_name="changerequest",
            name="kind",
            field=models.CharField(
                choices=[
                    ("release_hold", "Release a legal hold"),
                    ("shorten_retention", "Shorten retention"),
                    ("schedule_less_often", "Disable a schedule, or make it fire less often or with longer gaps"),
                    ("disable_server", "Disable a server (every schedule of it)"),
                    ("delete_backup", "Delete a backup by hand"),
                    ("remove_location", "Remove a storage location"),
                    ("retire_location", "Retire (disable) a storage location"),
                    ("shorten_lock", "Shorten a location's S3 Object Lock"),
                    ("set_sandbox", "Choose where a server's restore tests restore (its sandbox)"),
                    ("move_sandbox", "Move a server restore tests restore into to another host or port"),
                ],
                max_length=32,
            ),
        ),
        migrations.RunPython(approve_present_destinations, migrations.RunPython.noop),
    ]
