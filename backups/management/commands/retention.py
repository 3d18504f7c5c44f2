"""Apply retention on every tier: manage.py retention [--dry-run] [--json]."""

from backupportal.lib.commands import PortalCommand
from backupportal.lib.osuser import os_actor
from backups import retention
from backups.models import Server


class Command(PortalCommand):
    help = (
        "Delete backups and WAL their server's retention no longer keeps from every location (never the newest "
        "good backups of the floor, a held backup, nor WAL a kept backup needs). --dry-run says, for each backup, "
        "the rule that keeps it or the day it goes."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")

    def run(self, dry_run=False, **options):
        result = retention.apply_wal_and_base_retention(dry_run=dry_run, actor=os_actor())
        if dry_run:
            result["plan"] = [row for server in Server.objects.all() for row in retention.describe(server)]
        return result

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
            if w.get("waits"):
                lines.append(f"  {name}: all its WAL kept this pass: {w['waits']}")
        if result.get("keys_dropped"):
            verb_keys = "Would remove" if result["dry_run"] else "Removed"
            lines.append(
                f"{verb_keys} retired key(s) no kept backup needs from the keyring: {', '.join(result['keys_dropped'])}"
            )
        for name, count in result.get("leftovers", {}).items():
            lines.append(
                f"Removed {count} leftover(s) of killed copies from {name} (partial files, unfinished uploads)"
            )
        if "plan" in result:
            lines.append("Each backup, newest first:")
            lines += [f"  {_plan_line(row)}" for row in result["plan"]]
        return lines


def _plan_line(row):
    what = f"#{row['id']} {row['server']} {row['kind']}" + (f" {row['database']}" if row["database"] else "")
    if row["kept_by"] is None:
        return f"{what} finished {row['finished_at']}: goes: {row['goes']}"
    until = f" (until {row['daily_until']})" if row["daily_until"] else ""
    return f"{what} finished {row['finished_at']}: kept: {row['kept_by']}{until}"
