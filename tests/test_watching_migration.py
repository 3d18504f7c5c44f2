"""Alerts, RPO and the maintenance calendar moved from backupportal/ to the watching app.

A catalog filled before the move is migrated forward: every row is found under the new
models, the journal's entries about them (signed with the old label) still verify and lead to
their objects, the permissions given to the roles stay theirs, and the monitor's django-q2
schedule, which named its function by the old dotted path, still runs.
"""

import datetime

import pytest
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule, Task
from django_q.scheduler import scheduler

from backupportal import journal
from backupportal.models import JournalEntry
from tests.conftest import make_user
from watching.models import Alert, MaintenanceTask, RpoSample, RpoStatus

BEFORE = [("backupportal", "0007_journal_sqlite_trigger"), ("watching", None)]
OLD_MONITOR = "backupportal.tasks.monitor_once"


def migrate(targets):
    """Migrate to `targets`; returns the models as they were there."""
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    applied = [t for t in targets if t[1] is not None]
    others = [n for n in executor.loader.graph.leaf_nodes() if n[0] not in {t[0] for t in targets}]
    return executor.loader.project_state(applied + others).apps


def leaf_nodes():
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


def fill_catalog_as_before(old):
    """Rows written by the models as they were: backupportal.Alert and the others."""
    server = old.get_model("backups", "Server").objects.create(name="atoll", dsn="postgresql://u@127.0.0.1:1/x")
    location = old.get_model("backups", "StorageLocation").objects.get(name="primary")
    alert = old.get_model("backupportal", "Alert").objects.create(
        condition="backup_failed", subject="server:atoll", server_id=server.pk, message="the nightly backup failed"
    )
    low = old.get_model("backupportal", "Alert").objects.create(
        condition="storage_low", subject="location:primary", location_id=location.pk, message="9% free"
    )
    now = timezone.now()
    old.get_model("backupportal", "RpoStatus").objects.create(server_id=server.pk, seconds=42.0, current_wal="0" * 24)
    old.get_model("backupportal", "RpoSample").objects.create(server_id=server.pk, hour=now, worst_seconds=42.0)
    task = old.get_model("backupportal", "MaintenanceTask").objects.create(
        kind="weekly_verify", due_on=datetime.date(2026, 1, 1)
    )
    # Journaled as the portal did then: the object's label was backupportal.Alert.
    entry = journal.record(
        "alert_opened", actor="job:monitor", obj=journal.Ref("backupportal.Alert", alert.pk, "Backup failed (atoll)")
    )
    Schedule.objects.filter(name="monitor").delete()
    Schedule.objects.create(
        name="monitor", func=OLD_MONITOR, schedule_type=Schedule.CRON, cron="* * * * *", repeats=-1, next_run=now
    )
    return {"alert": alert.pk, "low": low.pk, "server": server.pk, "task": task.pk, "entry": entry.pk}


@pytest.mark.django_db(transaction=True)
def test_a_catalog_from_before_the_move_keeps_every_row_and_every_link(client, settings):
    dba = Permission.objects.get(content_type__app_label="watching", codename="acknowledge_alert")
    assert Group.objects.get(name="DBA").permissions.filter(pk=dba.pk).exists()
    try:
        old = migrate(BEFORE)
        assert ContentType.objects.filter(app_label="backupportal", model="alert").exists()
        ids = fill_catalog_as_before(old)
    finally:
        migrate(leaf_nodes())

    # Every row, under the new models, on the same tables.
    alert = Alert.objects.get(pk=ids["alert"])
    assert (alert.condition, alert.server_id, alert.message) == (
        "backup_failed",
        ids["server"],
        "the nightly backup failed",
    )
    assert Alert.objects.get(pk=ids["low"]).location.name == "primary"
    assert RpoStatus.objects.get(server_id=ids["server"]).seconds == 42.0
    assert RpoSample.objects.get(server_id=ids["server"]).worst_seconds == 42.0
    assert MaintenanceTask.objects.get(pk=ids["task"]).kind == "weekly_verify"

    # The content type moved, so the DBAs' permission to acknowledge is the same row, still theirs.
    assert not ContentType.objects.filter(app_label="backupportal", model="alert").exists()
    dba.refresh_from_db()
    assert dba.content_type.app_label == "watching"
    assert Group.objects.get(name="DBA").permissions.filter(pk=dba.pk).exists()

    # The journal: intact, and the old label leads to the alert.
    ok, message, _ = journal.verify()
    assert ok, message
    entry = JournalEntry.objects.get(pk=ids["entry"])
    assert entry.object_type == "backupportal.Alert"
    assert journal.model_for(entry.object_type) is Alert
    client.force_login(make_user("charlie", "Auditor"))
    response = client.get(entry.get_object_url())
    assert response.status_code == 302 and response["Location"] == alert.get_absolute_url()
    history = client.get(alert.get_absolute_url()).context["history"]
    assert [e.pk for e in history] == [entry.pk]
    if connection.vendor == "sqlite":  # the journal's table was not rebuilt: its triggers hold
        with connection.cursor() as cur:
            cur.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'journal_append_only%'")
            assert len(cur.fetchall()) == 2

    # The monitor's schedule was made before: it names the new path and runs when due.
    schedule = Schedule.objects.get(name="monitor")
    assert schedule.func == "watching.tasks.monitor_once"
    Schedule.objects.exclude(pk=schedule.pk).update(next_run=timezone.now() + datetime.timedelta(days=1))
    Schedule.objects.filter(pk=schedule.pk).update(next_run=timezone.now() - datetime.timedelta(minutes=1))
    scheduler()  # the test settings run the task inline
    ran = Task.objects.get(func="watching.tasks.monitor_once")
    assert ran.success, ran.result


@pytest.mark.django_db
def test_old_labels_resolve_to_the_moved_models_and_new_ones_to_themselves():
    assert journal.model_for("backupportal.Alert") is Alert
    assert journal.model_for("backupportal.MaintenanceTask") is MaintenanceTask
    assert journal.model_for("watching.RpoStatus") is RpoStatus
    assert journal.model_for("backupportal.JournalEntry") is JournalEntry
    assert journal.labels_of(Alert) == ["watching.Alert", "backupportal.Alert"]
    with pytest.raises(LookupError):
        journal.model_for("backupportal.NoSuchModel")


@pytest.mark.django_db
def test_an_entry_written_under_the_old_label_leads_to_its_alert(client, charlie):
    from backups.models import Server

    server = Server.objects.create(name="atoll", dsn="postgresql://u@127.0.0.1:1/x")
    alert = Alert.objects.create(condition="backup_failed", subject="server:atoll", server=server, message="failed")
    old = journal.record("alert_opened", actor="job:monitor", obj=journal.Ref("backupportal.Alert", alert.pk, "old"))
    new = journal.record("alert_acknowledged", actor="alice", obj=alert, note="on it")
    assert new.object_type == "watching.Alert"
    client.force_login(charlie)
    for entry in (old, new):
        response = client.get(reverse("journal-object", args=[entry.pk]))
        assert response.status_code == 302 and response["Location"] == alert.get_absolute_url()
    history = client.get(alert.get_absolute_url()).context["history"]
    assert [e.pk for e in history] == [old.pk, new.pk]
