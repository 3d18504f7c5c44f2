"""A server's schedules, kept in step with the server and with django-q2's Schedule rows.

One place does it: ensure_for(server), run after every save of a server (the signal
below), however the server was made or changed: the admin, addserver, the shell. So a server
added in the admin gets the strategy's schedules, a renamed one keeps its jobs (django-q2's
rows name the server, by name), and a deleted one takes its jobs with it.

django-q2 computes a schedule's next run with croniter when it fires; a cron it cannot run
would break the scheduler, so every cron is checked (backupportal.lib.cron) before it is saved.
"""

import logging

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver
from django_q.models import Schedule

from backupportal import journal
from backupportal.lib.cron import cron_problem, next_run
from backups.models import BackupSchedule, Server

SCHEDULED_JOB = "backups.tasks.scheduled_job"
# Restore tests read backups with the private key: with RESTORE_CLUSTER, only the restore
# worker's cluster fires them (django-q2 gives a schedule with a cluster to that cluster alone).
RESTORE_JOBS = {BackupSchedule.Job.RESTORE_TEST, BackupSchedule.Job.MONTHLY_RESTORE_TEST}

log = logging.getLogger(__name__)


def ensure_for(server):
    """The strategy's schedules created once (DBAs edit them afterwards), every one synced."""
    jobs = list(BackupSchedule.DEFAULT_JOBS)
    if server.archiving != Server.Archiving.NONE:
        jobs += BackupSchedule.ARCHIVING_JOBS
    for job in jobs:
        BackupSchedule.objects.get_or_create(
            server=server, job=job, defaults={"cron": BackupSchedule.DEFAULT_CRON[job]}
        )
    for schedule in server.schedules.all():
        schedule.server = server  # the instance being saved: its new name, no query
        sync_schedule(schedule)


def sync_schedule(schedule):
    """Keep django-q2's Schedule row in step with our BackupSchedule (idempotent by name)."""
    problem = cron_problem(schedule.cron)
    if problem:
        # Refused before anything is written: django-q2 keeps the schedule it had.
        raise ValidationError({"cron": problem})
    q = Schedule.objects.filter(name=schedule.q_name).first()
    if not schedule.enabled:
        if q is not None:
            q.delete()
        return None
    fields = {
        "func": SCHEDULED_JOB,
        # str(): a fresh row's job is a TextChoices member, whose repr django-q2's literal_eval refuses.
        "args": repr((schedule.server.name, str(schedule.job))),
        "schedule_type": Schedule.CRON,
        "cron": schedule.cron,
        "repeats": -1,
        "intended_date_kwarg": "scheduled_for",
        "cluster": cluster_for(schedule.job),
    }
    if q is None:
        return Schedule.objects.create(name=schedule.q_name, next_run=next_run(schedule.cron), **fields)
    if any(getattr(q, k) != v for k, v in fields.items()):
        for k, v in fields.items():
            setattr(q, k, v)
        q.next_run = next_run(schedule.cron)
        q.save()
    return q


def cluster_for(job):
    """The django-q2 cluster that fires this job: the restore worker's for restore tests, if any."""
    return (settings.RESTORE_CLUSTER or None) if job in RESTORE_JOBS else None


def change(schedule, actor):
    """A DBA's change of a (validated) schedule: saved, handed to django-q2 and journaled, or none of it."""
    with transaction.atomic():
        schedule.save()
        sync_schedule(schedule)
        journal.record(
            "schedule_changed",
            actor=actor,
            obj=schedule,
            server=schedule.server.name,
            cron=schedule.cron,
            enabled=schedule.enabled,
        )


def q_names(server_name):
    return [f"{job}:{server_name}" for job in BackupSchedule.Job.values]


def mend_all():
    """After every migrate: every schedule synced, and django-q2 rows of per-server jobs that no
    schedule owns (a server renamed or deleted before schedules followed it) removed."""
    owned = set()
    for schedule in BackupSchedule.objects.select_related("server"):
        owned.add(schedule.q_name)
        try:
            sync_schedule(schedule)
        except ValidationError as e:
            # Saved before crons were checked: left as it is, for a DBA to fix (the admin says so).
            log.warning("schedule %s left as it is: %s", schedule.q_name, e.messages[0])
    Schedule.objects.filter(func=SCHEDULED_JOB).exclude(name__in=owned).delete()


@receiver(pre_save, sender=Server, dispatch_uid="backups.schedules.remember_name")
def remember_name(sender, instance, raw=False, **kwargs):
    """The name before this save: a rename must move the server's jobs."""
    if instance.pk and not raw:
        instance._saved_name = Server.objects.filter(pk=instance.pk).values_list("name", flat=True).first()


@receiver(post_save, sender=Server, dispatch_uid="backups.schedules.follow_server")
def follow_server(sender, instance, created, raw=False, update_fields=None, **kwargs):
    # A save of other fields (critical tables, say) changes nothing the schedules hold.
    if raw or (update_fields is not None and not {"name", "archiving"} & set(update_fields)):
        return
    ensure_for(instance)
    old = getattr(instance, "_saved_name", None)
    if old and old != instance.name:
        Schedule.objects.filter(name__in=q_names(old)).delete()
        journal.record(
            "schedules_renamed",
            obj=instance,
            server=instance.name,
            renamed_from=old,
            jobs=sorted(instance.schedules.values_list("job", flat=True)),
        )
    instance._saved_name = instance.name


@receiver(pre_delete, sender=Server, dispatch_uid="backups.schedules.remove_with_server")
def remove_with_server(sender, instance, **kwargs):
    """The server's BackupSchedule rows go with it (cascade); django-q2's rows go too, in the
    same transaction (a delete refused for the server's backups removes nothing)."""
    rows = Schedule.objects.filter(name__in=q_names(instance.name))
    instance._removed_schedules = sorted(rows.values_list("name", flat=True))
    rows.delete()


@receiver(post_delete, sender=Server, dispatch_uid="backups.schedules.journal_removed")
def journal_removed(sender, instance, **kwargs):
    removed = getattr(instance, "_removed_schedules", [])
    journal.record("schedules_removed", obj=instance, server=instance.name, reason="server deleted", removed=removed)


@receiver(post_delete, sender=BackupSchedule, dispatch_uid="backups.schedules.remove_schedule")
def remove_schedule(sender, instance, **kwargs):
    """One schedule deleted (in the admin): its django-q2 row must not fire on."""
    server_name = Server.objects.filter(pk=instance.server_id).values_list("name", flat=True).first()
    if server_name:
        Schedule.objects.filter(name=f"{instance.job}:{server_name}").delete()
