"""Restores and restore tests whose worker died mid-run (SIGKILL, django-q2's timeout): failed
where everyone sees them, and what they had made removed (restores.orphans), never a copy of
production left half restored, nor a row "running" for ever."""

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups import walingest
from backups.models import BackupRun, Server
from restores import orphans, pitr_staging
from restores.logical import run_logical
from restores.models import Interrupted, RestoreRequest, RestoreRun, RestoreTest
from restores.restoretest import run_restore_test
from tests.helpers import (
    archive_some_wal,
    child_named,
    enable_push,
    manage,
    postgres_running_in,
    register,
    restore_dir,
    run_command,
    stop_restored,
    wait_for,
)

pytest_plugins = ["tests.walfixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def dead_pid():
    """The pid of a process that has just exited (reaped): no such process now."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def databases(cluster):
    return {name for (name,) in cluster.execute("SELECT datname FROM pg_database")}


def loading_into(proc, cluster, dbname):
    """The restore `proc` is loading `dbname`: a pg_restore below it, or its own COPY there
    (restores.dumpstream loads the rows as the dump is decrypted)."""
    copying = cluster.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}' AND query LIKE 'COPY %'"
    )
    return child_named(proc.pid, "pg_restore") or copying[0][0]


@pytest.fixture
def big_server(big_cluster, passphrase_file, backup_root, wal_spool):
    server = register(big_cluster)
    yield server


def test_a_logical_restore_whose_worker_is_killed_is_failed_and_its_half_restored_database_dropped(
    big_server, big_cluster, settings
):
    assert run_command("backup", "maldives")["status"] == "succeeded"
    backup = BackupRun.objects.get(kind="logical", status="succeeded")
    proc = manage(settings, "restore", str(backup.pk), "--into-database", "half_copy", "--json")
    # Loading: its database made and recorded (a first pg_restore only lists the dump's contents).
    loading = RestoreRun.objects.filter(status="running").exclude(left={})
    wait_for(
        lambda: (
            loading.exists() and "half_copy" in databases(big_cluster) and loading_into(proc, big_cluster, "half_copy")
        ),
        timeout=60,
        what="the load to start",
    )
    restore = loading.get()
    assert restore.left == {"database": "half_copy", "at": big_server.destination} and restore.pid == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert "half_copy" in databases(big_cluster)  # what the killed worker leaves: a database half loaded

    assert orphans.fail_orphans() == [restore]
    restore.refresh_from_db()
    assert restore.status == "failed" and restore.left == {}
    assert restore.error.startswith(f"interrupted: the process running it (pid {proc.pid}) died")
    assert restore.error.endswith("the database half_copy it was restoring into was dropped")
    assert "half_copy" not in databases(big_cluster)
    said = JournalEntry.objects.filter(action="restore_failed", object_id=str(restore.pk)).get()
    assert said.actor == "job:orphans" and "half_copy" in said.details["error"]
    assert orphans.fail_orphans() == []  # settled once


def test_a_pitr_whose_worker_is_killed_has_its_cluster_stopped_and_removed(big_server, big_cluster, settings):
    enable_push(big_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    archive_some_wal(big_cluster)
    walingest.ingest(big_server)
    datadir, port = restore_dir(), free_port()
    try:
        proc = manage(
            settings, "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(datadir),
            "--port", str(port), "--json",
        )  # fmt: skip
        wait_for(lambda: RestoreRun.objects.filter(status="running").exclude(left={}).exists(), timeout=60, what="left")
        restore = RestoreRun.objects.get(status="running")
        staging = pitr_staging.staging_for(restore.pk)  # the portal's, outside the data directory
        made = {"datadir": str(datadir), "created": True, "inode": datadir.stat().st_ino, "staging": str(staging)}
        assert restore.left == made
        wait_for(lambda: (staging / "unchecked").exists(), timeout=30, what="the staging directory")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert datadir.exists()

        assert orphans.fail_orphans() == [restore]
        restore.refresh_from_db()
        assert restore.status == "failed" and restore.left == {}
        assert restore.error.endswith(f"its cluster in {datadir} was stopped and removed"), restore.error
        assert not datadir.exists() and postgres_running_in(datadir.parent) == []
        assert not staging.exists()
    finally:
        stop_restored(datadir)


def test_a_live_restore_is_left_be_and_one_failed_meanwhile_stops_and_never_succeeds(server, monkeypatch):
    from backups import runner

    monkeypatch.setattr(runner, "HEARTBEAT_EVERY", 0.1)
    restore = RestoreRun.begin(RestoreRun.Kind.LOGICAL, "alice", server=server, into_server=server)
    stale = timezone.now() - runner.ORPHAN_AFTER - timedelta(minutes=1)
    RestoreRun.objects.filter(pk=restore.pk).update(heartbeat_at=stale)
    # Its process lives on this host: alive, whatever its heartbeat (a paused machine, say).
    assert orphans.fail_orphans() == []
    # On another host only the heartbeat tells: it beats, so it lives.
    RestoreRun.objects.filter(pk=restore.pk).update(host="restore-host")
    with runner.beating(restore):
        wait_for(lambda: RestoreRun.objects.get(pk=restore.pk).heartbeat_at > stale, timeout=5, what="a beat")
        assert orphans.fail_orphans() == []
    # Its heartbeat stops (the catalog out of its reach, say): failed. The process, still at work,
    # may record nothing more (it stops there), and its end changes nothing.
    RestoreRun.objects.filter(pk=restore.pk).update(heartbeat_at=stale)
    assert orphans.fail_orphans() == [restore]
    with pytest.raises(Interrupted, match=f"restore #{restore.pk} was failed meanwhile"):
        restore.leaves(database="late_copy")
    restore.finish(None)
    restore.refresh_from_db()
    assert restore.status == "failed" and restore.error.startswith("interrupted: no heartbeat since")
    assert restore.left == {}


def test_a_pid_reused_by_a_later_process_is_no_proof_of_life(server):
    restore = RestoreRun.begin(RestoreRun.Kind.LOGICAL, "alice", server=server, into_server=server)
    # This test's own process was started before the run began: a reused pid is newer than it.
    RestoreRun.objects.filter(pk=restore.pk).update(started_at=timezone.now() - timedelta(days=3650))
    assert orphans.fail_orphans() == [restore]
    restore.refresh_from_db()
    assert restore.error.startswith(f"interrupted: the process running it (pid {os.getpid()}) died")


def test_a_run_on_another_host_is_failed_by_its_heartbeat_and_its_cluster_left_to_that_host(server, tmp_path):
    datadir = tmp_path / "theirs"
    datadir.mkdir()
    restore = RestoreRun.begin(RestoreRun.Kind.PITR, "alice", server=server, into_datadir=str(datadir))
    RestoreRun.objects.filter(pk=restore.pk).update(
        host="restore-host", pid=dead_pid(), left={"datadir": str(datadir), "created": True}
    )
    assert orphans.fail_orphans() == []  # its pid is of another host, and it beat a moment ago
    RestoreRun.objects.filter(pk=restore.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert orphans.fail_orphans() == [restore]
    restore.refresh_from_db()
    assert restore.error.endswith(
        f"its cluster in {datadir} is stopped and removed on restore-host by the next PITR there"
    )
    assert datadir.exists() and restore.left  # not this host's disk: its own host removes it


def replace_run(server, request=None):
    return RestoreRun.begin(
        RestoreRun.Kind.REPLACE, "alice", server=server, into_server=server, into_database="reliabilitymaldives",
        request=request,
    )  # fmt: skip


def died(restore, **left):
    RestoreRun.objects.filter(pk=restore.pk).update(pid=dead_pid(), left=left)


def test_a_replace_killed_before_its_swap_drops_its_copy_and_production_stays_as_it_was(
    server, sample_cluster, alice, bob
):
    request = RestoreRequest.objects.create(
        server=server, requested_by=alice, decided_by=bob, destination="replace", status="running", reason="x"
    )
    before = replace_run(server, request)
    sample_cluster.execute("CREATE DATABASE reliabilitymaldives_restore_1")
    died(before, database="reliabilitymaldives_restore_1", kept_as="reliabilitymaldives_before_1")
    assert orphans.fail_orphans() == [before]
    before.refresh_from_db()
    assert before.status == "failed" and before.error.endswith(
        "production reliabilitymaldives is unchanged; the copy reliabilitymaldives_restore_1 was dropped"
    )
    assert "reliabilitymaldives_restore_1" not in databases(sample_cluster)
    request.refresh_from_db()
    assert request.status == "failed"

    # Died inside the swap, production closed to connections and the renames not done: opened again.
    closing = replace_run(server)
    sample_cluster.execute("CREATE DATABASE reliabilitymaldives_restore_3")
    sample_cluster.execute("ALTER DATABASE reliabilitymaldives ALLOW_CONNECTIONS false")
    died(closing, database="reliabilitymaldives_restore_3", kept_as="reliabilitymaldives_before_3", closing=True)
    assert orphans.fail_orphans() == [closing]
    closing.refresh_from_db()
    assert closing.error.endswith(
        "production reliabilitymaldives was closed for the swap and is open again, as it was; "
        "the copy reliabilitymaldives_restore_3 was dropped"
    )
    allowed = "SELECT datallowconn FROM pg_database WHERE datname = 'reliabilitymaldives'"
    assert sample_cluster.execute(allowed) == [(True,)]


def test_a_replace_killed_after_its_swap_says_production_was_replaced(server, sample_cluster, alice, bob):
    request = RestoreRequest.objects.create(
        server=server, requested_by=alice, decided_by=bob, destination="replace", status="running", reason="x"
    )
    after = replace_run(server, request)
    sample_cluster.execute("CREATE DATABASE reliabilitymaldives_before_2")  # the swap's renames committed
    died(after, database="reliabilitymaldives_restore_2", kept_as="reliabilitymaldives_before_2", closing=True)
    assert orphans.fail_orphans() == [after]
    after.refresh_from_db()
    assert after.status == "succeeded with warnings" and after.error == ""
    assert after.warnings[0].endswith(
        "it stopped after its swap: production reliabilitymaldives holds the backup, "
        "the previous database is kept as reliabilitymaldives_before_2"
    )
    assert {"reliabilitymaldives", "reliabilitymaldives_before_2"} <= databases(sample_cluster)
    request.refresh_from_db()
    assert request.status == "succeeded"  # never to be run again


def test_a_killed_restore_onto_another_server_leaves_none_of_the_roles_it_created(
    big_server, big_cluster, pg_cluster_of, settings
):
    """Found by review: the database was dropped, but a LOGIN role the globals created (with
    production's password, --with-role-passwords) stayed on the other server for good."""
    big_cluster.execute("CREATE ROLE ghost LOGIN PASSWORD 'from-prod'")
    big_cluster.execute("ALTER TABLE scans OWNER TO ghost", dbname="reliabilitymaldives")
    assert run_command("backup", "maldives")["status"] == "succeeded"
    backup = BackupRun.objects.get(kind="logical", status="succeeded")
    other = pg_cluster_of(15)
    register(other, name="standby", dbname="postgres")
    proc = manage(
        settings, "restore", str(backup.pk), "--into-database", "half_copy", "--into-server", "standby",
        "--with-role-passwords", "--json",
    )  # fmt: skip
    loading = RestoreRun.objects.filter(status="running", left__has_key="roles")
    wait_for(lambda: loading.exists() and loading_into(proc, other, "half_copy"), timeout=90, what="the load")
    restore = loading.get()
    assert "ghost" in restore.left["roles"] and restore.left["database"] == "half_copy"
    assert other.execute("SELECT rolname FROM pg_roles WHERE rolname = 'ghost'") == [("ghost",)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    assert orphans.fail_orphans() == [restore]
    restore.refresh_from_db()
    assert restore.status == "failed" and restore.left == {}
    assert "the database half_copy it was restoring into was dropped; the roles it created (" in restore.error
    assert other.execute("SELECT datname FROM pg_database WHERE datname = 'half_copy'") == []
    assert other.execute("SELECT rolname FROM pg_roles WHERE rolname = 'ghost'") == []


def test_a_restore_test_killed_during_its_checks_leaves_none_of_the_roles_its_restore_created(
    server, sample_cluster, pg_cluster_of, passphrase_file, backup_root
):
    """Found by review of the fix above: a test's restore had finished (its `left` emptied), so
    the sweep dropped the scratch copy but not the LOGIN role the globals created on the sandbox."""
    sample_cluster.execute("CREATE ROLE ghost LOGIN PASSWORD 'from-prod'")
    sample_cluster.execute("ALTER TABLE users OWNER TO ghost", dbname="reliabilitymaldives")
    assert run_command("backup", "maldives")["status"] == "succeeded"
    run = BackupRun.objects.get(kind="logical", status="succeeded")
    other = pg_cluster_of(15)
    sandbox = register(other, name="sandboxsrv", dbname="postgres")
    Server.objects.filter(pk=server.pk).update(sandbox_server=sandbox, sandbox_destination=sandbox.destination)
    server.refresh_from_db()
    test = RestoreTest.objects.create(server=server, backup_run=run, pid=dead_pid(), host=socket.gethostname())
    restore = run_logical(run, server.sandbox, f"restoretest_{test.pk}", "job:restoretest", restore_test=test)
    assert restore.succeeded and restore.created_roles == ["ghost"], restore.error
    # ... and the worker dies while the checks run.
    assert orphans.fail_orphans() == [test]
    assert other.execute("SELECT datname FROM pg_database WHERE datname = %s", (f"restoretest_{test.pk}",)) == []
    assert other.execute("SELECT rolname FROM pg_roles WHERE rolname = 'ghost'") == []


def test_an_approved_request_no_worker_ran_expires_and_never_runs_later(server, alice, bob, settings):
    from restores.tasks import run_request

    request = RestoreRequest.objects.create(
        server=server, requested_by=alice, decided_by=bob, destination="new_database", target_database="late",
        status="approved", reason="x", decided_at=timezone.now(),
    )  # fmt: skip
    assert orphans.fail_orphans() == [] and RestoreRequest.objects.get(pk=request.pk).status == "approved"
    RestoreRequest.objects.filter(pk=request.pk).update(
        decided_at=timezone.now() - timedelta(seconds=settings.QUEUED_RUN_TIMEOUT + 60)
    )
    orphans.fail_orphans()
    request.refresh_from_db()
    assert request.status == "failed"
    assert request.runs.get().error.startswith("approved 61 minutes ago and never run (QUEUED_RUN_TIMEOUT)")
    assert run_request(request.pk) == f"request #{request.pk} is failed: not run"


def test_a_dead_pitrs_directory_made_again_by_a_dba_is_left_as_it_is(server, tmp_path):
    datadir = tmp_path / "again"
    datadir.mkdir()
    dead = RestoreRun.begin(RestoreRun.Kind.PITR, "alice", server=server, into_datadir=str(datadir))
    left = {"datadir": str(datadir), "created": True, "inode": datadir.stat().st_ino}
    RestoreRun.objects.filter(pk=dead.pk).update(left=left, heartbeat_at=timezone.now() - timedelta(minutes=5),
                                                 host="restore-host")  # fmt: skip
    assert orphans.fail_orphans() == [dead]  # judged from here: its directory is the other host's
    datadir.rename(tmp_path / "moved")  # kept, so the directory made again cannot reuse its inode
    datadir.mkdir()
    (datadir / "PG_VERSION").write_text("15\n")  # the DBA's next restore there
    RestoreRun.objects.filter(pk=dead.pk).update(host=orphans.HOST)  # the sweep on its own host
    orphans.remove_leftovers()
    dead.refresh_from_db()
    assert (datadir / "PG_VERSION").exists() and dead.left == {}


def test_a_dead_pitrs_incremental_chain_scratch_is_removed_and_nothing_a_link_in_it_names(server, tmp_path):
    datadir, outside = tmp_path / "copy", tmp_path / "keep"
    outside.mkdir()
    (outside / "file").write_text("not the restore's")
    chain = tmp_path / ".copy.chain-0a1b2c"  # as pitr_chain.scratch_for names it
    (chain / "run-7" / "base").mkdir(parents=True)
    (chain / "run-7" / "base" / "1").write_bytes(b"x" * 8192)
    (chain / "run-7" / "elsewhere").symlink_to(outside)
    dead = RestoreRun.begin(RestoreRun.Kind.PITR, "alice", server=server, into_datadir=str(datadir))
    RestoreRun.objects.filter(pk=dead.pk).update(
        status="failed", host=orphans.HOST, left={"datadir": str(datadir), "created": True, "chain": str(chain)}
    )  # killed while the chain was extracted: no data directory yet
    orphans.remove_leftovers()
    dead.refresh_from_db()
    assert not chain.exists() and dead.left == {}
    assert (outside / "file").read_text() == "not the restore's"


def test_a_restore_test_whose_worker_died_fails_and_its_scratch_copy_is_dropped(server, sample_cluster, settings):
    test = RestoreTest.objects.create(server=server, phase="checking", pid=dead_pid(), host=orphans.HOST)
    sample_cluster.execute("CREATE DATABASE restoretest_9_20261205")
    RestoreRun.objects.create(
        kind="logical", status="succeeded", server=server, into_server=server,
        into_database="restoretest_9_20261205", restore_test=test,
    )  # fmt: skip
    assert orphans.fail_orphans() == [test]
    test.refresh_from_db()
    assert test.status == "failed" and test.error.startswith("interrupted: the process running it")
    assert test.checks == [{"name": "restore", "ok": False, "detail": test.error}]
    assert "restoretest_9_20261205" not in databases(sample_cluster)
    assert RestoreTest.objects.failing(server) == [test]  # the monitor alerts it as any failed test

    # One a DBA asked for that no worker took in QUEUED_RUN_TIMEOUT.
    queued = RestoreTest.objects.create(server=server, phase="queued")
    assert orphans.fail_orphans() == []
    RestoreTest.objects.filter(pk=queued.pk).update(
        started_at=timezone.now() - timedelta(seconds=settings.QUEUED_RUN_TIMEOUT + 60)
    )
    assert orphans.fail_orphans() == [queued]
    queued.refresh_from_db()
    assert "never started: is the restore worker (manage.py qcluster) running?" in queued.error
    # Its task, taken by a worker at last, runs nothing: its row is failed already.
    assert run_restore_test(server, test=queued).status == "failed"
    assert not queued.restores.exists()


def test_a_base_restore_test_that_died_after_its_restore_has_its_cluster_removed(server, tmp_path):
    throwaway = tmp_path / "restoretest-1-x" / "data"
    throwaway.mkdir(parents=True)
    (throwaway / "PG_VERSION").write_text("15\n")
    test = RestoreTest.objects.create(server=server, kind="base", phase="checking", pid=dead_pid(), host=orphans.HOST)
    RestoreRun.objects.create(
        kind="pitr", status="succeeded", server=server, into_datadir=str(throwaway), restore_test=test,
        host=orphans.HOST,
    )  # fmt: skip
    assert orphans.fail_orphans() == [test]
    assert not throwaway.exists()


def test_a_restore_test_records_its_worker_and_a_finished_one_is_never_swept(server, passphrase_file, backup_root):
    assert run_command("backup", "maldives")["status"] == "succeeded"
    test = run_restore_test(server)
    assert test.status == "passed" and test.pid == os.getpid() and test.host == orphans.HOST
    restore = test.restores.get()
    assert restore.pid == os.getpid() and restore.left == {}
    RestoreTest.objects.filter(pk=test.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    assert orphans.fail_orphans() == []


def test_the_monitor_pass_runs_the_sweep(server):
    from watching.monitor import evaluate

    restore = RestoreRun.begin(RestoreRun.Kind.LOGICAL, "alice", server=server, into_server=server)
    RestoreRun.objects.filter(pk=restore.pk).update(pid=dead_pid())
    errors, ran = evaluate()
    assert "interrupted restores" in ran and errors == []
    restore.refresh_from_db()
    assert restore.status == "failed" and restore.error.endswith("it had made nothing yet")
    assert json.dumps(restore.left) == "{}"
