"""The scheduled restore tests: every week the newest logical backup; on the first Sunday of
each month the monthly full test, which also recovers the newest base backup into a throwaway
cluster. Each result in the journal; the alert stays open until every kind passes again."""

import ast
from datetime import datetime, timedelta
from io import StringIO
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule
from django_q.scheduler import scheduler

from backupportal.models import JournalEntry
from backups.models import BackupRun, Server
from backups.schedules import ensure_for
from restores.models import RestoreTest
from restores.restoretest import kinds_to_test
from tests.helpers import base_backup, enable_push, postgres_running_in
from watching.models import Alert

pytest_plugins = ["tests.walfixtures"]


def restore_tests_of_2027(server):
    """What the server's restore-test schedules restore over a whole year: {moment: kinds}."""
    tz = ZoneInfo("Indian/Maldives")
    tested = {}
    for q in Schedule.objects.filter(func="backups.tasks.scheduled_job", name__endswith=f":{server.name}"):
        _name, job = ast.literal_eval(q.args)  # django-q2 keeps args as repr(tuple)
        if not job.startswith("restoretest"):
            continue
        it = croniter(q.cron, datetime(2026, 12, 31, 23, 59, tzinfo=tz))
        while (moment := it.get_next(datetime)).year == 2027:
            tested.setdefault(moment, []).extend(kinds_to_test(server, monthly=job == "restoretest_monthly"))
    return tested


@pytest.mark.django_db
def test_base_backups_are_restore_tested_on_every_first_sunday_of_a_year_and_only_then():
    archiving = Server.objects.create(name="archiving", dsn="postgresql://postgres@127.0.0.1:9/app", archiving="push")
    ensure_for(archiving)
    tested = restore_tests_of_2027(archiving)

    base_days = sorted(moment for moment, kinds in tested.items() if "base" in kinds)
    assert [d.month for d in base_days] == list(range(1, 13))
    assert all(d.weekday() == 6 and d.day <= 7 and (d.hour, d.minute) == (3, 0) for d in base_days)
    logical_days = [moment for moment, kinds in tested.items() if "logical" in kinds]
    wednesdays = [d for d in logical_days if d.weekday() == 2]
    assert len(wednesdays) == 52 and set(logical_days) == set(wednesdays) | set(base_days)

    # A server without WAL archiving or base backups: logical tests only, all year.
    plain = Server.objects.create(name="plain", dsn="postgresql://postgres@127.0.0.1:9/app")
    ensure_for(plain)
    assert all(kinds == ["logical"] for kinds in restore_tests_of_2027(plain).values())
    # ...until it has a good base backup: then the monthly test restores it too.
    BackupRun.objects.create(server=plain, kind="base", status="succeeded")
    assert sum("base" in kinds for kinds in restore_tests_of_2027(plain).values()) == 12


def scheduled(job):
    from django_q.tasks import async_task, result

    return result(async_task("backups.tasks.scheduled_job", "maldives", job))  # inline in the test settings


def test_the_monthly_full_test_restores_the_base_and_the_logical_backup_and_the_journal_says_so(
    client, alice, charlie, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    enable_push(sample_cluster)
    call_command("backup", "maldives", stdout=StringIO())
    client.force_login(alice)
    assert "Run a base restore test" not in client.get(reverse("server", args=["maldives"])).content.decode()
    base = base_backup()

    # The first Sunday comes: django-q2's scheduler finds the monthly schedule due and runs it.
    ensure_for(server)
    Schedule.objects.filter(name="restoretest_monthly:maldives").update(next_run=timezone.now() - timedelta(minutes=1))
    scheduler()  # the test settings run the task inline
    assert RestoreTest.objects.count() == 2, Schedule.objects.get(name="restoretest_monthly:maldives").args
    logical_test, base_test = RestoreTest.objects.order_by("pk")
    assert (logical_test.status, base_test.status) == ("passed", "passed")
    assert (logical_test.kind, base_test.kind) == ("logical", "base") and base_test.backup_run == base
    assert logical_test.monthly and base_test.monthly
    assert base_test.restores.get().kind == "pitr" and base_test.duration_s > 0
    assert not postgres_running_in(sandbox_root) and not any(sandbox_root.iterdir())
    journaled = JournalEntry.objects.filter(action="restore_test_passed").order_by("pk")
    assert [(e.details["kind"], e.details["monthly"], e.actor) for e in journaled] == [
        ("logical", True, "job:restoretest"),
        ("base", True, "job:restoretest"),
    ]

    # The base backup's artifact is corrupted: the monthly test fails on it with an alert, and
    # neither its passing logical test nor next week's logical test resolves that alert.
    copy = base.copies.get(artifact="main")
    path = Path(copy.location.path) / copy.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert scheduled("restoretest_monthly") == ["passed", "failed"]
    alert = Alert.objects.get(condition="restore_test_failed", resolved_at=None)
    failed = RestoreTest.objects.get(status="failed")
    assert failed.kind == "base" and f"#{failed.pk}" in alert.message
    assert scheduled("restoretest") == ["passed"]
    assert RestoreTest.objects.filter(kind="base").count() == 2  # the weekly test is logical only
    call_command("monitor", "--once", stdout=StringIO())
    assert Alert.objects.get(pk=alert.pk).state == "open"

    # The server page links every test to its page; DBAs get a base test button, auditors none.
    page = client.get(reverse("server", args=["maldives"])).content.decode()
    for test in RestoreTest.objects.all():
        assert f'href="{test.get_absolute_url()}"' in page
    assert 'value="base">Run a base restore test</button>' in page
    client.force_login(charlie)
    assert "Run a base restore test" not in client.get(reverse("server", args=["maldives"])).content.decode()

    # A new good base backup, tested from that button: it passes and the alert is resolved.
    base_backup()
    client.force_login(alice)
    response = client.post(reverse("restore-test-now", args=["maldives"]), {"kind": "base"})
    newest = RestoreTest.objects.latest("pk")
    assert response["Location"] == newest.get_absolute_url() and newest.kind == "base" and newest.status == "passed"
    assert Alert.objects.get(pk=alert.pk).state == "resolved"
