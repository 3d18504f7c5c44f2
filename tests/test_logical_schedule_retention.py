"""Schedules, the lock per server and kind, progress, and retention of logical backups."""

import json
import os
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import BackupCopy, BackupRun, BackupSchedule, ChangeRequest
from backups.schedules import ensure_for
from backups.tasks import scheduled_job, sync_schedule
from restores.models import RestoreRun


def take_backup():
    call_command("backup", "maldives", stdout=StringIO())
    return BackupRun.objects.latest("created_at")


def floor_of_one(server):
    """Retention by days alone, as these tests were written for: the floor (test_gfs) keeps only the newest."""
    server.retention_floor = 1
    server.save(update_fields=["retention_floor"])


def age(run, days):
    BackupRun.objects.filter(pk=run.pk).update(finished_at=timezone.now() - timedelta(days=days))


def test_retention_deletes_exactly_the_expired_backups_from_every_location(server, passphrase_file, backup_root):
    floor_of_one(server)
    runs = [take_backup() for _ in range(4)]
    for run, days in zip(runs, [45, 31, 29, 1], strict=True):
        age(run, days)
    failed = BackupRun.objects.create(
        server=server, kind="logical", status="failed", finished_at=timezone.now() - timedelta(days=90)
    )

    out = StringIO()
    call_command("retention", "--dry-run", "--json", stdout=out)
    assert {d["id"] for d in json.loads(out.getvalue().splitlines()[-1])["deleted"]} == {runs[0].pk, runs[1].pk}
    assert all((backup_root / r.key).exists() for r in runs)  # a dry run deletes nothing

    call_command("retention", stdout=StringIO())
    for run, kept in zip(runs, [False, False, True, True], strict=True):
        run.refresh_from_db()
        assert (backup_root / run.key).exists() is kept
        assert (run.deleted_at is None) is kept
        statuses = set(run.copies.values_list("status", flat=True))
        assert statuses == ({BackupCopy.Status.OK} if kept else {BackupCopy.Status.DELETED})
    failed.refresh_from_db()
    assert failed.deleted_at is None  # failed runs have no artifact to delete
    # dump, globals and signed manifest of two runs
    assert JournalEntry.objects.filter(action="copy_deleted").count() == 6
    assert JournalEntry.objects.filter(action="backup_deleted").count() == 2


def test_retention_never_deletes_the_newest_good_backup(server, passphrase_file, backup_root):
    old = take_backup()
    age(old, 400)
    BackupRun.objects.create(server=server, kind="logical", status="failed", finished_at=timezone.now())
    call_command("retention", stdout=StringIO())
    old.refresh_from_db()
    assert old.deleted_at is None and (backup_root / old.key).exists()


def test_retention_keeps_a_backup_that_a_restore_is_reading(server, passphrase_file, backup_root):
    floor_of_one(server)
    reading = take_backup()
    take_backup()  # a newer one, so that the old one is not the newest good backup
    age(reading, 60)
    restore = RestoreRun.objects.create(kind="logical", server=server, backup_run=reading, status="running")
    call_command("retention", stdout=StringIO())
    reading.refresh_from_db()
    assert reading.deleted_at is None
    restore.status = "succeeded"
    restore.save()
    call_command("retention", stdout=StringIO())
    reading.refresh_from_db()
    assert reading.deleted_at is not None and not (backup_root / reading.key).exists()


