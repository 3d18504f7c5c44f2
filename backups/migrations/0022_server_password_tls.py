from django.db import migrations, models

from backupportal.lib.libpq import DsnError, parse


def record_tls(apps, schema_editor):
    """A password stored before TLS was bound to it was entered for the DSN as it is now: that
    DSN's TLS is the one it keeps (a later, weaker one withholds it)."""
    Server = apps.get_model("backups", "Server")
    for server in Server.objects.exclude(password_sealed=""):
        try:
            server.password_tls = parse(server.dsn).tls
        except DsnError:
            continue  # no password is sent with an unreadable DSN anyway
        server.save(update_fields=["password_tls"])


class Migration(migrations.Migration):
    dependencies = [
        ("backups", "0021_change_request_back_up_fewer"),
    ]

    operations = [
        migrations.AddField(
            model_name="server",
            name="password_tls",
            field=models.CharField(
                blank=True,
                editable=False,
                help_text="the DSN's sslmode (and root certificate, where it verifies) the stored password was entered with",
                max_length=600,
            ),
        ),
        migrations.RunPython(record_tls, migrations.RunPython.noop),
    ]
