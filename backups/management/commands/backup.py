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
        refused = []
        try:
            if kind == BackupRun.Kind.LOGICAL:
                done = logical_pass(
                    server,
                    trigger=BackupRun.Trigger.MANUAL,
                    actor=os_actor(),
                    only=database,
                    after_each=copy_run_foreground,
                )
                runs, refused = done.runs, done.refused
            else:
                runs = [execute(claim(server, kind, trigger=BackupRun.Trigger.MANUAL, actor=os_actor()))]
                copy_run_foreground(runs[0])
        except (RunRefused, ValueError) as e:
            fail(str(e))
        if not runs:
            fail("; ".join(refused) or f"{server} has no database that can be backed up now: see its server page")
        results = [run_summary(run) for run in runs]
        failed = [run for run in runs if run.status != BackupRun.Status.SUCCEEDED]
        problems = [run.error for run in failed]
        if len(runs) > 1:  # several databases: say which run each error is of
            problems = [f"run #{run.pk} ({run.database_name}): {run.error}" for run in failed]
        if problems or refused:
            self.stderr.write("backup failed: " + "; ".join(problems + refused))  # one line
        result = results[0] if len(results) == 1 and not refused else {"runs": results, "status": worst(runs, refused)}
        if problems or refused:
            result["exit_code"] = 1
            if refused:
                result["refused"] = refused
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


def worst(runs, refused=()):
    """One word for several runs: failed if any failed or a database was refused."""
    statuses = {run.status for run in runs}
    bad = refused or BackupRun.Status.FAILED in statuses
    return BackupRun.Status.FAILED if bad else BackupRun.Status.SUCCEEDED


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
    # An incremental says what it was: block-level on 17+ (with its parent), a WAL-chain proof before.
    chain = {name: run.details[name] for name in ("parent", "method") if name in run.details}
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
    } | chain
