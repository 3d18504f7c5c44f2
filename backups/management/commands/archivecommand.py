"""Set a server up for push archiving: install the archive program and its spool, print the lines."""

from django.db import transaction

from backupportal import journal
from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups import schedules, walnames, walspool
from backups.management.commands._server import server_named
from backups.models import Server


class Command(PortalCommand):
    help = (
        "Install the archive program and the spool for a server, and print the archive_command "
        "(and the other postgresql.conf lines) to set on it."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="the server's name (addserver NAME)")
        parser.add_argument("--db-user", default="postgres", help="the OS user PostgreSQL runs as (default postgres)")

    def run(self, name, db_user, **options):
        server = server_named(name)
        if server.archiving == Server.Archiving.PULL:
            fail(
                f"{name} pulls its WAL with receivewal: switch its Archiving to push in the admin first "
                "(and stop receivewal), or keep pull"
            )
        try:
            spool = walspool.prepare_push_spool(server, db_user)
        except walnames.WalError as e:
            fail(str(e))
        with transaction.atomic():
            if server.archiving != Server.Archiving.PUSH:
                server.archiving = Server.Archiving.PUSH
                server.save(update_fields=["archiving"])
            schedules.ensure_for(server)
            journal.record("archiving_set_up", actor=os_actor(), obj=server, mode="push", spool=spool)
        lines = walspool.archive_settings(server)
        return {
            "server": server.name,
            "spool": str(spool),
            "program": str(walspool.program_path()),
            "archive_command": walspool.archive_command(server),
            "settings": {setting: value for setting, value, _ in lines},
            "needs": {setting: needs for setting, _, needs in lines},
        }

    def describe(self, result):
        lines = [
            f"# postgresql.conf of {result['server']}: WAL goes to {result['spool']} for the portal to ingest.",
            "# wal_level, archive_mode and max_wal_senders need a restart; the others a reload.",
        ]
        lines += [f"{setting} = {value}" for setting, value in result["settings"].items()]
        return lines
