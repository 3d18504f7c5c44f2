"""Signed manifests for the runs and WAL taken before manifests existed:
manage.py writemanifests [--dry-run] [--json]."""

from backupportal.lib.commands import PortalCommand
from backupportal.lib.osuser import os_actor
from backups.backfill import backfill


class Command(PortalCommand):
    help = (
        "Write the signed manifest of every good run and of the WAL ingested before manifests existed (a portal "
        "upgraded from an earlier version), so that rebuildcatalog finds them; running it again writes nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")

    def run(self, dry_run=False, **options):
        result = backfill(dry_run=dry_run, actor=os_actor())
        if result["failed"]:
            failed = "; ".join(f"{f['what']}: {f['error']}" for f in result["failed"])
            self.stderr.write(f"writemanifests: {len(result['failed'])} could not be written: {failed}")
            result["exit_code"] = 1
        return result

    def describe(self, result):
        verb = "would write" if result["dry_run"] else "wrote"
        lines = [
            f"{verb} the manifests of {len(result['runs'])} run(s) and of "
            f"{sum(w['segments'] for w in result['wal'])} WAL segment(s) taken before manifests existed"
        ]
        lines += [f"  run #{r['id']} {r['server']} {r['kind']} {r['manifest']}".rstrip() for r in result["runs"]]
        lines += [
            f"  WAL of {w['server']}: {w['segments']} segment(s) in {len(w['manifests'])} manifest(s)"
            for w in result["wal"]
        ]
        return lines
