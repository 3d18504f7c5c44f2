"""Ingest the WAL spool now: catalogue, encrypt and copy what the archive program left there.

The worker does this every minute (schedule `ingestwal:NAME`); this is the same in the foreground.
"""

from backupportal.lib.commands import PortalCommand, fail
from backups import walingest, walnames
from backups.models import Server


class Command(PortalCommand):
    help = "Ingest the WAL spool of one server, or of every archiving server."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", help="server names (default: every server that archives WAL)")

    def run(self, names, **options):
        servers = Server.objects.exclude(archiving=Server.Archiving.NONE).filter(enabled=True)
        if names:
            servers = Server.objects.filter(name__in=names)
            unknown = set(names) - {s.name for s in servers}
            if unknown:
                fail(f"unknown server {sorted(unknown)[0]!r}: register it with addserver first")
            if idle := [s.name for s in servers if s.archiving == Server.Archiving.NONE]:
                fail(
                    f"{idle[0]} does not archive WAL: there is no spool to ingest; set up push archiving "
                    f"(manage.py archivecommand {idle[0]}) or pull (manage.py receivewal {idle[0]})"
                )
        results = {}
        for server in servers:
            try:
                results[server.name] = walingest.ingest(server, actor="os:ingestwal").as_dict()
            except walnames.WalError as e:
                fail(f"{server.name}: {e}")
        return {"servers": results}

    def describe(self, result):
        lines = []
        for name, r in result["servers"].items():
            line = f"{name}: {r['ingested']} ingested"
            if r["ingested"]:
                line += f" ({r['first']} .. {r['last']})"
            if r["duplicates"]:
                line += f", {r['duplicates']} identical duplicate(s) dropped"
            if r["conflicts"]:
                line += f", CONFLICT: {', '.join(r['conflicts'])} (see the archive_failing alert)"
            if r["busy"]:
                line += " (another ingest holds the spool)"
            lines.append(line)
        return lines or ["No server archives WAL."]
