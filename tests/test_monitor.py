"""The monitor: each alert condition, made true against real clusters and files, opens one alert
and sends one email through a real SMTP server; cleared, it resolves with one resolved email;
while it simply holds, nothing more is sent."""

import json
import signal
from datetime import datetime, timedelta
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import BackupRun, Server, StorageLocation
from backups.schedules import ensure_for
from restores.models import RestoreTest
from tests.helpers import mails, manage, ours
from watching.models import Alert, Reachability
from watching.monitor import last_due_occurrence, run_once

MALDIVES = ZoneInfo("Indian/Maldives")


def maldives(day, hour, minute):
    return datetime(2026, 3, day, hour, minute, tzinfo=MALDIVES)


def take_backup():
    try:
        call_command("backup", "maldives", stdout=StringIO(), stderr=StringIO())
    except SystemExit:  # the command exits 1 when the backup fails
        pass
    return BackupRun.objects.latest("created_at")


def failing_restore_test(server):
    return RestoreTest.objects.create(server=server, status="failed", error="boom", finished_at=timezone.now())


def passing_restore_test(server, later=1):
    """A restore test that passed, started `later` seconds after the ones before it."""
    return RestoreTest.objects.create(
        server=server,
        status="passed",
        started_at=timezone.now() + timedelta(seconds=later),
        finished_at=timezone.now(),
    )


def subjects(smtp):
    return [m["Subject"] for m in mails(smtp)]


def only_alert(condition):
    return Alert.objects.get(condition=condition)


def test_the_daily_backup_is_missing_at_four_maldives_time_and_not_a_minute_before(
    server, passphrase_file, backup_root, smtp_server
):
    ensure_for(server)  # the logical backup at 02:00
    Server.objects.filter(pk=server.pk).update(created_at=maldives(1, 12, 0))
    with time_machine.travel(maldives(9, 2, 5), tick=False):
        take_backup()  # yesterday's backup

    with time_machine.travel(maldives(10, 3, 59), tick=False):
        run_once()
    assert not ours().exists() and mails(smtp_server) == []

    with time_machine.travel(maldives(10, 4, 0), tick=False):
        run_once()
    alert = only_alert("backup_missing")
    assert alert.state == "open" and alert.server == server
    assert "since its scheduled time 2026-03-10 02:00" in alert.message
    assert subjects(smtp_server) == ["[backupportal] maldives: Daily backup missing"]
    body = mails(smtp_server)[0].get_content()
    assert "Since: 2026-03-10 04:00:00 (Indian/Maldives)" in body
    assert f"https://backups.reliabilitymaldives.com/alerts/{alert.pk}/" in body
    assert mails(smtp_server)[0]["To"] == "dba@reliabilitymaldives.com, sysadmin@reliabilitymaldives.com"

    with time_machine.travel(maldives(10, 4, 1), tick=False):
        run_once()
    assert len(mails(smtp_server)) == 1  # the condition holds: no second mail
    alert.refresh_from_db()
    assert alert.state == "open" and alert.last_seen_at == maldives(10, 4, 1)

    with time_machine.travel(maldives(10, 4, 30), tick=False):
        take_backup()
        run_once()
    alert.refresh_from_db()
    assert alert.state == "resolved" and alert.resolved_at == maldives(10, 4, 30)
    assert subjects(smtp_server)[1:] == ["[backupportal] RESOLVED maldives: Daily backup missing"]
    assert "the condition cleared by itself after 30" in mails(smtp_server)[1].get_content()

    with time_machine.travel(maldives(11, 3, 0), tick=False):
        run_once()
    assert len(mails(smtp_server)) == 2 and ours().count() == 1


def test_the_deadline_follows_the_servers_own_schedule():
    # Cron fields in TIME_ZONE (Indian/Maldives): a 23:30 backup is due at 01:30 the next day.
    assert last_due_occurrence("30 23 * * *", maldives(10, 1, 29), timedelta(hours=2)) == maldives(8, 23, 30)
    assert last_due_occurrence("30 23 * * *", maldives(10, 1, 30), timedelta(hours=2)) == maldives(9, 23, 30)
    assert last_due_occurrence("0 2 * * *", maldives(10, 3, 59), timedelta(hours=2)) == maldives(9, 2, 0)


