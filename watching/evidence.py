"""The figures of an auditor's evidence pack for a period: what the PDF summary says.

Everything is read from the catalog and the journal as they are; nothing is measured anew.
Days are days of TIME_ZONE; a period runs from the start of its first day to the end of its last.
"""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django.db.models import Count, Max, Q
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import BackupRun, BackupSchedule, Server
from restores.models import DrDrill, RestoreTest
from watching.models import Alert, MaintenanceTask, RpoSample

# The journal's actions that are approvals of a restore or of a destructive change, and their decisions.
APPROVALS = ["restore_approved", "restore_rejected", "change_approved", "change_rejected"]
# Written by the key rotation (`rotatekey`); counted whatever else that work journals.
KEY_ROTATED = "key_rotated"
KINDS = [BackupRun.Kind.LOGICAL, BackupRun.Kind.BASE, BackupRun.Kind.INCREMENTAL]
# The longest period one pack covers: a year, leap day included. The page makes a pack within
# its request, and a pack of every day since 1970 would hold a web worker (and its memory) for
# as long as the whole journal takes to read.
MAX_DAYS = 366


@dataclass(frozen=True)
class Period:
    first: date
    last: date  # included

    @property
    def start(self):
        return timezone.make_aware(datetime.combine(self.first, time.min))

    @property
    def end(self):
        """The first moment after the period."""
        return timezone.make_aware(datetime.combine(self.last + timedelta(days=1), time.min))

    def __str__(self):
        return f"{self.first:%Y-%m-%d} to {self.last:%Y-%m-%d}"

    def days(self, since=None, until=None):
        """Its days from `since` to `until` (dates), both within the period."""
        day, last = max(self.first, since or self.first), min(self.last, until or self.last)
        while day <= last:
            yield day
            day += timedelta(days=1)


def period_problem(first, last):
    """What is wrong with a period a person typed, in one sentence, or ''."""
    earliest, latest = date(1970, 1, 1), timezone.localdate() + timedelta(days=366)
    for day in (first, last):
        if not earliest <= day <= latest:
            return f"{day.isoformat()} is out of range: give days from {earliest} to {latest}."
    if first > last:
        return f"The first day {first} is after the last {last}: give the first day first."
    if (days := (last - first).days + 1) > MAX_DAYS:
        return f"The period is {days} days; a pack covers at most {MAX_DAYS} days: make several packs, one per year or less."
    return ""


