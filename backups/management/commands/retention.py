"""Apply retention on every tier: manage.py retention [--dry-run] [--json]."""

import getpass

from backupportal.lib.commands import PortalCommand
from backups import retention


class Command(PortalCommand):
    help = "Delete backups older than their server's retention from every location (never the newest good one)."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")

    def run(self, dry_run=False, **options):
        deleted = retention.apply(dry_run=dry_run, actor=f"os:{getpass.getuser()}")
        return {"dry_run": dry_run, "deleted": deleted}

    def describe(self, result):
        verb = "Would delete" if result["dry_run"] else "Deleted"
        lines = [f"{verb} {len(result['deleted'])} backup(s)."]
        lines += [f"  #{d['id']} {d['server']} {d['kind']} finished {d['finished_at']}" for d in result["deleted"]]
        return lines