def test_a_server_registered_after_the_scheduled_time_is_not_missing_a_backup(server, smtp_server):
    ensure_for(server)
    Server.objects.filter(pk=server.pk).update(created_at=maldives(10, 3, 0))
    with time_machine.travel(maldives(10, 4, 10), tick=False):
        run_once()
    assert not ours().exists()


def test_a_failed_backup_alerts_once_and_resolves_when_the_next_backup_succeeds(
    server, sample_cluster, passphrase_file, backup_root, smtp_server
):
    sample_cluster.stop()
    failed = take_backup()
    assert failed.status == "failed"
    run_once()
    run_once()
    alert = only_alert("backup_failed")
    assert f"backup #{failed.pk} of maldives failed" in alert.message and "connection refused" in alert.message
    assert subjects(smtp_server) == ["[backupportal] maldives: Backup job failure or timeout"]

    sample_cluster.start()
    assert take_backup().status == "succeeded"
    run_once()
    alert.refresh_from_db()
    assert alert.state == "resolved"
    assert subjects(smtp_server)[1:] == ["[backupportal] RESOLVED maldives: Backup job failure or timeout"]


def test_a_backup_left_running_by_a_dead_worker_is_a_timeout_the_monitor_finds(catalog_server, smtp_server):
    stale = BackupRun.objects.create(
        server=catalog_server, kind="logical", status="running", started_at=timezone.now() - timedelta(minutes=30)
    )
    stale.heartbeat_at = timezone.now() - timedelta(minutes=10)
    stale.save()
    run_once()
    stale.refresh_from_db()
    assert stale.status == "failed" and "no heartbeat since" in stale.error
    assert "no heartbeat since" in only_alert("backup_failed").message
    assert len(mails(smtp_server)) == 1


def test_a_failed_restore_test_alerts_and_a_passed_one_resolves(catalog_server, smtp_server):
    RestoreTest.objects.create(server=catalog_server, status="passed", duration_s=40, finished_at=timezone.now())
    run_once()
    assert not ours().exists()
    failed = RestoreTest.objects.create(
        server=catalog_server, status="failed", error="users: 0 rows, expected 200", finished_at=timezone.now()
    )
    RestoreTest.objects.create(
        server=catalog_server, status="running", started_at=timezone.now() + timedelta(seconds=1)
    )
    run_once()
    run_once()
    alert = only_alert("restore_test_failed")
    assert f"Restore test #{failed.pk}" in alert.message and "users: 0 rows" in alert.message
    assert subjects(smtp_server) == ["[backupportal] maldives: Restore test failure"]
    passing_restore_test(catalog_server, later=2)
    run_once()
    assert only_alert("restore_test_failed").state == "resolved"
    assert len(mails(smtp_server)) == 2


def test_storage_under_twenty_percent_free_alerts_for_the_location(server, passphrase_file, backup_root, smtp_server):
    run = take_backup()
    used = sum(run.copies.filter(status="ok").values_list("size", flat=True))
    primary = StorageLocation.objects.get(name="primary")
    primary.capacity_bytes = int(
        used / 0.855
    )  # 14.5% free (at 15% exactly, when the division has no remainder, it reads 15%)
    primary.save()
    run_once()
    run_once()
    alert = only_alert("storage_low")
    assert alert.location == primary and alert.subject == "location:primary"
    assert "has 14% free" in alert.message
    assert subjects(smtp_server) == ["[backupportal] location primary: Insufficient storage space"]

    primary.capacity_bytes = used * 10
    primary.save()
    run_once()
    assert only_alert("storage_low").state == "resolved"
    assert subjects(smtp_server)[1:] == ["[backupportal] RESOLVED location primary: Insufficient storage space"]


