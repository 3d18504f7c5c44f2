"""A WAL location the ingest cannot write (read-only to the unprivileged worker), on a real
cluster archiving by push: one line, the spool kept, the alert open, and no gap once it is writable."""

import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

from backups import walchain, walnames, walspool
from backups.models import WalSegment
from tests.helpers import (
    UNPRIVILEGED,
    catalog_files,
    enable_push,
    lent_to,
    manage_as,
    switch_wal,
    wait_archived,
    worker_home,
)
from watching.models import Alert
from watching.monitor import check_wal

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"


def share_spool_with(user, spool):
    """What the install does for the service user (a member of postgres's group): here the spool's
    group becomes the user's own, postgres keeps owning it, and ingested/ is the user's."""
    entry = pwd.getpwnam(user)
    for folder in (spool, spool / "errors"):
        os.chown(folder, -1, entry.pw_gid)
        folder.chmod(0o2770)
    os.chown(spool / "ingested", entry.pw_uid, entry.pw_gid)


def archive_segments(cluster, count):
    names = []
    for i in range(count):
        cluster.execute(f"CREATE TABLE IF NOT EXISTS ro{i}(x int)", dbname=DB)
        names.append(switch_wal(cluster))
    wait_archived(cluster, names[-1])
    return names


def spooled(spool):
    return sorted(n for n in os.listdir(spool) if walnames.SEGMENT.match(n))


def ingest_task_as(user, settings, home):
    """The every-minute schedule's function (backups.tasks.ingest_wal), run by the same worker user."""
    code = "import json; from backups.tasks import ingest_wal; print(json.dumps(ingest_wal('maldives')))"
    return manage_as(user, settings, home, "shell", "-c", code)


@pytest.mark.django_db(transaction=True)
def test_ingest_into_a_read_only_wal_location_keeps_the_spool_alerts_and_catches_up_without_gap(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    enable_push(sample_cluster)
    spool = walspool.spool_dir(server)
    share_spool_with(UNPRIVILEGED, spool)
    backup_root.chmod(0o755)
    wal_root = Path(settings.WAL_ROOT)
    wal_root.mkdir(mode=0o755)  # root's: readable, not writable, by the worker
    first = archive_segments(sample_cluster, 3)
    home = worker_home(settings, passphrase_file, UNPRIVILEGED)
    try:
        with lent_to(UNPRIVILEGED, *catalog_files()):
            refused = manage_as(UNPRIVILEGED, settings, home, "ingestwal", "maldives", "--json")
            assert spooled(spool) == first, refused.stderr  # nothing taken out of the spool
            marker = json.loads((spool / "errors" / "ingest.json").read_text())
            findings = check_wal(server)  # the monitor's minute
            catalogued = WalSegment.objects.filter(server=server).count()
            written = [p for p in wal_root.rglob("*") if p.is_file()]
            # WAL keeps arriving while the location refuses; the scheduled task fails the same way.
            later = archive_segments(sample_cluster, 2)
            task = ingest_task_as(UNPRIVILEGED, settings, home)
            still = check_wal(server)
            alert = Alert.objects.get(condition="archive_failing", server=server)
            with lent_to(UNPRIVILEGED, wal_root):  # the location made writable again
                done = manage_as(UNPRIVILEGED, settings, home, "ingestwal", "maldives", "--json")
                after = check_wal(server)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.strip().splitlines()  # no traceback
    assert "Traceback" not in refused.stderr and "PermissionError" not in refused.stderr
    assert f"location wal ({wal_root}) is not writable by the OS user {UNPRIVILEGED}" in line, line
    assert "make it writable by that user" in line and f"{first[0]} and the WAL after it wait in {spool}" in line
    assert marker["reason"] == "ingest_failed" and marker["message"].startswith(f"WAL of {server} cannot be ingested: ")
    assert f"not writable by the OS user {UNPRIVILEGED}" in findings["archive_failing"]
    assert catalogued == 0 and written == []  # not even a partial file

    assert task.returncode == 0 and "Traceback" not in task.stderr, task.stderr
    assert f"not writable by the OS user {UNPRIVILEGED}" in json.loads(task.stdout.strip().splitlines()[-1])["error"]
    assert "archive_failing" in still
    assert alert.state == "open" and f"not writable by the OS user {UNPRIVILEGED}" in alert.message

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])["servers"]["maldives"]
    names = set(WalSegment.objects.filter(server=server).values_list("name", flat=True))
    assert set(first + later) <= names and result["ingested"] == len(names)
    server.refresh_from_db()
    first_no, last_no = (walnames.segno_of(n, server.wal_segment_size) for n in (first[0], later[-1]))
    assert walchain.missing_segments(server, first_no, last_no) == []
    assert spooled(spool) == [] and not (spool / "errors" / "ingest.json").exists()
    assert "archive_failing" not in after
    assert Alert.objects.get(condition="archive_failing", server=server).state == "resolved"
