"""Take a backup now, in the foreground: manage.py backup NAME --kind logical|base|incremental."""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups.models import BackupRun, Server
from backups.runner import RunRefused, claim, execute


class Command(PortalCommand):
    help = "Take a backup of a registered server now, in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the server's name (addserver NAME)")
        parser.add_argument("--kind", choices=BackupRun.Kind.values, default=BackupRun.Kind.LOGICAL)

    def run(self, name, kind, **options):
        server = Server.objects.filter(name=name).first()
        if server is None:
            fail(f"unknown server {name!r}: list them in the admin, or register one with addserver")
        try:
            run = claim(server, kind, trigger=BackupRun.Trigger.MANUAL, actor=os_actor())
        except RunRefused as e:
            fail(str(e))
        run = execute(run)
        from backups.copies import copy_run_foreground

        copy_run_foreground(run)
        result = run_summary(run)
        if run.status != BackupRun.Status.SUCCEEDED:
            self.stderr.write(f"backup failed: {run.error}")
            result["exit_code"] = 1
        return result

    def describe(self, result):
        lines = [f"Run #{result['id']} {result['server']} {result['kind']}: {result['status']}"]
        if result["status"] == "succeeded":
            lines.append(f"  {result['size']} bytes in {result['duration_s']} s, sha256 {result['sha256']}")
        for c in result["copies"]:
            lines.append(f"  copy {c['location']}: {c['status']} {c['uri']}")
        return lines


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
        "kind": run.kind,
        "status": run.status,
        "size": run.size,
        "sha256": run.sha256,
        "duration_s": round(duration.total_seconds(), 3) if duration else None,
        "copies": copies,
        "error": run.error,
    }
