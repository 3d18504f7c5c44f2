"""Server passwords sealed at rest (SECRETS_KEY_FILE) and bound to the user, host and port they are for.

Existing clear-text passwords are sealed here, at migrate time, and the clear-text column is
dropped. A password whose DSN the new parser refuses cannot be bound to a host: it is dropped
too (such a server could not connect anyway); enter it again once the DSN is corrected.
"""

from django.db import migrations, models

from backupportal.lib.libpq import DsnError, parse
from backupportal.lib.sealed import create_key, seal, unseal


def seal_passwords(apps, schema_editor):
    Server = apps.get_model("backups", "Server")
    if Server.objects.exclude(password="").exists():
        create_key()  # the first sealing: as on a new portal's first migrate (backups/connection.py)
    for server in Server.objects.exclude(password=""):
        try:
            target = parse(server.dsn).target
        except DsnError:
            continue
        server.password_sealed, server.password_target = seal(server.password, target), target
        server.save(update_fields=["password_sealed", "password_target"])


def unseal_passwords(apps, schema_editor):
    Server = apps.get_model("backups", "Server")
    for server in Server.objects.exclude(password_sealed=""):
        server.password = unseal(server.password_sealed, server.password_target)
        server.save(update_fields=["password"])


class Migration(migrations.Migration):
    dependencies = [
        ("backups", "0004_catalog_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="server",
            name="password_sealed",
            field=models.TextField(blank=True, editable=False),
        ),
        migrations.AddField(
            model_name="server",
            name="password_target",
            field=models.CharField(
                blank=True,
                editable=False,
                help_text="USER@HOST:PORT the stored password was entered for",
                max_length=600,
            ),
        ),
        migrations.AlterField(
            model_name="server",
            name="dsn",
            field=models.CharField(
                help_text="postgresql://USER@HOST:PORT/DBNAME, optionally ?sslmode=require and other libpq "
                "parameters (sslrootcert, sslcert, sslkey, connect_timeout, target_session_attrs, application_name)",
                max_length=500,
                verbose_name="DSN",
            ),
        ),
        migrations.RunPython(seal_passwords, unseal_passwords),
        migrations.RemoveField(
            model_name="server",
            name="password",
        ),
    ]