def test_a_location_without_a_capacity_is_judged_by_its_filesystem(backup_root, smtp_server):
    figure = StorageLocation.objects.get(name="primary").health()
    assert figure["total"] > 0 and 0 <= figure["ratio"] <= 1
    run_once()
    assert Alert.objects.filter(condition="storage_low").exists() == (figure["ratio"] < 0.2)


# --- Mail delivery -------------------------------------------------------------------------


def test_an_smtp_outage_delays_the_mail_and_never_loses_it(catalog_server, smtp_server, client, alice):
    smtp_server.stop()
    failing_restore_test(catalog_server)
    with pytest.raises(SystemExit) as exit:
        call_command("monitor", "--once", stdout=StringIO(), stderr=(err := StringIO()))
    assert exit.value.code == 1
    assert "cannot send alert mail: ConnectionRefusedError" in err.getvalue()
    alert = only_alert("restore_test_failed")
    assert alert.opened_mail_sent_at is None and alert.mail_attempts == 1
    assert "ConnectionRefusedError" in alert.mail_error
    run_once()
    alert.refresh_from_db()
    assert alert.mail_attempts == 2
    # The failure is in the journal once, not once a minute.
    assert JournalEntry.objects.filter(action="alert_mail_failed", object_id=str(alert.pk)).count() == 1
    client.force_login(alice)
    page = client.get(reverse("alert", args=[alert.pk])).content.decode()
    assert "ConnectionRefusedError" in page and "not sent yet" in page

    smtp_server.start()
    run_once()
    run_once()
    alert.refresh_from_db()
    assert subjects(smtp_server) == ["[backupportal] maldives: Restore test failure"]
    assert alert.opened_mail_sent_at is not None and alert.mail_error == "" and alert.mail_attempts == 3
    assert JournalEntry.objects.filter(action="alert_mail_sent", object_id=str(alert.pk)).count() == 1

    # Resolved during an outage: the resolved mail goes when the SMTP server is back.
    smtp_server.stop()
    passing_restore_test(catalog_server)
    run_once()
    alert.refresh_from_db()
    assert alert.state == "resolved" and alert.resolved_mail_sent_at is None and alert.mail_error
    smtp_server.start()
    run_once()
    run_once()
    assert subjects(smtp_server)[1:] == ["[backupportal] RESOLVED maldives: Restore test failure"]


def test_without_alert_emails_the_mail_waits_and_says_why(catalog_server, smtp_server, settings):
    settings.ALERT_EMAILS = []
    failing_restore_test(catalog_server)
    result = run_once()
    said = "ALERT_EMAILS is empty: no one to mail; set it in the portal's environment"
    assert result["mail"]["error"] == said
    alert = only_alert("restore_test_failed")
    assert alert.opened_mail_sent_at is None
    # On the alert's row and page, and journaled once (found by review: it read as a mail delayed).
    assert alert.mail_error == said
    journaled = JournalEntry.objects.filter(action="alert_mail_failed").count()
    assert journaled >= 1 and result["mail"]["failed"] == 0  # a setting, not a send that failed
    run_once()
    assert JournalEntry.objects.filter(action="alert_mail_failed").count() == journaled
    settings.ALERT_EMAILS = ["dba@reliabilitymaldives.com"]
    run_once()
    assert len(mails(smtp_server)) == 1


# --- Acknowledging ---------------------------------------------------------------------------


def test_a_dba_acknowledges_with_a_note_and_the_alert_still_resolves_by_itself(
    catalog_server, smtp_server, client, alice
):
    failing_restore_test(catalog_server)
    run_once()
    alert = only_alert("restore_test_failed")
    client.force_login(alice)
    response = client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "  "}, follow=True)
    assert b"Write a note" in response.content
    alert.refresh_from_db()
    assert alert.state == "open"

    client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "restoring into the sandbox to see why"})
    alert.refresh_from_db()
    assert alert.state == "acknowledged" and alert.acknowledged_by == alice
    assert alert.ack_note == "restoring into the sandbox to see why"
    entry = JournalEntry.objects.get(action="alert_acknowledged")
    assert entry.actor == "alice" and entry.details["note"] == "restoring into the sandbox to see why"

    run_once()  # still failing: still acknowledged, no new mail
    alert.refresh_from_db()
    assert alert.state == "acknowledged" and len(mails(smtp_server)) == 1
    page = client.get(reverse("alert", args=[alert.pk])).content.decode()
    assert "restoring into the sandbox" in page and "alert_acknowledged" in page

    passing_restore_test(catalog_server)
    run_once()
    alert.refresh_from_db()
    assert alert.state == "resolved" and len(mails(smtp_server)) == 2


