"""The strategy's maintenance calendar: recurring tasks, their evidence, the overdue alert.

Every kind has one open task at a time. Completing it (a DBA or a Sysadmin, with evidence)
schedules the next occurrence one interval after the due date, skipping occurrences already
past, so a late completion never leaves a task that is overdue the moment it exists.

    weekly_verify               every 7 days        evidence: a verify run's journal entry, or a restore test
    monthly_restore_test        every month         evidence: a restore test
    quarterly_retention_review  every 3 months      evidence: a journal entry (a retention run) or a link
    annual_dr_drill             every year          evidence: a DR drill whose go-live step ended
    strategy_review             first on the document's "Next Review" date (2025-12-02), then
                                every 3 months, as its September-to-December cycle has it
                                                    evidence: a link to the reviewed document, or a journal entry

The first occurrence of the others falls one interval after the calendar is set up.
`check_overdue()` is what the monitor calls every minute.
"""

import datetime

from dateutil.relativedelta import relativedelta
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.urls import Resolver404, resolve
from django.utils import timezone

from backupportal import journal
from watching.alerts import raise_alert, resolve_alert
from watching.models import EVIDENCE, EVIDENCE_NAMES, Alert, MaintenanceTask

Kind = MaintenanceTask.Kind

INTERVAL = {
    Kind.WEEKLY_VERIFY: relativedelta(weeks=1),
    Kind.MONTHLY_RESTORE_TEST: relativedelta(months=1),
    Kind.QUARTERLY_RETENTION_REVIEW: relativedelta(months=3),
    Kind.ANNUAL_DR_DRILL: relativedelta(years=1),
    Kind.STRATEGY_REVIEW: relativedelta(months=3),
}
# "Next Review: December 2, 2025" in the strategy document.
STRATEGY_NEXT_REVIEW = datetime.date(2025, 12, 2)

# The journal entries offered as evidence of a weekly verification: what the verify command writes.
VERIFY_ACTION_PREFIX = "verify"


def subject(task):
    return f"task:{task.pk}"


def first_due(kind, today):
    if kind == Kind.STRATEGY_REVIEW:
        return STRATEGY_NEXT_REVIEW
    return today + INTERVAL[kind]


def next_due(task, completed_on):
    """One interval after the due date, past the completion day."""
    due = task.due_on + INTERVAL[task.kind]
    while due <= completed_on:
        due += INTERVAL[task.kind]
    return due


def ensure_calendar(today=None):
    """Put every kind that has no open task on the calendar. Idempotent; returns the new tasks."""
    today = today or timezone.localdate()
    open_kinds = set(MaintenanceTask.objects.filter(completed_at=None).values_list("kind", flat=True))
    created = []
    for kind in Kind.values:
        if kind in open_kinds:
            continue
        try:
            with transaction.atomic():
                task = MaintenanceTask.objects.create(kind=kind, due_on=first_due(kind, today))
                journal.record("maintenance_scheduled", actor="job:maintenance", obj=task, due_on=task.due_on)
        except IntegrityError:  # another process put it on the calendar a moment ago
            continue
        created.append(task)
    return created


def check_overdue(today=None):
    """Raise the overdue alert for each open task past its due day; resolve the others.

    Called by the monitor every minute. Returns {"overdue": [task ids], "resolved": [task ids]}.
    """
    today = today or timezone.localdate()
    ensure_calendar(today)
    overdue = list(MaintenanceTask.objects.overdue(today))
    for task in overdue:
        raise_alert(
            Alert.Condition.MAINTENANCE_OVERDUE,
            subject=subject(task),
            message=f"Maintenance overdue: {task.get_kind_display()} was due on {task.due_on:%Y-%m-%d} "
            f"({task.days_overdue(today)} days ago). Complete it on the maintenance calendar, with its evidence.",
        )
    overdue_subjects = {subject(t) for t in overdue}
    resolved = []
    stale = Alert.objects.filter(condition=Alert.Condition.MAINTENANCE_OVERDUE).exclude(state=Alert.State.RESOLVED)
    for alert_subject in stale.values_list("subject", flat=True):
        if alert_subject not in overdue_subjects:
            resolve_alert(Alert.Condition.MAINTENANCE_OVERDUE, subject=alert_subject)
            resolved.append(int(alert_subject.split(":")[1]))
    return {"overdue": [t.pk for t in overdue], "resolved": resolved}


def check_evidence(kind, evidence):
    """Refuse evidence the kind does not take; `evidence` is (type, object or url)."""
    if evidence is None:
        allowed = " or ".join(EVIDENCE_NAMES[e] for e in sorted(EVIDENCE[kind]))
        raise ValidationError(f"Give the evidence that the task was done: {allowed}.")
    kind_of, value = evidence
    if kind_of not in EVIDENCE[kind]:
        allowed = " or ".join(EVIDENCE_NAMES[e] for e in sorted(EVIDENCE[kind]))
        raise ValidationError(
            f"{EVIDENCE_NAMES[kind_of].capitalize()} is not evidence for “{Kind(kind).label}”: give {allowed}."
        )
    if kind_of == "url":
        check_url(value)
    if kind_of == "drill" and value.full_restored_at is None:
        raise ValidationError(f"The drill “{value}” has not gone live yet: record its go-live step first.")
    if kind_of == "restore_test" and value.status == "running":
        raise ValidationError(f"Restore test #{value.pk} is still running: wait for its result.")
    if kind_of == "entry" and kind == Kind.WEEKLY_VERIFY and not value.action.startswith(VERIFY_ACTION_PREFIX):
        raise ValidationError(f"Journal entry #{value.pk} is a “{value.action}”, not a verify run.")


def check_url(url):
    """A portal page (/...) that exists, or an http(s) address."""
    if url.startswith("/") and not url.startswith("//"):
        try:
            resolve(url.split("#")[0].split("?")[0])
        except Resolver404:
            raise ValidationError(f"{url} is not a page of the portal: paste the address of the page.") from None
        return
    try:
        URLValidator(schemes=["https", "http"])(url)
    except ValidationError:
        raise ValidationError(f"{url!r} is not a link: give https://... or a portal page /...") from None


def complete(task, *, by, evidence, notes=""):
    """Complete an open task with its evidence; resolve its alert; schedule the next one."""
    check_evidence(task.kind, evidence)
    kind_of, value = evidence
    now = timezone.now()
    with transaction.atomic():
        done = MaintenanceTask.objects.select_for_update().get(pk=task.pk)
        if done.completed_at is not None:
            raise ValidationError(
                f"“{done}” was already completed by {done.completed_by} on {done.completed_at:%Y-%m-%d}."
            )
        done.completed_at, done.completed_by, done.notes = now, by, notes
        setattr(done, f"evidence_{kind_of}", value)
        done.save()
        following = MaintenanceTask.objects.create(kind=done.kind, due_on=next_due(done, timezone.localdate(now)))
        journal.record(
            "maintenance_completed",
            actor=by.get_username(),
            obj=done,
            evidence=str(value),
            evidence_link=done.evidence_link()[0],
            next_due_on=following.due_on,
        )
        journal.record("maintenance_scheduled", actor=by.get_username(), obj=following, due_on=following.due_on)
    resolve_alert(Alert.Condition.MAINTENANCE_OVERDUE, subject=subject(done))
    return done, following
