"""Faults against real processes: base backups killed or cut off, the protected server stopped
mid-backup, two workers on one occurrence, the portal's database down while WAL is archived,
and a flipped byte in a base backup.

Every test ends with the same five checks: the catalog tells the truth (the run failed, with
a clear message), nothing that looks like a good artifact is bad (no final-named file without
a good catalog row, no partial left), no orphaned child process, the next scheduled run
succeeds, and nothing already archived is lost.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from backupportal.models import Alert
from backups import wal
from backups.models import BackupCopy, BackupRun, WalSegment
from backups.tasks import scheduled_job
from backups.verify import verify_all
from tests.conftest import child_named, descendants, manage, register

from .walhelpers import enable_push, switch_wal, wait_archived, wait_for

pytest_plugins = ["tests.walfixtures"]
pytestmark = pytest.mark.django_db(transaction=True)  # manage.py and workers are other processes
DB = "reliabilitymaldives"


# --- The five checks. ---------------------------------------------------------------------


def assert_failed_clearly(run_id, *phrases):
    """The catalog tells the truth: failed, with a one-line reason, journaled and alerted."""
    run = BackupRun.objects.get(pk=run_id)
    assert run.status == BackupRun.Status.FAILED, run.status
    assert run.finished_at is not None and "\n" not in run.error
    for phrase in phrases:
        assert phrase in run.error, run.error
    alert = Alert.objects.get(condition="backup_failed", state="open")
    assert f"#{run.pk}" in alert.message
    assert not run.copies.exclude(status=BackupCopy.Status.DELETED).exists()
    return run


def assert_nothing_good_looking_is_bad(root):
    """Every file under the location is a copy the catalog calls good; nothing partial is left."""
    good = set()
    for copy in BackupCopy.objects.filter(status=BackupCopy.Status.OK).select_related("location", "run", "wal_segment"):
        owner_good = copy.run.is_good if copy.run_id else copy.wal_segment.deleted_at is None
        if owner_good and copy.location.kind != "s3":
            good.add(Path(copy.location.path) / copy.key)
    files = {p for p in Path(root).rglob("*") if p.is_file()}
    assert files <= good, f"files the catalog does not call good: {sorted(files - good)}"


def assert_no_orphans(pids, timeout=10):
    wait_for(lambda: not [p for p in pids if alive(p)], timeout, f"processes {pids} to die")


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_next_scheduled_run_succeeds(kind):
    """What the worker runs for the next occurrence of the schedule."""
    occurrence = f"2031-01-01T02:{time.time_ns() % 60:02d}:00+05:00"
    assert scheduled_job("maldives", kind, scheduled_for=occurrence) == "succeeded", BackupRun.objects.latest(
        "created_at"
    ).error
    run = BackupRun.objects.get(details__scheduled_for=occurrence)
    path = Path(run.copies.get(artifact="main").location.path) / run.key
    assert path.is_file() and run.sha256 == sha256_file(path)
    return run


def assert_nothing_archived_is_lost(server, archived):
    """Every segment and backup archived before the fault still reads back with its sha256, and no gap."""
    present = set(WalSegment.objects.filter(server=server, deleted_at=None).values_list("name", flat=True))
    assert set(archived) <= present
    result = verify_all()
    assert result["bad"] == 0 and result["unreachable"] == 0, result
    first, last = (wal.segno_of(n, server.wal_segment_size) for n in (min(archived), max(archived)))
    assert wal.missing_segments(server, first, last) == []


def sha256_file(path):
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- Helpers. ------------------------------------------------------------------------------


def streaming(kind):
    return BackupRun.objects.filter(kind=kind, status="running", bytes_done__gt=0).first()


def archive_some(cluster, server, count=3):
    """A few archived and ingested segments: what must survive the fault."""
    names = []
    for i in range(count):
        cluster.execute(f"CREATE TABLE IF NOT EXISTS before_{i}(x int)", dbname=DB)
        names.append(switch_wal(cluster))
    wait_archived(cluster, names[-1], timeout=60)
    wal.ingest(server)
    assert set(names) <= set(WalSegment.objects.values_list("name", flat=True))
    return names


def start_backup(settings, kind, tool):
    """`manage.py backup` in its own process, once `tool` streams into the primary location."""
    proc = manage(settings, "backup", "maldives", "--kind", kind, "--json")
    pid = wait_for(lambda: child_named(proc.pid, tool), timeout=60, what=f"{tool} to start")
    wait_for(lambda: streaming(kind), timeout=60, what="bytes to stream")
    return proc, pid


def json_result(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def big_server(big_cluster, passphrase_file, backup_root, wal_spool):
    """The ~110 MB cluster, registered and archiving by push into this test's spool."""
    server = register(big_cluster)
    enable_push(big_cluster)
    server.refresh_from_db()
    yield server
    if not big_cluster.is_running():
        big_cluster.start()


# --- 1. SIGKILL of pg_basebackup mid base backup. -------------------------------------------


def test_sigkill_of_pg_basebackup_mid_stream_fails_the_run_and_loses_nothing(big_server, big_cluster, settings):
    archived = archive_some(big_cluster, big_server)
    proc, pg_basebackup = start_backup(settings, "base", "pg_basebackup")
    tree = descendants(proc.pid)
    os.kill(pg_basebackup, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 1 and "pg_basebackup was killed by SIGKILL" in err
    assert_failed_clearly(json_result(out)["id"], "pg_basebackup was killed by SIGKILL", "nothing of this run is kept")
    assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    assert_no_orphans(tree)
    # The server let go of the aborted backup: no base backup is in progress there.
    wait_for(lambda: not big_cluster.execute("SELECT 1 FROM pg_stat_progress_basebackup"), what="the walsender to end")
    assert_next_scheduled_run_succeeds("base")
    assert_nothing_archived_is_lost(big_server, archived)


# --- 2. The protected database stopped mid-backup. -------------------------------------------


@pytest.mark.parametrize(
    "kind, tool",
    [("logical", "pg_dump"), ("base", "pg_basebackup")],
)
def test_the_database_stopped_mid_backup_fails_the_run_and_the_next_one_succeeds(
    big_server, big_cluster, settings, kind, tool
):
    archived = archive_some(big_cluster, big_server)
    proc, _ = start_backup(settings, kind, tool)
    tree = descendants(proc.pid)
    big_cluster.stop("fast")  # pg_ctl stop -m fast, as an operator (or a failover script) does
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 1, err
    assert_failed_clearly(json_result(out)["id"], f"{tool}: 127.0.0.1:{big_cluster.port} closed the connection mid-way")
    assert "was PostgreSQL stopped or restarted?" in err
    assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    assert_no_orphans(tree)
    big_cluster.start()
    assert_next_scheduled_run_succeeds(kind)
    assert_nothing_archived_is_lost(big_server, archived)
