"""Register a backup made elsewhere as a run of a server: manage.py importbackup FILE --server NAME [--database DB] [--json].

A stock `pg_dump -Fc` file, plain or encrypted by gpg with the portal's passphrase (or to its
recipients). Checked before anything is stored; a plain file is encrypted on its way in
(backups/imports.py). It then restores through a request and approval like any run.
"""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups import imports


class Command(PortalCommand):
    help = "Register a pg_dump -Fc file made elsewhere (plain or gpg-encrypted) as a logical backup run of a server."

    def add_arguments(self, parser):
        parser.add_argument("file", help="the pg_dump -Fc file, or that file encrypted by gpg with the portal's key")
        parser.add_argument("--server", required=True, help="the registered server the dump is of")
        parser.add_argument("--database", default=None, help="the database it is of (default: the one it names)")

    def run(self, file, server, database=None, **options):
        try:
            run = imports.import_file(file, server, database, actor=os_actor())
        except imports.ImportRefused as e:
            fail(str(e))
        copies = [
            {"location": c.location.name, "key": c.key, "sha256": c.sha256, "status": c.status}
            for c in run.copies.select_related("location").order_by("pk")
        ]
        return {
            "id": run.pk,
            "server": run.server.name,
            "database": run.database_name,
            "kind": run.kind,
            "status": run.status,
            "size": run.size,
            "sha256": run.sha256,
            "imported": run.details["imported"],
            "copies": copies,
        }

    def describe(self, result):
        lines = [
            f"Imported {result['imported']['file']} as run #{result['id']} of {result['server']}/{result['database']} "
            f"({result['size']} bytes, sha256 {result['sha256']})"
        ]
        lines += [f"  {c['location']} {c['key']}: {c['status']}" for c in result["copies"]]
        return lines
