"""The maintenance calendar from the command line: put tasks on it, raise or resolve the
overdue alerts (what the monitor does every minute), and list what is due."""

from django.utils import timezone

from backupportal.lib.commands import PortalCommand
from watching import maintenance
from watching.models import MaintenanceTask


class Command(PortalCommand):
    help = "Check the maintenance calendar: raise 'maintenance overdue' for tasks past due, list the open tasks."

    def run(self, **options):
        today = timezone.localdate()
        checked = maintenance.check_overdue(today)
        tasks = MaintenanceTask.objects.filter(completed_at=None).order_by("due_on")
        return {
            "today": today.isoformat(),
            "overdue": checked["overdue"],
            "resolved": checked["resolved"],
            "tasks": [
                {"id": t.pk, "kind": t.kind, "due_on": t.due_on.isoformat(), "overdue": t.is_overdue(today)}
                for t in tasks
            ],
        }

    def describe(self, result):
        lines = []
        for t in result["tasks"]:
            label = MaintenanceTask.Kind(t["kind"]).label
            lines.append(f"#{t['id']:<5} due {t['due_on']}  {'OVERDUE ' if t['overdue'] else ''}{label}")
        lines.append(f"{len(result['overdue'])} overdue; {len(result['resolved'])} alert(s) resolved.")
        return lines
