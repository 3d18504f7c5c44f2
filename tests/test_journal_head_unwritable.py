"""A backup run whose journal head file cannot be written (remounted read-only, a full disk).

Found by a probe: the run was left 'running' with a traceback until the orphan sweep when the
head could not be written as it started; as it ended, the run was marked succeeded first and
then the journal failed. The journal is what auditors trust: a run the journal could not
record as a success must not be shown good.
"""

import io
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command

from backupportal.lib.osuser import is_root
from backupportal.models import JournalEntry
from backups.models import BackupCopy, BackupRun


@pytest.fixture
def head_on_own_mount(settings, tmp_path):
    """The head file on a small file system of its own, which the test can remount read-only:
    root ignores file modes, not a read-only mount. Returns a function that does so."""
    place = tmp_path / "journal"
    place.mkdir()
    if not is_root() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(place)]).returncode:
        pytest.skip("mounting a small file system needs root and CAP_SYS_ADMIN")
    settings.JOURNAL_HEAD_FILE = place / "journal.head"

    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)

    yield read_only
    subprocess.run(["umount", "-l", str(place)], check=True)


def backup():
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit):
        call_command("backup", "maldives", "--kind", "logical", stdout=out, stderr=err)
    return BackupRun.objects.latest("pk"), err.getvalue()


def expected_line(settings):
    return (
        f"the journal's head file {settings.JOURNAL_HEAD_FILE} (JOURNAL_HEAD_FILE) cannot be written "
        "(Read-only file system): free space on it or make its directory writable (remount read-write, "
        "chattr -i), then run the backup again"
    )


def assert_failed_and_nothing_kept(run, settings, good):
    assert run.status == BackupRun.Status.FAILED and run.error == expected_line(settings), run.error
    assert not run.copies.filter(status=BackupCopy.Status.OK).exists()
    files = sorted(p.relative_to(settings.BACKUP_ROOT) for p in Path(settings.BACKUP_ROOT).rglob("*") if p.is_file())
    assert files == sorted(Path(k) for k in good.details["keys"])  # the good run's only
    assert not JournalEntry.objects.filter(action="backup_succeeded", object_id=str(run.pk)).exists()
    assert JournalEntry.objects.filter(action="backup_failed", object_id=str(run.pk)).exists()


def good_backup():
    """One good backup first: the database is known (discovering it is journaled) and the head file exists."""
    call_command("backup", "maldives", "--kind", "logical", stdout=io.StringIO())
    return BackupRun.objects.get(status=BackupRun.Status.SUCCEEDED)


@pytest.mark.django_db(transaction=True)
def test_a_head_file_that_cannot_be_written_at_the_start_fails_the_run_at_once(
    server, passphrase_file, backup_root, settings, head_on_own_mount
):
    good = good_backup()
    head_on_own_mount()
    run, stderr = backup()
    assert_failed_and_nothing_kept(run, settings, good)
    assert stderr.strip().endswith(expected_line(settings)) and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.django_db(transaction=True)
def test_a_head_file_that_cannot_be_written_at_the_end_fails_the_run_and_never_journals_it_good(
    server, passphrase_file, backup_root, settings, head_on_own_mount, sample_cluster
):
    """The mount turns read-only while the backup waits for a table's lock, after its start was journaled."""
    good = good_backup()
    holder = psycopg.connect(sample_cluster.dsn("reliabilitymaldives"))
    holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    released = threading.Thread(target=release_when_waited_for, args=(sample_cluster, holder, head_on_own_mount))
    released.start()
    try:
        run, stderr = backup()
    finally:
        released.join()
    assert JournalEntry.objects.filter(action="backup_started", object_id=str(run.pk)).exists()
    assert_failed_and_nothing_kept(run, settings, good)


def release_when_waited_for(cluster, holder, read_only):
    """Once the backup waits for the lock `holder` holds: the head's mount read-only, then the lock let go."""
    try:
        with psycopg.connect(cluster.dsn("reliabilitymaldives"), autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if watcher.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
                    break
                time.sleep(0.05)
        read_only()
    finally:
        holder.rollback()
        holder.close()
