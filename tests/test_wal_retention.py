"""Retention of base backups and WAL against a real archive: nothing a kept base backup needs goes."""

from datetime import timedelta
from pathlib import Path

from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups import retention, walchain, walingest, walnames
from backups.models import BackupCopy, BackupRun, WalSegment
from tests.helpers import enable_push, rows, run_command, switch_wal, wait_archived

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"


def archive_tables(cluster, *names):
    for name in names:
        cluster.execute(f"CREATE TABLE {name}(x int)", dbname=DB)
        last = switch_wal(cluster)
    wait_archived(cluster, last)


def call_command_json(*args):
    result = run_command(*args)
    assert result["_exit"] == 0, result
    return result


def age(run, days, now):
    """Make a run look `days` old in the catalog (and the WAL it needs with it)."""
    when = now - timedelta(days=days)
    run.finished_at = when
    run.details.update(stop_time=when.isoformat(), stop_time_portal=when.isoformat())
    run.save(update_fields=["finished_at", "details"])


def files(segments):
    return [Path(c.location.path) / c.key for s in segments for c in s.copies.all()]


def test_retention_keeps_every_segment_a_kept_base_backup_or_the_window_needs(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    server.retention_floor = 1  # days alone: the floor has its own tests (test_gfs)
    server.save(update_fields=["retention_floor"])
    enable_push(sample_cluster)
    old = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    archive_tables(sample_cluster, "a1", "a2", "a3")
    new = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    archive_tables(sample_cluster, "b1", "b2")
    walingest.ingest(server)
    server.refresh_from_db()
    size, now = server.wal_segment_size, timezone.now()
    old_range = range(walnames.segno_of(old.start_wal, size), walnames.segno_of(old.end_wal, size) + 1)
    new_start = walnames.segno_of(new.start_wal, size)
    between = WalSegment.objects.filter(segno__gt=old_range[-1], segno__lt=new_start)
    assert between.exists()

    # Base backups of 20 and 9 days ago; the WAL before the newer one was archived 15 days ago.
    age(old, 20, now)
    age(new, 9, now)
    WalSegment.objects.filter(segno__lt=new_start).update(archived_at=now - timedelta(days=15))
    WalSegment.objects.filter(name__endswith=".backup").update(archived_at=now - timedelta(days=15))

    # The window (7 days) starts after the newer backup: only the WAL between the two goes,
    # and the older backup (kept 30 days) keeps the segments it needs to be consistent.
    doomed = list(between.order_by("segno"))
    dry = retention.apply_wal_and_base_retention(now=now, dry_run=True)
    assert dry["wal"]["maldives"]["deleted"] >= len(doomed) and dry["deleted"] == []
    assert WalSegment.objects.filter(deleted_at__isnull=False).count() == 0 and all(f.exists() for f in files(doomed))

    done = retention.apply_wal_and_base_retention(now=now)
    assert done == {**dry, "dry_run": False}
    assert all(s.deleted_at for s in WalSegment.objects.filter(pk__in=[s.pk for s in doomed]))
    assert not any(f.exists() for f in files(doomed))
    assert not BackupCopy.objects.filter(wal_segment__in=doomed).exclude(status="deleted").exists()
    kept = WalSegment.objects.filter(segno__isnull=False, deleted_at=None)
    assert set(old_range) <= set(kept.values_list("segno", flat=True))
    assert walchain.missing_segments(server, new_start, walchain.last_segno(server)) == []
    assert JournalEntry.objects.filter(action="wal_deleted").count() == 1

    # Base backups kept 15 days: the older one goes, and with it the WAL only it needed.
    server.base_retention_days = 15
    server.save(update_fields=["base_retention_days"])
    done = call_command_json("retention")
    assert [d["id"] for d in done["deleted"]] == [old.pk] and done["wal"]["maldives"]["deleted"] > 0
    old.refresh_from_db()
    assert old.deleted_at and not (Path(backup_root) / old.key).exists()
    assert not WalSegment.objects.filter(segno__in=list(old_range), deleted_at=None, segno__isnull=False).exists()
    # The newest base backup is never deleted, whatever its age.
    server.base_retention_days = 1
    server.save(update_fields=["base_retention_days"])
    assert retention.apply_wal_and_base_retention(now=now)["deleted"] == []

    # What is left still restores: the newer base backup and its WAL to now.
    port = free_port()
    result = run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(restored()), "--port", str(port)
    )
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT count(*) FROM b2") == [(0,)]