def test_a_scheduled_backup_finding_its_lock_taken_is_queued_again_not_waited_for(server, passphrase_file, backup_root):
    import ast

    from django_q.models import Schedule

    from backups.runner import HOST

    held = BackupRun.objects.create(
        server=server,
        kind="logical",
        status="running",
        pid=os.getpid(),
        heartbeat_at=timezone.now(),
        details={"host": HOST},
    )
    Schedule.objects.filter(schedule_type=Schedule.ONCE).delete()
    assert "locked by another run: tried again in 60 s" in scheduled_job(
        "maldives", "logical", "2026-12-03T02:00:00+05:00"
    )
    retry = Schedule.objects.get(schedule_type=Schedule.ONCE)
    name, job, occurrence, since = ast.literal_eval(retry.args)
    assert (name, job, occurrence) == ("maldives", "logical", "2026-12-03T02:00:00+05:00")

    # Two hours later it is still locked: this occurrence is skipped, said so, not queued again.
    long_ago = (timezone.now() - timedelta(hours=2, minutes=1)).isoformat()
    result = scheduled_job("maldives", "logical", occurrence, long_ago)
    assert "is already running" in result and "this occurrence is skipped" in result
    assert Schedule.objects.filter(schedule_type=Schedule.ONCE).count() == 1

    # The lock is released: the retry takes the backup, for the occurrence it was queued for.
    BackupRun.objects.filter(pk=held.pk).update(status="succeeded", finished_at=timezone.now())
    assert scheduled_job(*ast.literal_eval(retry.args)) == "succeeded"
    assert BackupRun.objects.get(details__scheduled_for=occurrence).trigger == "scheduled"


def test_retention_days_are_per_server(server, passphrase_file, backup_root):
    floor_of_one(server)
    server.logical_retention_days = 7
    server.save()
    runs = [take_backup(), take_backup()]
    age(runs[0], 8)
    call_command("retention", stdout=StringIO())
    runs[0].refresh_from_db()
    assert runs[0].deleted_at is not None


def test_two_workers_handed_the_same_occurrence_run_it_once(server, passphrase_file, backup_root):
    when = "2026-11-26T02:00:00+05:00"
    assert scheduled_job("maldives", "logical", scheduled_for=when) == "succeeded"
    second = scheduled_job("maldives", "logical", scheduled_for=when)
    assert "already taken" in second
    assert BackupRun.objects.filter(server=server).count() == 1
    run = BackupRun.objects.get()
    assert run.trigger == "scheduled" and run.requested_by == "job:logical"


def test_the_schedule_is_editable_and_validated(server):
    ensure_for(server)
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    schedule.cron = "0 3 * * *"
    schedule.full_clean()
    sync_schedule(schedule)
    from django_q.models import Schedule

    q = Schedule.objects.get(name="logical:maldives")
    assert q.cron == "0 3 * * *" and q.func == "backups.tasks.scheduled_job"
    assert timezone.localtime(q.next_run).hour == 3  # in Indian/Maldives time
    schedule.cron = "61 2 * * *"
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="not a cron expression"):
        schedule.full_clean()


def test_migrate_mends_a_schedule_row_whose_arguments_django_q2_cannot_read(server):
    import ast

    from django.apps import apps
    from django_q.models import Schedule

    from backups.apps import sync_locations

    ensure_for(server)
    # As rows were written before the fix: the repr of a TextChoices member, which literal_eval refuses.
    Schedule.objects.filter(name="logical:maldives").update(args="('maldives', BackupSchedule.Job.LOGICAL)")
    sync_locations(sender=apps.get_app_config("backups"))  # what every migrate runs
    assert ast.literal_eval(Schedule.objects.get(name="logical:maldives").args) == ("maldives", "logical")


def test_a_dba_backs_up_from_the_admin_and_the_run_page_shows_progress(
    client, alice, server, passphrase_file, backup_root
):
    client.force_login(alice)
    response = client.post(
        reverse("admin:backups_server_changelist"),
        {"action": "back_up_now", "_selected_action": [server.pk]},
        follow=True,
    )
    assert response.status_code == 200
    run = BackupRun.objects.get()
    assert run.status == "succeeded" and run.requested_by == "alice"  # the test settings run tasks inline
    progress = client.get(reverse("run-progress", args=[run.pk])).json()
    assert progress["done"] and progress["bytes_done"] == run.size
    page = client.get(reverse("run", args=[run.pk])).content.decode()
    assert run.sha256 in page
    # Its times, no empty Error row, and the way to restore it, the form filled in.
    assert "<th>Started</th>" in page and "<th>Finished</th>" in page and "<th>Error</th>" not in page
    restore = (
        f"{reverse('restore-request-new')}?server={server.pk}&amp;backup_run={run.pk}&amp;destination=new_database"
    )
    assert f'href="{restore}"' in page
    form = client.get(restore.replace("&amp;", "&")).content.decode()
    assert f'<option value="{run.pk}" selected>{run}</option>' in form
    assert str(run).startswith(f"#{run.pk} maldives logical, ") and "B" in str(run).rsplit(", ", 1)[1]