def test_a_sysadmin_acknowledges_and_an_auditor_may_not(catalog_server, client, sam, charlie):
    failing_restore_test(catalog_server)
    run_once()
    alert = only_alert("restore_test_failed")
    client.force_login(charlie)
    assert client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "x"}).status_code == 403
    assert b"Acknowledge</button>" not in client.get(reverse("alert", args=[alert.pk])).content
    client.force_login(sam)
    assert b"Acknowledge</button>" in client.get(reverse("alert", args=[alert.pk])).content
    client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "disk ordered"})
    alert.refresh_from_db()
    assert alert.state == "acknowledged" and alert.acknowledged_by == sam
    response = client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "again"}, follow=True)
    assert b"nothing to acknowledge" in response.content


def test_an_alerts_history_reads_as_labels_and_values(catalog_server, client, alice, charlie):
    from watching.alerts import raise_alert

    alert, _ = raise_alert("backup_failed", server=catalog_server, message="pg_dump: connection refused")
    client.force_login(alice)
    client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "the server is being patched"})
    client.force_login(charlie)
    html = client.get(reverse("alert", args=[alert.pk])).content.decode()
    history = html[html.index("<h2>History</h2>") :]
    assert "{&#x27;" not in history and "{'" not in history  # no Python dict
    assert '<span class="pair"><b>condition</b> backup_failed</span>' in history
    assert '<span class="pair"><b>message</b> pg_dump: connection refused</span>' in history
    assert '<span class="pair"><b>note</b> the server is being patched</span>' in history
    assert '<span class="status status-info">Info</span>' in history  # opened: news, not a failure
    opened = JournalEntry.objects.get(action="alert_opened", object_id=str(alert.pk))
    assert f'<a href="{opened.get_absolute_url()}">alert_opened</a>' in history


def test_the_alerts_list_puts_open_alerts_first_and_filters(catalog_server, client, charlie):
    old = Alert.objects.create(
        condition="backup_failed", subject="server:maldives", server=catalog_server, message="old", state="resolved"
    )
    acked = Alert.objects.create(
        condition="restore_test_failed",
        subject="server:maldives",
        server=catalog_server,
        message="acked",
        state="acknowledged",
    )
    fresh = Alert.objects.create(
        condition="rpo_breached", subject="server:maldives", server=catalog_server, message="fresh"
    )
    client.force_login(charlie)
    page = client.get(reverse("alerts"), {"state": "all"})
    assert [a.pk for a in page.context["page"]] == [fresh.pk, acked.pk, old.pk]
    assert [a.pk for a in client.get(reverse("alerts")).context["page"]] == [fresh.pk, acked.pk]
    filtered = client.get(reverse("alerts"), {"state": "all", "condition": "backup_failed", "server": "maldives"})
    assert [a.pk for a in filtered.context["page"]] == [old.pk]
    assert [a.pk for a in client.get(reverse("alerts"), {"location": "primary"}).context["page"]] == []


# --- The command, the schedule, the registry --------------------------------------------------


def test_monitor_once_prints_a_summary_and_json(catalog_server, smtp_server):
    failing_restore_test(catalog_server)
    out = StringIO()
    call_command("monitor", "--once", stdout=out, stderr=StringIO())
    n = Alert.objects.count()  # the restore test's, and the calendar's overdue tasks
    assert f"opened {n}, resolved 0, active {n}; mail sent {n}, failed 0" in out.getvalue()
    out = StringIO()
    call_command("monitor", "--once", "--json", stdout=out, stderr=StringIO())
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["opened"] == 0 and result["active"] == n and result["mail"]["sent"] == 0
    assert {"daily backup", "restore tests", "RPO", "storage", "maintenance"} <= set(result["checks"])
    assert JournalEntry.objects.filter(action="monitor_run").count() == 2