def last_quarter(today=None):
    """The last complete calendar quarter before `today`: the page's and the command's default."""
    today = today or timezone.localdate()
    this_quarter = date(today.year, 3 * ((today.month - 1) // 3) + 1, 1)
    last = this_quarter - timedelta(days=1)
    return Period(date(last.year, 3 * ((last.month - 1) // 3) + 1, 1), last)


def in_period(field, period):
    return Q(**{f"{field}__gte": period.start, f"{field}__lt": period.end})


def figures(period):
    """Every figure of the summary, as plain values the PDF prints."""
    return {
        "period": period,
        "servers": [server_figures(server, period) for server in Server.objects.order_by("name")],
        "restore_tests": restore_tests(period),
        "drills": drills(period),
        "alerts": alerts(period),
        "maintenance": maintenance(period),
        "key_rotations": entries(period, [KEY_ROTATED]),
        "approvals": entries(period, APPROVALS),
    }


def server_figures(server, period):
    runs = BackupRun.objects.filter(in_period("finished_at", period), server=server)
    counts = runs.values("kind", "status").annotate(n=Count("pk"))
    taken = {kind: 0 for kind in KINDS}
    failed = {kind: 0 for kind in KINDS}
    for row in counts:
        if row["status"] == BackupRun.Status.SUCCEEDED:
            taken[row["kind"]] = row["n"]
        elif row["status"] == BackupRun.Status.FAILED:
            failed[row["kind"]] = row["n"]
    days, missed = missed_days(server, period, runs)
    return {
        "name": server.name,
        "taken": taken,
        "failed": failed,
        "days_watched": days,
        "missed_days": missed,
        "rpo": rpo(server, period),
        "rto": rto(server, period),
    }


def missed_days(server, period, runs):
    """(days a daily logical backup was owed, [days without a good one]): owed from the day the
    server was registered to yesterday, while its logical schedule is on."""
    scheduled = BackupSchedule.objects.filter(server=server, job=BackupSchedule.Job.LOGICAL, enabled=True).exists()
    if not scheduled:
        return 0, []
    good = runs.filter(kind=BackupRun.Kind.LOGICAL, status=BackupRun.Status.SUCCEEDED)
    backed_up = {timezone.localdate(at) for at in good.values_list("finished_at", flat=True)}
    owed = list(
        period.days(since=timezone.localdate(server.created_at), until=timezone.localdate() - timedelta(days=1))
    )
    return len(owed), [day for day in owed if day not in backed_up]


def rpo(server, period):
    """The worst achieved RPO the monitor saw each hour, against the objective."""
    samples = RpoSample.objects.filter(in_period("hour", period), server=server)
    objective = server.rpo_minutes * 60
    summary = samples.aggregate(
        hours=Count("pk"), worst=Max("worst_seconds"), over=Count("pk", filter=Q(worst_seconds__gt=objective))
    )
    return summary | {"objective_s": objective, "archiving": server.archiving}


def rto(server, period):
    """Restore tests that passed in the period: their longest and newest duration against the objective."""
    passed = RestoreTest.objects.filter(
        in_period("started_at", period), server=server, status=RestoreTest.Status.PASSED, duration_s__isnull=False
    ).order_by("-started_at")
    objective = server.rto_critical_minutes * 60
    durations = list(passed.values_list("duration_s", flat=True))
    return {
        "objective_s": objective,
        "tests": len(durations),
        "longest_s": max(durations) if durations else None,
        "newest_s": durations[0] if durations else None,
        "over": sum(1 for d in durations if d > objective),
    }


def restore_tests(period):
    tests = RestoreTest.objects.filter(in_period("started_at", period)).select_related("server").order_by("started_at")
    return [
        {
            "id": t.pk,
            "server": t.server.name,
            "kind": t.kind,
            "started_at": t.started_at,
            "status": t.status,
            "duration_s": t.duration_s,
            "error": t.error,
        }
        for t in tests
    ]


def drills(period):
    rows = DrDrill.objects.filter(in_period("started_at", period)).prefetch_related("steps").select_related("server")
    return [
        {
            "id": d.pk,
            "title": d.title,
            "server": d.server.name if d.server else "",
            "started_at": d.started_at,
            "status": d.status,
            "recovery": d.recovery_times(),
        }
        for d in rows.order_by("started_at")
    ]


def alerts(period):
    """Alerts opened in the period: how long each was open (until the end of the period if still open)."""
    rows = Alert.objects.filter(in_period("opened_at", period)).select_related("server", "location")
    return [
        {
            "id": a.pk,
            "condition": a.get_condition_display(),
            "subject": a.subject_label,
            "opened_at": a.opened_at,
            "resolved_at": a.resolved_at,
            "open_for": (a.resolved_at or min(timezone.now(), period.end)) - a.opened_at,
        }
        for a in rows.order_by("opened_at", "pk")
    ]


def maintenance(period):
    """Tasks due in the period: done in time, done late, or still open (overdue once past their day)."""
    tasks = MaintenanceTask.objects.filter(due_on__gte=period.first, due_on__lte=period.last).select_related(
        "completed_by"
    )
    return [
        {
            "id": t.pk,
            "task": t.get_kind_display(),
            "due_on": t.due_on,
            "completed_at": t.completed_at,
            "completed_by": t.completed_by.get_username() if t.completed_by else "",
            "outcome": _task_outcome(t),
        }
        for t in tasks.order_by("due_on", "pk")
    ]


def _task_outcome(task):
    if task.completed_at is not None:
        return "done late" if task.completed_late() else "done"
    return f"overdue ({task.days_overdue()} days)" if task.is_overdue() else "open, not yet due"


def entries(period, actions):
    rows = JournalEntry.objects.filter(in_period("at", period), action__in=actions).order_by("at", "id")
    return [
        {"id": e.pk, "at": e.at, "action": e.action, "actor": e.actor, "object": e.object_repr, "server": e.server}
        for e in rows
    ]
