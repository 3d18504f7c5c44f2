"""Register a PostgreSQL server to protect, after connecting to it."""

import os
from pathlib import Path

from django.core.exceptions import ValidationError
from django.db import transaction

from backupportal import journal
from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.redact import strip_password
from backups.models import Server


class Command(PortalCommand):
    help = "Register a server: addserver NAME --dsn postgresql://USER@HOST:PORT/DBNAME"

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--dsn", required=True, help="postgresql://USER@HOST:PORT/DBNAME (no password)")
        parser.add_argument(
            "--password-file", help="a file (0600) holding the password; PGPASSWORD in the environment also works"
        )
        parser.add_argument("--archiving", choices=Server.Archiving.values, default=Server.Archiving.NONE)

    def run(self, name, dsn, password_file=None, archiving="none", **options):
        dsn, inline_password = strip_password(dsn)
        if inline_password:
            # A password in argv is visible to every user of the host (ps, /proc).
            fail("the DSN holds a password, which would show in the process list: use --password-file or PGPASSWORD")
        server = Server(name=name, dsn=dsn, archiving=archiving, password=self._password(password_file))
        try:
            server.full_clean(exclude=["password"], validate_unique=False)
        except ValidationError as e:
            fail(
                "; ".join(
                    f"{field}: {' '.join(v)}" if field == "name" else " ".join(v) for field, v in e.message_dict.items()
                )
            )
        if Server.objects.filter(name=name).exists():
            fail(f"a server named {name} is already registered: choose another name, or change it in the admin")
        try:
            server.pg_version = server.probe()
        except ValidationError as e:
            fail(e.messages[0])
        with transaction.atomic():
            server.save()
            server.ensure_schedules()
            journal.record("server_added", actor=f"os:{_os_user()}", obj=server, dsn=dsn, version=server.pg_version)
        return {"id": server.pk, "name": server.name, "dsn": server.dsn, "version": server.version_display}

    def describe(self, result):
        return [f"Registered {result['name']} ({result['dsn']}), PostgreSQL {result['version']}."]

    def _password(self, password_file):
        if password_file:
            path = Path(password_file)
            if not path.is_file():
                fail(f"password file {path} does not exist: create it with mode 0600")
            if path.stat().st_mode & 0o077:
                fail(f"password file {path} can be read by others: chmod 600 {path}")
            return path.read_text().strip()
        return os.environ.get("PGPASSWORD", "")


def _os_user():
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