def test_monitor_refuses_a_nonsense_interval():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--interval 0: give a number of seconds of 1 or more"):
        call_command("monitor", "--interval", "0", stdout=StringIO())


def test_monitor_loops_until_sigterm(transactional_db, settings):
    # transactional_db: on PostgreSQL the subprocess commits alerts and maintenance tasks into
    # the test database; the flush afterwards keeps them from leaking into later tests.
    proc = manage(settings, "monitor", "--interval", "1")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if sum(line.startswith("monitor: ") and "checks" in line for line in lines) >= 2:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.strip().endswith("monitor: stopped")


def test_the_monitor_runs_every_minute_on_django_q(db):
    from django_q.models import Schedule
    from django_q.tasks import async_task, result

    from watching.tasks import ensure_schedules

    ensure_schedules()
    schedule = Schedule.objects.get(name="monitor")
    assert schedule.func == "watching.tasks.monitor_once" and schedule.cron == "* * * * *"
    task_id = async_task(schedule.func)  # the test settings run tasks inline
    assert result(task_id)["errors"] == []


def test_a_check_that_breaks_does_not_silence_the_others(catalog_server, smtp_server, monkeypatch):
    from watching import monitor

    every = monitor.checks()
    monkeypatch.setattr(monitor, "checks", lambda: [monitor.Check("broken", broken_check, per_server=True), *every])
    failing_restore_test(catalog_server)
    result = run_once()
    assert result["errors"] == ["check broken for maldives failed: RuntimeError: a bug"]
    assert only_alert("restore_test_failed").opened_mail_sent_at is not None


def broken_check(server):
    raise RuntimeError("a bug")


def test_overdue_maintenance_is_alerted_by_the_monitor(db, smtp_server):
    from watching.models import MaintenanceTask

    run_once()  # puts the calendar in place; the strategy's own review date (2025-12-02) has passed
    task = MaintenanceTask.objects.get(kind="strategy_review", completed_at=None)
    alert = Alert.objects.get(condition="maintenance_overdue", subject=f"task:{task.pk}")
    assert alert.state == "open"
    assert [m["Subject"] for m in smtp_server.messages] == [
        f"[backupportal] maintenance task #{task.pk}: Maintenance task overdue"
    ]


def test_a_disabled_server_has_its_alerts_resolved(catalog_server, smtp_server):
    failing_restore_test(catalog_server)
    run_once()
    Server.objects.filter(pk=catalog_server.pk).update(enabled=False)
    run_once()
    assert only_alert("restore_test_failed").state == "resolved"
    assert len(mails(smtp_server)) == 2


def test_a_second_pass_while_one_runs_is_skipped_so_no_mail_goes_twice(catalog_server, smtp_server, settings):
    import fcntl
    import os

    import psycopg
    from django.db import connection

    from watching.monitor import _PG_LOCK_ID

    failing_restore_test(catalog_server)
    if connection.vendor == "postgresql":  # another session holds the advisory lock
        db = connection.settings_dict
        holder = psycopg.connect(
            host=db["HOST"], port=db["PORT"], user=db["USER"], password=db["PASSWORD"], dbname=db["NAME"]
        )
        holder.execute("SELECT pg_advisory_lock(%s)", [_PG_LOCK_ID])

        def release():  # at once: closing alone lets the server drop the lock a moment later
            holder.execute("SELECT pg_advisory_unlock(%s)", [_PG_LOCK_ID])
            holder.close()

    else:  # another process holds the lock file
        holder = open(os.path.join(settings.VAR_DIR, "monitor.lock"), "a")
        fcntl.flock(holder, fcntl.LOCK_EX)
        release = holder.close
    try:
        assert run_once()["skipped"] == "another monitor pass is running"
        assert not Alert.objects.exists()
    finally:
        release()
    run_once()
    assert len(mails(smtp_server)) == 1


