"""django-q2 tasks of watching: thin wrappers, named by dotted path in schedules."""

from django_q.models import Schedule

from backupportal.lib.cron import next_run
from watching import monitor

MONITOR = "watching.tasks.monitor_once"
MONITOR_CRON = "* * * * *"


def monitor_once():
    """The "monitor" schedule, every minute: see watching.monitor."""
    result = monitor.run_once()
    return {k: v for k, v in result.items() if k != "checks"}


def ensure_schedules(sender=None, **kwargs):
    """After every migrate: the "monitor" schedule exists (created once; superusers may retune it)."""
    if not Schedule.objects.filter(name="monitor").exists():
        Schedule.objects.create(
            name="monitor",
            func=MONITOR,
            schedule_type=Schedule.CRON,
            cron=MONITOR_CRON,
            repeats=-1,
            next_run=next_run(MONITOR_CRON),
        )
