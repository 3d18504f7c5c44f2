"""Request sandboxes are looked at, stopped and removed only where they are, by whom may, on real
clusters: with a restore worker (RESTORE_CLUSTER) they live on its host, so the hourly expiry
fires there and the page's removal is queued there, and the web page does not pretend to see
them; only the DBA who asked for a sandbox or the one who approved it removes it from its page;
and a sandbox pg_ctl cannot judge is neither called stopped nor removed."""

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.models import OrmQ, Schedule
from django_q.scheduler import scheduler
from django_q.signing import SignedPackage

from backupportal.models import JournalEntry
from backups.binaries import pg_ctl
from backups.tasks import GLOBAL_SCHEDULES, ensure_global_schedules
from restores import sandbox
from restores.models import RestoreRun
from tests import test_sandbox_expiry as expiry
from tests.helpers import base_backup, enable_push, make_user, postgres_running_in, run_command

pytest_plugins = ["tests.walfixtures"]

RESTORE_HOST = "restore-host.example"


@pytest.fixture
def broker(monkeypatch, db):
    """django-q2 queues for real, in the ORM broker, instead of running each task inline."""
    monkeypatch.setattr(Conf, "SYNC", False)
    monkeypatch.setattr(Conf, "ORM", "default")
    OrmQ.objects.all().delete()


def approved_sandbox(client, alice, bob, server):
    """Alice asks for a sandbox of a fresh base backup, Bob approves, the worker (inline) restores it."""
    return expiry.approved_sandbox(client, alice, bob, server, base_backup())


def request_page(client, restore):
    return client.get(reverse("restore-request", args=[restore.request_id])).content.decode()


def sandbox_cell(client, restore):
    return request_page(client, restore).split(f'id="sandbox-{restore.pk}"')[1].split("</td>")[0]


def remove(client, restore):
    """Tick the box and press "Stop and remove sandbox": the page it lands on."""
    url = reverse("sandbox-remove", args=[restore.pk])
    return client.post(url, {"confirm": "remove"}, follow=True).content.decode()


def test_with_a_restore_worker_the_page_says_where_the_sandbox_is_and_queues_its_removal_there(
    client,
    alice,
    bob,
    server,
    sample_cluster,
    passphrase_file,
    backup_root,
    wal_spool,
    sandbox_root,
    settings,
    monkeypatch,
):
    enable_push(sample_cluster)
    restore = approved_sandbox(client, alice, bob, server)
    datadir = Path(restore.into_datadir)
    # From here on the portal has a restore worker, which ran the restore on its own host: this
    # web process is on another one and cannot see that host's SANDBOX_ROOT.
    settings.RESTORE_CLUSTER = "restore"
    RestoreRun.objects.filter(pk=restore.pk).update(host=RESTORE_HOST)
    client.force_login(alice)
    cell = sandbox_cell(client, restore)
    assert f"sandbox on {RESTORE_HOST}" in cell and "State unknown here" in cell
    assert "sandbox running" not in cell and "sandbox removed" not in cell
    # A restore from before hosts were recorded: the restore worker's host, unnamed.
    RestoreRun.objects.filter(pk=restore.pk).update(host="")
    assert "sandbox on the restore host" in sandbox_cell(client, restore)
    RestoreRun.objects.filter(pk=restore.pk).update(host=RESTORE_HOST)

    # Alice's removal is queued for the restore worker, and the page says so: nothing is done yet.
    monkeypatch.setattr(Conf, "SYNC", False)
    monkeypatch.setattr(Conf, "ORM", "default")
    OrmQ.objects.all().delete()
    page = remove(client, restore)
    assert f"Removal of the sandbox of restore #{restore.pk} ({datadir}) queued for the restore worker" in page
    assert [(q.key, q.task["func"]) for q in OrmQ.objects.all()] == [("restore", "restores.tasks.remove_sandbox")]
    assert postgres_running_in(datadir) and datadir.exists()
    assert not JournalEntry.objects.filter(action="sandbox_removed").exists()
    assert f"sandbox on {RESTORE_HOST}" in sandbox_cell(client, restore)

    # The restore worker takes it from its queue and removes the sandbox on its host.
    with monkeypatch.context() as worker:
        worker.setattr(Conf, "CLUSTER_NAME", "restore")
        worker.setattr(sandbox.socket, "gethostname", lambda: RESTORE_HOST)  # the host the restore ran on
        (task,) = [SignedPackage.loads(payload) for _, payload in get_broker("restore").dequeue()]
        assert import_string(task["func"])(*task["args"], **task["kwargs"]) == "stopped and removed"
    assert not postgres_running_in(datadir) and not datadir.exists()
    entry = JournalEntry.objects.get(action="sandbox_removed")
    assert entry.actor == "alice" and entry.details["was"] == "running"
    # The web host still cannot look, but the journal it shares says the sandbox is gone.
    assert "sandbox removed" in sandbox_cell(client, restore)