def test_the_run_page_of_a_failed_backup_shows_its_error_and_offers_no_restore(client, alice, server):
    run = BackupRun.objects.create(server=server, kind="logical", status="failed", error="pg_dump: connection refused")
    client.force_login(alice)
    page = client.get(reverse("run", args=[run.pk])).content.decode()
    assert "pg_dump: connection refused" in page and "Restore this backup" not in page
    assert str(run) == f"#{run.pk} maldives logical, {timezone.localtime(run.created_at):%Y-%m-%d %H:%M} (failed)"


def test_an_auditor_sees_a_run_but_no_restore_button(client, charlie, server):
    run = BackupRun.objects.create(
        server=server, kind="logical", status="succeeded", size=10, finished_at=timezone.now()
    )
    client.force_login(charlie)
    assert "Restore this backup" not in client.get(reverse("run", args=[run.pk])).content.decode()


def test_an_auditor_cannot_back_up_from_the_admin(client, charlie, server, passphrase_file, backup_root):
    client.force_login(charlie)
    client.post(reverse("admin:backups_server_changelist"), {"action": "back_up_now", "_selected_action": [server.pk]})
    assert not BackupRun.objects.exists()


def test_back_up_now_twice_tells_the_second_click(client, alice, server):
    BackupRun.objects.create(server=server, kind="logical", status="running", heartbeat_at=timezone.now())
    client.force_login(alice)
    response = client.post(reverse("backup-now", args=[server.name]), {"kind": "logical"}, follow=True)
    assert b"already running" in response.content
    assert BackupRun.objects.count() == 1


def test_a_run_left_running_by_a_dead_worker_is_failed(server):
    from backups.runner import fail_orphans

    stale = BackupRun.objects.create(
        server=server,
        kind="logical",
        status="running",
        started_at=timezone.now() - timedelta(minutes=10),
        heartbeat_at=timezone.now() - timedelta(minutes=5),
    )
    fresh = BackupRun.objects.create(server=server, kind="base", status="running", heartbeat_at=timezone.now())
    assert fail_orphans() == [stale]
    stale.refresh_from_db(), fresh.refresh_from_db()
    assert stale.status == "failed" and "no heartbeat since" in stale.error
    assert fresh.status == "running"


def test_a_dba_edits_a_schedule_on_the_server_page_with_validation(client, alice, bob, server):
    from django_q.models import Schedule

    ensure_for(server)
    client.force_login(alice)
    response = client.post(
        reverse("schedule-edit", args=[server.name]),
        {"job": "logical", "cron": "0 25 * * *", "enabled": "on"},
        follow=True,
    )
    assert b"not a cron expression" in response.content
    assert BackupSchedule.objects.get(server=server, job="logical").cron == "0 2 * * *"
    client.post(reverse("schedule-edit", args=[server.name]), {"job": "logical", "cron": "15 1 * * *", "enabled": "on"})
    assert Schedule.objects.get(name="logical:maldives").cron == "15 1 * * *"
    # Disabling waits for another DBA or Sysadmin (tests/test_change_requests.py).
    client.post(
        reverse("schedule-edit", args=[server.name]), {"job": "logical", "cron": "15 1 * * *", "change_reason": "x"}
    )
    assert Schedule.objects.filter(name="logical:maldives").exists()
    ChangeRequest.objects.get().approve(bob)
    assert not Schedule.objects.filter(name="logical:maldives").exists()  # disabled: no django-q2 schedule
    assert JournalEntry.objects.filter(action="schedule_changed", actor="alice").count() == 1
    assert JournalEntry.objects.filter(action="schedule_changed", actor="alice (approved by bob)").count() == 1


def test_a_sysadmin_cannot_edit_schedules(client, sam, server):
    ensure_for(server)
    client.force_login(sam)
    response = client.post(
        reverse("schedule-edit", args=[server.name]), {"job": "logical", "cron": "0 3 * * *", "enabled": "on"}
    )
    assert response.status_code == 403
    assert b"Not allowed" in response.content
