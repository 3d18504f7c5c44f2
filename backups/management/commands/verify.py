"""Re-read copies on every tier and compare their sha256: manage.py verify [RUN_ID] [--json]."""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups.models import BackupRun, Verification
from backups.verify import execute


class Command(PortalCommand):
    help = "Re-read every copy (or one run's) in every storage location and compare its sha256."

    def add_arguments(self, parser):
        parser.add_argument("run_id", nargs="?", type=int, help="verify only this backup run's copies")

    def run(self, run_id=None, **options):
        actor = os_actor()
        run = None
        if run_id is not None:
            run = BackupRun.objects.filter(pk=run_id).first()
            if run is None:
                fail(f"unknown run #{run_id}: see the runs list for the ids")
            if run.deleted_at is not None:
                fail(f"run #{run_id} was deleted by retention on {run.deleted_at:%Y-%m-%d}: nothing is left to verify")
            if not run.copies.exclude(status="deleted").exists():  # a failed run's were removed with it
                fail(f"run #{run_id} is {run.status} and has no copies to verify")
        # Catalogued like the portal's and the weekly check's: its page shows it afterwards.
        result = execute(Verification.objects.create(run=run, requested_by=actor))
        if result["bad"] or result["unreachable"] or result["lock_problems"]:
            locks = f", {result['lock_problems']} lock(s) shorter than catalogued" if result["lock_problems"] else ""
            self.stderr.write(
                f"verify: {result['bad']} bad and {result['unreachable']} unreachable of {result['checked']} copies{locks}"
            )
            result["exit_code"] = 1
        return result

    def describe(self, result):
        what = f"run #{result['run']}" if result["run"] else "all copies"
        lines = [
            f"Verified {what}: {result['ok']} ok, {result['bad']} bad, {result['unreachable']} unreachable "
            f"of {result['checked']} in {result['duration_s']} s"
        ]
        for c in result["copies"]:
            lines.append(f"  {c['location']} {c['artifact']} {c['key']}: {c['status']} {c['error']}".rstrip())
            if c.get("lock"):
                lines.append(f"    {_lock_line(c['lock'])}")
        return lines


def _lock_line(lock):
    if lock["problem"]:
        return f"object lock: {lock['problem']}"
    if not lock["retain_until"]:
        return "object lock: none"
    return f"object lock: {lock['mode']} until {lock['retain_until']}"
