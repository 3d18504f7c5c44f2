"""Take a backup now, in the foreground: manage.py backup NAME --kind logical|base|incremental [--database DB]."""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups.copies import copy_run_foreground
from backups.databases import logical_pass
from backups.models import BackupRun, Server
from backups.runner import RunRefused, claim, execute


class Command(PortalCommand):
    help = "Take a backup of a registered server now, in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the server's name (addserver NAME)")
        parser.add_argument("--kind", choices=BackupRun.Kind.values, default=BackupRun.Kind.LOGICAL)
        parser.add_argument(
            "--database",
            help="logical: this database only (default: every database the server backs up, a run each)",
        )

    def run(self, name, kind, database=None, **options):
        server = Server.objects.filter(name=name).first()
        if server is None:
            fail(f"unknown server {name!r}: list them in the admin, or register one with addserver")
        if database is not None and kind != BackupRun.Kind.LOGICAL:
            fail(f"--database is for logical backups: a {kind} backup is of the whole cluster")
        try:
            if kind == BackupRun.Kind.LOGICAL:
                runs, _ = logical_pass(server, trigger=BackupRun.Trigger.MANUAL, actor=os_actor(), only=database)
            else:
                runs = [execute(claim(server, kind, trigger=BackupRun.Trigger.MANUAL, actor=os_actor()))]
        except (RunRefused, ValueError) as e:
            fail(str(e))
        for run in runs:
            copy_run_foreground(run)
        results = [run_summary(run) for run in runs]
        for run in runs:
            if run.status != BackupRun.Status.SUCCEEDED:
                self.stderr.write(f"backup failed: {run.error}")
        result = results[0] if len(results) == 1 else {"runs": results, "status": worst(runs)}
        if any(run.status != BackupRun.Status.SUCCEEDED for run in runs):
            result["exit_code"] = 1
        return result

    def describe(self, result):
        lines = []
        for one in result.get("runs", [result]):
            database = f" {one['database']}" if one.get("database") else ""
            lines.append(f"Run #{one['id']} {one['server']}{database} {one['kind']}: {one['status']}")
            if one["status"] == "succeeded":
                lines.append(f"  {one['size']} bytes in {one['duration_s']} s, sha256 {one['sha256']}")
            for c in one["copies"]:
                lines.append(f"  copy {c['location']}: {c['status']} {c['uri']}")
        return lines


def worst(runs):
    """One word for several runs: failed if any failed."""
    statuses = {run.status for run in runs}
    return BackupRun.Status.FAILED if BackupRun.Status.FAILED in statuses else BackupRun.Status.SUCCEEDED


def run_summary(run):
    from backups.storage import store_for

    copies = []
    for c in run.copies.filter(artifact="main").select_related("location").order_by("location__name"):
        copies.append(
            {
                "location": c.location.name,
                "uri": store_for(c.location).uri(c.key),
                "sha256": c.sha256,
                "status": c.status,
            }
        )
    duration = run.duration
    return {
        "id": run.pk,
        "server": run.server.name,
        "database": run.database.name if run.database_id else None,
        "kind": run.kind,
        "status": run.status,
        "size": run.size,
        "sha256": run.sha256,
        "duration_s": round(duration.total_seconds(), 3) if duration else None,
        "copies": copies,
        "error": run.error,
    }