@pytest.mark.django_db(transaction=True)  # django-q2's scheduler closes the connection it was given
def test_the_sandbox_expiry_fires_on_the_restore_cluster_when_there_is_one(settings, broker, monkeypatch):
    Schedule.objects.all().delete()
    settings.RESTORE_CLUSTER = ""
    ensure_global_schedules()
    assert set(Schedule.objects.values_list("cluster", flat=True)) == {None}  # one host: the main cluster

    settings.RESTORE_CLUSTER = "restore"  # set later: the next migrate moves the existing schedule
    ensure_global_schedules()
    clusters = dict(Schedule.objects.values_list("name", "cluster"))
    on_restore_host = {"sandboxes-expire", "key-restore-tests"}  # its disk; its private key
    assert clusters == {name: ("restore" if name in on_restore_host else None) for name in GLOBAL_SCHEDULES}
    Schedule.objects.update(next_run=timezone.now() + timedelta(hours=1))
    Schedule.objects.filter(name="sandboxes-expire").update(next_run=timezone.now() - timedelta(minutes=1))

    scheduler(broker=get_broker())  # the main cluster's scheduler leaves it alone
    assert not OrmQ.objects.exists()
    monkeypatch.setattr(Conf, "CLUSTER_NAME", "restore")  # the restore worker's scheduler fires it
    scheduler(broker=get_broker("restore"))
    assert [(q.key, q.task["func"]) for q in OrmQ.objects.all()] == [("restore", "restores.tasks.expire_sandboxes")]

    settings.RESTORE_CLUSTER = ""  # and back on the main cluster once the restore worker goes
    ensure_global_schedules()
    assert Schedule.objects.get(name="sandboxes-expire").cluster is None


def test_only_the_dba_who_asked_or_approved_may_remove_a_sandbox_from_its_page(
    client, alice, bob, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    enable_push(sample_cluster)
    restore = approved_sandbox(client, alice, bob, server)
    datadir = Path(restore.into_datadir)
    dhon = make_user("dhon", "DBA")  # a DBA, but not of this request

    client.force_login(dhon)
    cell = sandbox_cell(client, restore)
    assert "sandbox running" in cell and "Stop and remove sandbox" not in cell
    assert "Only alice (who asked for it) or bob (who approved it) may stop and remove it." in cell
    page = remove(client, restore)
    assert (
        f"Only alice (who asked for request #{restore.request_id}) or bob (who approved it) "
        "may stop and remove its sandbox." in page
    )
    assert postgres_running_in(datadir) and datadir.exists()
    assert not JournalEntry.objects.filter(action="sandbox_removed").exists()

    client.force_login(bob)  # the approver may
    assert "Stop and remove sandbox" in sandbox_cell(client, restore)
    assert f"The sandbox of restore #{restore.pk} ({datadir}) is stopped and removed." in remove(client, restore)
    assert not postgres_running_in(datadir) and not datadir.exists()
    assert JournalEntry.objects.get(action="sandbox_removed").actor == "bob"


def test_a_sandbox_pg_ctl_cannot_judge_is_unknown_and_neither_removed_nor_expired(
    client, alice, bob, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root, settings
):
    enable_push(sample_cluster)
    restore = approved_sandbox(client, alice, bob, server)
    datadir = Path(restore.into_datadir)
    assert pg_ctl(datadir, "stop", "-m", "fast", "-w").returncode == 0
    assert sandbox.state(restore) == "stopped"
    # Without PG_VERSION, pg_ctl status exits 4 ("not a database cluster directory"): it cannot
    # tell, which is no "not running".
    (datadir / "PG_VERSION").unlink()
    assert sandbox.state(restore) == "unknown"

    client.force_login(alice)
    cell = sandbox_cell(client, restore)
    assert "sandbox unknown" in cell and "is not a database cluster directory" in cell
    page = remove(client, restore)
    assert f"pg_ctl cannot tell whether the sandbox in {datadir} runs (exit 4: " in page
    assert "nothing was removed" in page
    assert datadir.exists() and (datadir / "base").exists()

    # The hourly sweep leaves it too (and says it in the listing), until pg_ctl can tell.
    settings.SANDBOX_MAX_AGE = 3600
    RestoreRun.objects.filter(pk=restore.pk).update(finished_at=timezone.now() - timedelta(hours=2))
    swept = run_command("sandboxes", "--expire")
    assert swept["removed"] == [] and [(s["restore"], s["state"]) for s in swept["sandboxes"]] == [
        (restore.pk, "unknown")
    ]
    assert datadir.exists()
    assert not JournalEntry.objects.filter(action="sandbox_removed").exists()


def test_a_sandbox_gone_from_its_own_host_is_journaled_once_and_a_failed_restore_is_no_sandbox(
    client, alice, bob, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root, settings
):
    enable_push(sample_cluster)
    restore = approved_sandbox(client, alice, bob, server)
    datadir = Path(restore.into_datadir)
    settings.RESTORE_CLUSTER = "restore"  # a restore worker, on this very host (the run's host)
    assert sandbox.pg_ctl(datadir, "stop", "-m", "fast", "-w").returncode == 0
    shutil.rmtree(datadir)  # removed by hand, or with its container
    page = remove(client, restore)  # on its own host: done here, not queued
    assert f"The sandbox of restore #{restore.pk} ({datadir}) is already gone." in page
    entry = JournalEntry.objects.get(action="sandbox_removed")
    assert entry.details["was"] == "missing" and entry.actor == "bob"  # its approver
    remove(client, restore)
    assert JournalEntry.objects.filter(action="sandbox_removed").count() == 1  # once

    # A sandbox restore that failed wrote nothing that stays: no sandbox to show or remove.
    RestoreRun.objects.filter(pk=restore.pk).update(status="failed")
    assert f'id="sandbox-{restore.pk}"' not in request_page(client, RestoreRun.objects.get(pk=restore.pk))
