"""Sandbox clusters on the portal's host, against real clusters: PITR through a four-eyes
request, and restore tests of base backups in a throwaway cluster that never outlives the test."""

import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import BackupRun, Database, WalSegment
from restores.models import RestoreRequest, RestoreRun, RestoreTest, ValidationCheck
from restores.tasks import run_request
from tests.helpers import (
    ask_sandbox,
    base_backup,
    enable_push,
    postgres_running_in,
    rows,
    run_command,
    switch_wal,
    wait_archived,
)
from watching.models import Alert

pytest_plugins = ["tests.walfixtures"]

DB = "reliabilitymaldives"


def with_offset(moment):
    """'YYYY-MM-DD HH:MM:SS+05:00', as a DBA types it."""
    text = timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S%z")
    return text[:-2] + ":" + text[-2:]


def test_a_pitr_request_approved_by_another_dba_recovers_a_sandbox_to_the_target(
    client, alice, bob, charlie, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    enable_push(sample_cluster)
    base_backup()
    sample_cluster.execute("CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('before')", dbname=DB)
    time.sleep(1.05)
    target = timezone.localtime().replace(microsecond=0)
    time.sleep(0.05)
    sample_cluster.execute("INSERT INTO probe VALUES ('after')", dbname=DB)
    wait_archived(sample_cluster, switch_wal(sample_cluster))

    response = ask_sandbox(client, alice, server, with_offset(target))
    assert response.status_code == 302, response.content.decode()[-2000:]
    request = RestoreRequest.objects.get()
    assert request.status == "pending" and request.target_time == target and request.backup_run is None

    # Alice cannot approve her own request; the auditor can read it and do nothing.
    assert client.post(reverse("restore-request-approve", args=[request.pk])).status_code == 403
    client.force_login(charlie)
    page = client.get(reverse("restore-request", args=[request.pk]))
    assert page.status_code == 200 and b'id="approve"' not in page.content
    assert client.post(reverse("restore-request-approve", args=[request.pk])).status_code == 403
    request.refresh_from_db()
    assert request.status == "pending" and not RestoreRun.objects.exists()

    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]), {"note": "go"})  # the worker runs it inline
    request.refresh_from_db()
    restore = RestoreRun.objects.get(request=request)
    assert restore.kind == "pitr" and restore.status == "succeeded", restore.error
    assert request.status == "succeeded"
    assert Path(restore.into_datadir).parent == sandbox_root
    assert rows(restore.port, "SELECT tx FROM probe ORDER BY tx") == [("before",)]
    assert "archive_mode = 'off'" in (Path(restore.into_datadir) / "postgresql.auto.conf").read_text()

    page = client.get(reverse("restore-request", args=[request.pk])).content.decode()
    assert f"port {restore.port}" in page and "Succeeded" in page
    progress = client.get(reverse("restore-progress", args=[restore.pk])).json()
    assert progress["status"] == "succeeded" and progress["done"]
    journal = set(JournalEntry.objects.values_list("action", "actor"))
    assert {("restore_requested", "alice"), ("restore_approved", "bob")} <= journal
    assert {("pitr_started", "alice (approved by bob)"), ("pitr_succeeded", "alice (approved by bob)")} <= journal


def test_a_sandbox_from_a_chosen_base_backup_and_a_rejected_request_that_never_runs(
    client, alice, bob, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    enable_push(sample_cluster)
    base = base_backup()
    sample_cluster.execute("CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('after the backup')", dbname=DB)
    wait_archived(sample_cluster, switch_wal(sample_cluster))

    assert ask_sandbox(client, alice, server, run=base).status_code == 302
    rejected = RestoreRequest.objects.get()
    client.force_login(bob)
    client.post(reverse("restore-request-reject", args=[rejected.pk]), {"note": "not now"})
    assert "not run" in run_request(rejected.pk)  # even if a task were enqueued by mistake
    rejected.refresh_from_db()
    assert rejected.status == "rejected" and not RestoreRun.objects.exists()
    assert not any(sandbox_root.iterdir())

    ask_sandbox(client, alice, server, run=base)
    request = RestoreRequest.objects.exclude(pk=rejected.pk).get()
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]))
    restore = RestoreRun.objects.get(request=request)
    assert restore.status == "succeeded", restore.error
    assert f"base backup #{base.pk}" in restore.target
    # The state at the end of the backup: the table created after it is not there.
    assert rows(restore.port, "SELECT count(*) FROM pg_tables WHERE tablename = 'probe'") == [(0,)]

    # Approved, but the WAL chain lost a segment since: refused at run time, nothing written.
    ask_sandbox(client, alice, server, run=base)
    late = RestoreRequest.objects.filter(status="pending").get()
    lost = WalSegment.objects.filter(server=server, segno__isnull=False, name__gte=base.start_wal).order_by("segno")[0]
    lost.delete()
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[late.pk]))
    late.refresh_from_db()
    failed = RestoreRun.objects.get(request=late)
    assert late.status == "failed" and failed.status == "failed"
    assert failed.error.startswith("refused: ") and lost.name in failed.error
    assert [p.name for p in sandbox_root.iterdir()] == [Path(restore.into_datadir).name]


