"""Retention: which backups have outlived their server's policy, and their deletion on every tier.

Never deleted, whatever its age: the newest good backup of each server and kind, and a
backup that a restore or restore test is reading right now (it goes on the next pass).
"""

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from backups.copies import delete_run_artifacts
from backups.models import BackupRun, Server

DAYS_FIELD = {BackupRun.Kind.LOGICAL: "logical_retention_days", BackupRun.Kind.BASE: "base_retention_days"}


def expired_runs(server, kind, now=None):
    """Good runs of this server and kind older than its retention, newest good excluded."""
    now = now or timezone.now()
    good = server.runs.good().filter(kind=kind)
    newest = good.order_by("-finished_at").values_list("pk", flat=True).first()
    cutoff = now - timedelta(days=getattr(server, DAYS_FIELD[kind]))
    return good.filter(finished_at__lt=cutoff).exclude(pk=newest).exclude(_being_read()).order_by("finished_at")


def _being_read():
    """Runs a restore or restore test is reading now (see restores.models)."""
    return Q(restores__status__in=["queued", "running"]) | Q(restore_tests__status="running")


def apply(now=None, dry_run=False, actor="job:retention"):
    """Delete what has expired. Returns [{"id", "server", "kind", "finished_at"}] of what was (or would be) deleted."""
    deleted = []
    for server in Server.objects.all():
        for kind in DAYS_FIELD:
            for run in expired_runs(server, kind, now):
                deleted.append(
                    {"id": run.pk, "server": server.name, "kind": kind, "finished_at": run.finished_at.isoformat()}
                )
                if not dry_run:
                    delete_run_artifacts(run, actor)
    return deleted