def test_a_kept_block_incremental_keeps_the_wal_it_needs_to_become_consistent(db):
    """Its WAL, from its start to its end, as for a kept base backup: an incremental kept 14 days
    while WAL is kept 7 would otherwise restore to nothing."""
    from backups.models import Server

    size = 16 * 1024 * 1024
    server = Server.objects.create(
        name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres", pg_version=180006,
        wal_segment_size=size, incremental_retention_days=14,
    )  # fmt: skip
    now = timezone.now()

    def backup(kind, days_ago, start, end, parent=None):
        when = now - timedelta(days=days_ago)
        details = {"stop_time": when.isoformat(), "wal_segment_size": size}
        if parent is not None:
            details |= {"method": "block", "parent": parent.pk}
        start_wal, end_wal = (walnames.segment_name(1, n, size) for n in (start, end))
        return BackupRun.objects.create(
            server=server, kind=kind, status="succeeded", finished_at=when, start_wal=start_wal, end_wal=end_wal,
            details=details,
        )  # fmt: skip

    full = backup("base", 20, 10, 11)
    link = backup("incremental", 10, 30, 31, parent=full)  # kept 14 days, its full as its chain
    backup("base", 9, 40, 41)
    for n in range(10, 60):
        WalSegment.objects.create(
            server=server, timeline=1, name=walnames.segment_name(1, n, size), segno=n, size=size, sha256="c" * 64,
            archived_at=now - timedelta(days=20 - (n - 10) * 0.3), key=f"k{n}",
        )  # fmt: skip
    kept = retention.plan(server, now)
    assert kept[next(r for r in kept if r.pk == link.pk)] and kept[next(r for r in kept if r.pk == full.pk)]
    retention.wal_retention(server, now, dry_run=False, actor="test")
    gone = set(WalSegment.objects.filter(server=server).exclude(deleted_at=None).values_list("segno", flat=True))
    assert gone and not {10, 11, 30, 31} & gone


def test_a_server_clock_behind_the_portals_never_makes_a_base_inside_the_window_its_anchor(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    """A base backup's stop_time is the server's clock; the window's start is the portal's. A base
    taken 6 days ago by a server 2 days behind reads 8 days old: compared with the window's start (7
    days ago) it anchored the window, the older base went and the WAL from it with it, and the
    window's first day could be restored from no base."""
    server.retention_floor, server.base_retention_days = 1, 15
    server.save(update_fields=["retention_floor", "base_retention_days"])
    enable_push(sample_cluster)
    old = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    archive_tables(sample_cluster, "a1", "a2", "a3")
    new = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    archive_tables(sample_cluster, "b1", "b2")
    walingest.ingest(server)
    server.refresh_from_db()
    size, now = server.wal_segment_size, timezone.now()
    age(old, 20, now)
    age(new, 6, now)
    new.details["stop_time"] = (now - timedelta(days=8)).isoformat()  # the server's clock, 2 days behind
    new.save(update_fields=["details"])
    new_start = walnames.segno_of(new.start_wal, size)
    WalSegment.objects.filter(segno__lt=new_start).update(archived_at=now - timedelta(days=10))
    WalSegment.objects.filter(name__endswith=".backup").update(archived_at=now - timedelta(days=10))

    kept = {run.pk: rule for run, rule in retention.plan(server, now).items()}
    assert kept[old.pk] == "start of the WAL window", kept
    done = retention.apply_wal_and_base_retention(now=now)
    assert done["deleted"] == [] and done["wal"]["maldives"]["kept_from"] == old.start_wal, done
    first = walnames.segno_of(old.start_wal, size)
    assert walchain.missing_segments(server, first, walchain.last_segno(server)) == []