def test_a_condition_recorded_on_its_row_is_alerted_at_once_with_the_monitors_message(catalog_server):
    from backupportal import conditions

    test = failing_restore_test(catalog_server)
    assert not Alert.objects.exists()  # the row alone alerts nobody until the monitor looks
    conditions.changed("restore_test_failed", server=catalog_server)  # what restoretest does after a run
    alert = only_alert("restore_test_failed")
    assert alert.state == "open" and alert.message.startswith(f"Restore test #{test.pk} of maldives (")
    run_once()  # the minute's pass writes the same words: one message per condition
    assert only_alert("restore_test_failed").message == alert.message
    passing_restore_test(catalog_server)
    conditions.changed("restore_test_failed", server=catalog_server)
    assert only_alert("restore_test_failed").state == "resolved"


def test_a_check_that_breaks_on_a_recorded_condition_never_fails_its_writer(catalog_server, monkeypatch):
    from backupportal import conditions
    from watching import monitor

    called = []

    def broken(server):
        called.append(server)
        raise RuntimeError("a bug")

    monkeypatch.setattr(monitor, "checks_on_record", lambda: {"backup_failed": broken})
    conditions.changed("backup_failed", server=catalog_server)  # the failed backup's own work goes on
    assert called == [catalog_server]
    catalog_server.enabled = False
    conditions.changed("backup_failed", server=catalog_server)
    assert called == [catalog_server]  # a disabled server is no longer watched


def test_a_server_that_stops_answering_is_an_alert_after_a_few_minutes_not_at_the_next_backup(
    pg_cluster, db, smtp_server, settings
):
    """Nothing said so before the next day's backup failed, hours later; one failed pass (a
    restart) is not an alert."""
    from tests.helpers import register

    settings.UNREACHABLE_AFTER_MINUTES = 5
    server = register(pg_cluster, dbname="postgres")
    run_once()
    assert not Alert.objects.filter(condition="server_unreachable").exists()
    pg_cluster.stop()
    try:
        start = timezone.now()
        with time_machine.travel(start, tick=False):
            run_once()
        assert Reachability.objects.get(server=server).unreachable_since == start
        with time_machine.travel(start + timedelta(minutes=4), tick=False):
            run_once()
        assert not Alert.objects.filter(condition="server_unreachable").exists()
        with time_machine.travel(start + timedelta(minutes=6), tick=False):
            run_once()
        alert = Alert.objects.get(condition="server_unreachable")
        assert alert.state == "open" and alert.server == server
        assert "maldives has not answered since" in alert.message and "connect" in alert.message
        assert [m["Subject"] for m in smtp_server.messages if "does not answer" in m["Subject"]] == [
            "[backupportal] maldives: Server does not answer"
        ]
    finally:
        pg_cluster.start()
    with time_machine.travel(start + timedelta(minutes=7), tick=False):
        run_once()
    assert Alert.objects.get(condition="server_unreachable").state == "resolved"
    assert Reachability.objects.get(server=server).unreachable_since is None

    # Passes minutes apart (a long --interval, slow passes in a partition) are still watching.
    pg_cluster.stop()
    try:
        apart = start + timedelta(hours=1)
        for step in range(3):
            with time_machine.travel(apart + step * timedelta(minutes=5, seconds=20), tick=False):
                run_once()
        assert Alert.objects.filter(condition="server_unreachable", state="open").exists()
    finally:
        pg_cluster.start()
    with time_machine.travel(apart + timedelta(minutes=17), tick=False):
        run_once()
    assert not Alert.objects.filter(condition="server_unreachable", state="open").exists()

    # Nobody looked for three days (the monitor stopped, or the server disabled): one failed pass
    # after that is a blip again, not "has not answered" for days.
    pg_cluster.stop()
    try:
        later = start + timedelta(days=3)
        with time_machine.travel(later, tick=False):
            run_once()
        assert Reachability.objects.get(server=server).unreachable_since == later
        assert not Alert.objects.filter(condition="server_unreachable", state="open").exists()
    finally:
        pg_cluster.start()
