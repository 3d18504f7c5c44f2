"""Retention against the locations themselves: what it deletes is gone, what it cannot delete is
retried, never claimed deleted (catalog rows and real files; no cluster)."""

import shutil
from datetime import timedelta
from pathlib import Path

from django.utils import timezone

from backups import copies, retention, walnames
from backups.models import BackupCopy, BackupRun, Server, StorageLocation, WalSegment


def make_server(**fields):
    return Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres", **fields)


def logical(server, when):
    return BackupRun.objects.create(
        server=server, kind="logical", status="succeeded", started_at=when, finished_at=when
    )


def with_copy(run, location, key):
    path = Path(location.path) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"dump")
    return BackupCopy.objects.create(run=run, location=location, key=key, size=4, sha256="a" * 64, status="ok")


def test_a_copy_on_a_nas_unmounted_for_maintenance_is_retried_not_claimed_deleted(db, backup_root, nas_root):
    """Found by a probe: the NAS's mount point was there, empty; its copy's file was not, so the
    deletion 'succeeded' and the copy was marked deleted; the file came back with the mount and
    nothing would ever delete it. The deletion waits for the NAS, then happens."""
    primary = StorageLocation.objects.get(name="primary")
    mount = nas_root / "nas1"
    mount.mkdir()
    nas = StorageLocation.objects.create(name="nas1", kind="nas", path=str(mount))
    server = make_server(retention_floor=1)
    now = timezone.now()
    old = logical(server, now - timedelta(days=40))
    logical(server, now - timedelta(days=1))
    on_primary, on_nas = with_copy(old, primary, "maldives/old.dump"), with_copy(old, nas, "maldives/old.dump")

    away = nas_root / "nas1.away"
    mount.rename(away)  # unmounted: the empty mount point stays
    mount.mkdir()
    retention.apply(now)
    on_primary.refresh_from_db(), on_nas.refresh_from_db()
    assert on_primary.status == BackupCopy.Status.DELETED and not (backup_root / "maldives/old.dump").exists()
    assert on_nas.status != BackupCopy.Status.DELETED, "claimed deleted while the NAS was away"
    assert "is empty or missing (an unmounted NAS?)" in on_nas.last_error

    shutil.rmtree(mount)
    away.rename(mount)  # mounted again: the retry deletes it
    copies.retry_deletions(on_nas.next_attempt_at)
    on_nas.refresh_from_db()
    assert on_nas.status == BackupCopy.Status.DELETED and not (mount / "maldives/old.dump").exists()


def test_the_backup_of_a_restore_request_not_yet_run_is_kept(db, backup_root, alice, bob):
    """Found by a probe: an approved request's backup, past its retention, was deleted before the
    worker ran the request, which then failed on it. Kept while a request waits to read it."""
    from restores.models import RestoreRequest

    server = make_server(retention_floor=1, logical_retention_days=30)
    now = timezone.now()
    old = logical(server, now - timedelta(days=31))
    logical(server, now - timedelta(days=1))
    request = RestoreRequest.objects.create(
        server=server, backup_run=old, destination="new_database", target_database="copy_of_31_days_ago",
        into_destination="127.0.0.1:1", reason="audit", requested_by=alice,
        status="approved", decided_by=bob, decided_at=now - timedelta(minutes=1),
    )  # fmt: skip
    assert retention.apply(now) == []
    old.refresh_from_db()
    assert old.deleted_at is None

    request.status = RestoreRequest.Status.SUCCEEDED  # once it has run, retention goes on
    request.save(update_fields=["status"])
    assert [gone["id"] for gone in retention.apply(now)] == [old.pk]


SIZE = 16 << 20


def base(server, when, start, end):
    first, last = (walnames.segment_name(1, n, SIZE) for n in (start, end))
    return BackupRun.objects.create(
        server=server, kind="base", status="succeeded", started_at=when, finished_at=when, start_wal=first,
        end_wal=last, details={"stop_time": when.isoformat(), "wal_segment_size": SIZE}, timeline=1,
    )  # fmt: skip


def test_wal_a_point_in_time_restore_replays_is_not_deleted_under_it(db, backup_root):
    """Found by a probe: a PITR from base B1 to a moment inside the window when it started; the
    window then moved past base B2, and retention deleted the WAL between them that the restore
    was still fetching as recovery asked for it. WAL retention waits for the restore."""
    from restores.models import RestoreRun

    server = make_server(wal_segment_size=SIZE, retention_floor=1)
    now = timezone.now()
    b1 = base(server, now - timedelta(days=9), 10, 11)
    b2_at = now - timedelta(days=7, minutes=30)
    base(server, b2_at, 40, 41)
    span = (b2_at - b1.finished_at) / 30
    for n in range(10, 60):
        WalSegment.objects.create(
            server=server, timeline=1, name=walnames.segment_name(1, n, SIZE), segno=n, size=SIZE, sha256="c" * 64,
            archived_at=b1.finished_at + span * (n - 10), key=f"wal-{n}",
        )  # fmt: skip
    restore = RestoreRun.objects.create(
        kind="pitr", status="running", server=server, backup_run=b1, target=(now - timedelta(days=7, minutes=45)).isoformat(),
        started_at=now - timedelta(hours=1), heartbeat_at=now,
    )  # fmt: skip
    result = retention.wal_retention(server, now, dry_run=False, actor="test")
    assert result["deleted"] == 0 and result["waits"] == "a point-in-time restore of it is running"
    assert not WalSegment.objects.filter(server=server).exclude(deleted_at=None).exists()

    restore.status = "succeeded"  # done: the window's start moves on, past B1's WAL
    restore.save(update_fields=["status"])
    assert retention.wal_retention(server, now, dry_run=False, actor="test")["deleted"] > 0