def test_a_pitr_request_is_refused_when_the_time_or_backup_cannot_be_restored(
    client, alice, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    from io import StringIO

    from django.core.management import call_command

    client.force_login(alice)
    now = timezone.localtime()
    no_base = ask_sandbox(client, alice, server, with_offset(now - timedelta(minutes=1)))
    assert b"has no base backup to recover from" in no_base.content

    enable_push(sample_cluster)
    base_backup()
    call_command("backup", "maldives", stdout=StringIO())
    logical = BackupRun.objects.get(kind="logical", status="succeeded")
    cases = [
        (now.strftime("%Y-%m-%d %H:%M:%S"), None, "has no timezone"),
        (with_offset(now + timedelta(hours=1)), None, "is in the future"),
        (with_offset(now - timedelta(days=1)), None, "is before the oldest moment"),
        ("", None, "give a point in time or a base backup"),
        ("", logical, "is a logical backup: a sandbox cluster starts from a base backup"),
    ]
    for target_time, run, message in cases:
        response = ask_sandbox(client, alice, server, target_time, run)
        assert response.status_code == 200 and message in response.content.decode(), (target_time, message)
    assert not RestoreRequest.objects.exists()


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_restoretest_of_a_base_backup_passes_then_fails_with_an_alert_on_a_corrupted_artifact(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    from io import StringIO

    from django.core.management import call_command

    enable_push(sample_cluster)
    call_command("backup", "maldives", stdout=StringIO())  # its snapshot's counts are the reference
    ValidationCheck.objects.create(
        server=server, name="admins exist", sql="SELECT count(*) > 0 FROM public.users", expected="t"
    )
    base = base_backup()

    result = run_command("restoretest", "maldives", "--kind", "base")
    assert result["status"] == "passed" and result["_exit"] == 0, result
    assert result["kind"] == "base" and result["backup_run"] == base.pk
    assert result["duration_s"] > 0
    names = [c["name"] for c in result["checks"]]
    assert names[0] == "restore" and "check: admins exist" in names
    assert {f"rows in {t}" for t in Database.of_dsn(server).critical_tables} <= set(names)
    assert not postgres_running_in(sandbox_root) and not list(sandbox_root.iterdir())
    test = RestoreTest.objects.get(pk=result["id"])
    assert test.restores.get().kind == "pitr"

    copy = base.copies.get(artifact="main")
    path = Path(copy.location.path) / copy.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_command("restoretest", "maldives", "--kind", "base")
    assert result["status"] == "failed" and result["_exit"] == 1, result
    assert result["checks"][0]["name"] == "restore" and not result["checks"][0]["ok"]
    assert "sha256" in result["checks"][0]["detail"]
    alert = Alert.objects.get(condition="restore_test_failed", resolved_at=None)
    assert f"#{result['id']}" in alert.message
    assert not postgres_running_in(sandbox_root) and not list(sandbox_root.iterdir())

    base_backup()  # a new good base backup: its test passes and the alert is resolved
    assert run_command("restoretest", "maldives", "--kind", "base")["status"] == "passed"
    assert not Alert.objects.filter(condition="restore_test_failed", resolved_at=None).exists()


def test_a_dba_starts_a_restore_test_from_the_server_page_and_lands_on_its_page(
    client, alice, charlie, server, passphrase_file, backup_root
):
    from io import StringIO

    from django.core.management import call_command

    call_command("backup", "maldives", stdout=StringIO())
    client.force_login(charlie)
    assert client.post(reverse("restore-test-now", args=["maldives"])).status_code == 403
    assert not RestoreTest.objects.exists()

    client.force_login(alice)
    response = client.post(reverse("restore-test-now", args=["maldives"]))  # the worker runs it inline
    test = RestoreTest.objects.get()
    assert response.status_code == 302 and response["Location"] == test.get_absolute_url()
    progress = client.get(reverse("restore-test-progress", args=[test.pk])).json()
    assert progress["status"] == "passed" and progress["done"] and progress["bytes_done"] > 0
    client.force_login(charlie)
    page = client.get(test.get_absolute_url()).content.decode()
    assert "passed" in page and "Measured RTO" in page and "<button" not in page.split("<main")[-1]
    assert ("restore_test_requested", "alice") in JournalEntry.objects.values_list("action", "actor")
