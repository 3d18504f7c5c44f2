"""Pull WAL from a server with pg_receivewal, supervised: long-running, beside qcluster.

Run it under systemd (or the demo's supervisor); SIGTERM or SIGINT stops it cleanly.
"""

import signal

from django.db import transaction

from backupportal import journal
from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups import schedules, walnames
from backups.management.commands._server import server_named
from backups.models import Server
from backups.receiver import Receiver


class Command(PortalCommand):
    help = "Stream a server's WAL with pg_receivewal into the archive until stopped (SIGTERM)."
    json_option = False

    def add_arguments(self, parser):
        parser.add_argument("name", help="the server's name (addserver NAME)")

    def run(self, name, **options):
        server = server_named(name)
        if server.archiving == Server.Archiving.PUSH:
            fail(f"{name} pushes its WAL with archive_command: switch its Archiving to pull in the admin first")
        if server.archiving == Server.Archiving.NONE:
            with transaction.atomic():
                server.archiving = Server.Archiving.PULL
                server.save(update_fields=["archiving"])
                schedules.ensure_for(server)
                journal.record("archiving_set_up", actor=os_actor(), obj=server, mode="pull")
        try:
            receiver = Receiver(server, log=self.stdout.write)
        except walnames.WalError as e:
            fail(str(e))
        self.stopping = False

        def stop(signum, frame):
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        receiver.run(lambda: self.stopping)
        return {"server": name, "restarts": receiver.restarts}

    def describe(self, result):
        return [f"receivewal {result['server']} stopped ({result['restarts']} restart(s) of pg_receivewal)."]
