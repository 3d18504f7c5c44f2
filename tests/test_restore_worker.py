"""Public-key mode with a restore worker: backups are encrypted to GPG_RECIPIENTS, the portal holds
no secret key, and restore, restore-test and rebuild tasks go to a django-q2 cluster of their own
(RESTORE_CLUSTER), run on the one host that holds the private key.

The broker is real (django-q2's ORM broker: tests otherwise run tasks inline), and so is the
restore worker of the last test: `Q_CLUSTER_NAME=restore manage.py qcluster` in a subprocess."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.models import OrmQ, Schedule
from django_q.scheduler import scheduler
from django_q.signing import SignedPackage

from backupportal.lib import sampledata
from backups.models import BackupRun, Server
from backups.schedules import SCHEDULED_JOB
from backups.verify import verify_run
from restores.models import RestoreRequest
from tests.helpers import descendants, portal_env, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(monkeypatch, db):
    """django-q2 queues for real, in the ORM broker, instead of running each task inline (also
    where the suite's broker is Redis, as in CI: the queues are read back from OrmQ)."""
    monkeypatch.setattr(Conf, "SYNC", False)
    monkeypatch.setattr(Conf, "ORM", "default")
    OrmQ.objects.all().delete()


def queued():
    """(queue, task function) of each task waiting in the broker, oldest first."""
    return [(q.key, q.task["func"]) for q in OrmQ.objects.order_by("id")]


def taken(queue):
    """The functions of the tasks a worker of this queue takes next (all of them)."""
    funcs = []
    while batch := queue.dequeue():
        funcs += [SignedPackage.loads(payload)["func"] for _, payload in batch]
    return funcs


def ask_and_approve(client, alice, bob, run, database="restored_by_worker"):
    request = RestoreRequest.objects.create(
        server=run.server,
        backup_run=run,
        destination="new_database",
        target_database=database,
        reason="a table was dropped",
        requested_by=alice,
    )
    client.force_login(bob)
    assert client.post(reverse("restore-request-approve", args=[request.pk]), {"note": "ok"}).status_code == 302
    return request


def test_restore_tasks_go_to_the_restore_cluster_and_backups_stay_on_the_main_one(
    client, settings, broker, alice, bob, db
):
    settings.RESTORE_CLUSTER = "restore"
    server = Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/postgres")
    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded", finished_at=timezone.now())
    OrmQ.objects.all().delete()
    ask_and_approve(client, alice, bob, run)
    client.force_login(alice)
    client.post(reverse("restore-test-now", args=[server.name]), {"kind": "logical"})
    client.post(reverse("backup-now", args=[server.name]), {"kind": "logical"})
    main = Conf.CLUSTER_NAME
    assert main != "restore"
    assert queued() == [
        ("restore", "restores.tasks.run_request"),
        ("restore", "restores.tasks.run_restore_test"),
        (main, "backups.tasks.run_backup"),
    ]
    # What each cluster's worker takes from the broker: its own queue only.
    assert taken(get_broker("restore")) == ["restores.tasks.run_request", "restores.tasks.run_restore_test"]
    assert taken(get_broker(main)) == ["backups.tasks.run_backup"]


def test_without_a_restore_cluster_restore_tasks_stay_on_the_main_cluster(client, settings, broker, alice, bob, db):
    settings.RESTORE_CLUSTER = ""
    server = Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/postgres")
    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded", finished_at=timezone.now())
    ask_and_approve(client, alice, bob, run)
    assert queued() == [(Conf.CLUSTER_NAME, "restores.tasks.run_request")]
    assert set(Schedule.objects.filter(func=SCHEDULED_JOB).values_list("cluster", flat=True)) == {None}


@pytest.mark.django_db(transaction=True)  # django-q2's scheduler closes the connection it was given
def test_the_restore_test_schedules_fire_on_the_restore_cluster_only(settings, broker, monkeypatch):
    settings.RESTORE_CLUSTER = "restore"
    Schedule.objects.all().delete()
    Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/postgres")
    rows = Schedule.objects.filter(func=SCHEDULED_JOB)
    assert dict(rows.values_list("name", "cluster")) == {
        "logical:atoll": None,
        "restoretest:atoll": "restore",
        "restoretest_monthly:atoll": "restore",
    }
    rows.update(next_run=timezone.now() - timedelta(minutes=1))  # all due

    scheduler(broker=get_broker())  # the main cluster's scheduler
    main = Conf.CLUSTER_NAME
    assert queued() == [(main, SCHEDULED_JOB)]
    assert OrmQ.objects.get().task["args"] == ("atoll", "logical")

    monkeypatch.setattr(Conf, "CLUSTER_NAME", "restore")  # the restore worker's scheduler
    scheduler(broker=get_broker("restore"))
    restore_jobs = [q.task["args"] for q in OrmQ.objects.filter(key="restore").order_by("id")]
    assert sorted(restore_jobs) == [("atoll", "restoretest"), ("atoll", "restoretest_monthly")]


# --- End to end: the portal cannot read its backups; the restore worker can. ------------------


@pytest.fixture
def gpg_home():
    """Short GnuPG homes (gpg-agent's socket path must fit a unix socket's 108 bytes, which
    pytest's tmp_path under xdist does not); their agents stopped and the homes removed after."""
    made = []

    def make(name):
        made.append(Path(tempfile.mkdtemp(prefix=f"bp-{name}-")))
        made[-1].chmod(0o700)
        return made[-1]

    yield make
    for home in made:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def gpg_key_pair(home):
    """A recipient key (sign + encrypt subkey, no passphrase) in `home`: its fingerprint and public key."""
    gpg = ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
    uid = "dr-officer@reliabilitymaldives.mv"
    subprocess.run(gpg + ["--quick-gen-key", uid, "ed25519", "cert", "never"], check=True, capture_output=True)
    listing = subprocess.run(gpg + ["--list-keys", "--with-colons"], capture_output=True, text=True).stdout
    fpr = listing.split("fpr:::::::::")[1].split(":")[0]
    subprocess.run(gpg + ["--quick-add-key", fpr, "cv25519", "encr", "never"], check=True, capture_output=True)
    return fpr, subprocess.run(gpg + ["--export", "--armor", fpr], capture_output=True, check=True).stdout


@pytest.fixture
def restore_worker(settings):
    """Start the restore worker (`Q_CLUSTER_NAME=restore manage.py qcluster`); stopped after."""
    started = []

    def start(**env):
        log = open(Path(settings.VAR_DIR) / f"restore-worker-{os.getpid()}.log", "w")  # noqa: SIM115
        # The ORM broker, as the test's own queues (Q_BROKER_URL empty), whatever the suite runs on.
        env = portal_env(
            settings, Q_SYNC="0", Q_CLUSTER_NAME="restore", RESTORE_CLUSTER="restore", Q_BROKER_URL="", **env
        )
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        started.append((proc, log))
        return proc

    yield start
    for proc, log in started:
        proc.terminate()  # qcluster stops cleanly on SIGTERM to its main process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.django_db(transaction=True)  # the restore worker is another process
def test_the_portal_backs_up_without_the_private_key_and_only_the_restore_worker_restores(
    client, server, sample_cluster, settings, backup_root, gpg_home, alice, bob, monkeypatch, restore_worker
):
    worker_home = gpg_home("restore-host")  # the private key: on the restore host only
    fpr, public = gpg_key_pair(worker_home)
    portal_home = gpg_home("portal")  # the portal: the public key alone
    subprocess.run(["gpg", "--batch", "--homedir", str(portal_home), "--import"], input=public, check=True)
    secret = subprocess.run(
        ["gpg", "--batch", "--homedir", str(portal_home), "--list-secret-keys", "--with-colons"],
        capture_output=True,
        text=True,
    )
    assert "sec:" not in secret.stdout
    settings.GNUPGHOME, settings.GPG_RECIPIENTS, settings.BACKUP_PASSPHRASE_FILE = str(portal_home), [fpr], ""
    settings.RESTORE_CLUSTER = "restore"

    call_command("backup", "maldives", stdout=StringIO())  # and its copies, inline: the main cluster's work
    run = BackupRun.objects.get()
    assert run.status == "succeeded", run.error
    portal_try = subprocess.run(
        ["gpg", "--batch", "--homedir", str(portal_home), "--decrypt", str(backup_root / run.key)],
        capture_output=True,
    )
    assert portal_try.returncode != 0 and b"No secret key" in portal_try.stderr
    verified = verify_run(run)  # the weekly verification reads copies by sha256: no key needed either
    assert verified["checked"] >= 1 and verified["checked"] == verified["ok"]

    monkeypatch.setattr(Conf, "SYNC", False)  # from here on, tasks wait in the broker for their cluster
    monkeypatch.setattr(Conf, "ORM", "default")  # the ORM broker, as the restore worker's (see broker)
    OrmQ.objects.all().delete()
    request = ask_and_approve(client, alice, bob, run)
    client.force_login(alice)
    client.post(reverse("backup-now", args=["maldives"]), {"kind": "logical"})  # for the main cluster
    main = Conf.CLUSTER_NAME
    assert queued() == [("restore", "restores.tasks.run_request"), (main, "backups.tasks.run_backup")]

    restore_worker(GNUPGHOME=str(worker_home), GPG_RECIPIENTS=fpr, BACKUP_PASSPHRASE_FILE="")

    def done():
        request.refresh_from_db()
        return request.status in ("succeeded", "failed")

    wait_for(done, timeout=180, what="the restore worker to run the restore request")
    assert request.status == "succeeded", list(request.runs.values_list("error", flat=True))
    with sample_cluster.connect("restored_by_worker") as conn:
        assert sampledata.counts(conn) == run.details["row_counts"]
    # The worker acknowledges the restore (its row leaves the broker); the backup queued for the
    # main cluster is not the restore worker's: it still waits.
    wait_for(lambda: queued() == [(main, "backups.tasks.run_backup")], timeout=30, what="the restore acknowledged")
