"""Apply retention on every tier: manage.py retention [--dry-run] [--json]."""

from backupportal.lib.commands import PortalCommand
from backupportal.lib.osuser import os_actor
from backups import retention


class Command(PortalCommand):
    help = "Delete backups and WAL older than their server's retention from every location (never the newest good backup, nor WAL a kept backup needs)."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")

    def run(self, dry_run=False, **options):
        return retention.apply_wal_and_base_retention(dry_run=dry_run, actor=os_actor())

    def describe(self, result):
        verb = "Would delete" if result["dry_run"] else "Deleted"
        lines = [f"{verb} {len(result['deleted'])} backup(s)."]
        lines += [f"  #{d['id']} {d['server']} {d['kind']} finished {d['finished_at']}" for d in result["deleted"]]
        for name, w in result["wal"].items():
            if w["deleted"]:
                lines.append(
                    f"{verb} {w['deleted']} WAL file(s) of {name}: {w['first_deleted']} .. {w['last_deleted']}"
                )
            if w["kept_from"]:
                lines.append(f"  {name}: WAL kept from {w['kept_from']} (the window's base backup)")
        return lines
