"""The sandbox clusters of restore requests: manage.py sandboxes [--expire] [--json]."""

from django.conf import settings
from django.utils import timezone

from backupportal.lib.commands import PortalCommand
from backupportal.lib.osuser import os_actor
from restores import sandbox


class Command(PortalCommand):
    help = (
        "List the sandbox clusters that approved PITR requests left on this host; with --expire, stop "
        "and remove those older than SANDBOX_MAX_AGE first."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--expire", action="store_true", help="stop and remove the sandboxes older than SANDBOX_MAX_AGE"
        )

    def run(self, expire=False, **options):
        removed = sandbox.expire(actor=os_actor()) if expire else []
        return {
            "max_age_h": settings.SANDBOX_MAX_AGE / 3600,
            "removed": [describe(run, "removed") for run in removed],
            "sandboxes": [describe(run, state) for run, state in sandbox.existing()],
        }

    def describe(self, result):
        lines = [f"removed {s['datadir']} (restore #{s['restore']}, {s['age_h']} h old)" for s in result["removed"]]
        lines += [
            f"{s['state']}: {s['datadir']} port {s['port']} (request #{s['request']}, {s['age_h']} h old)"
            for s in result["sandboxes"]
        ]
        return lines or ["no sandbox clusters"]


def describe(run, state):
    return {
        "restore": run.pk,
        "request": run.request_id,
        "server": run.server.name,
        "datadir": run.into_datadir,
        "port": run.port,
        "age_h": round((timezone.now() - run.finished_at).total_seconds() / 3600, 1),
        "state": state,
    }
