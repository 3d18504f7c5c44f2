"""Retention of base backups and archived WAL, on every tier.

Base backups are kept `base_retention_days` (30), the newest always. WAL is kept
`wal_retention_days` (7), but never a segment that a kept base backup needs to become
consistent, nor one on the way from the base backup that reaches the start of the window
to now: any moment of the window stays recoverable. History files are tiny and kept.
"""

from datetime import datetime, timedelta

from django.utils import timezone

from backupportal import journal
from backups import wal
from backups.models import BackupCopy, BackupRun, Server, WalSegment
from backups.storage import StorageError, store_for


def apply_wal_and_base_retention(now=None, dry_run=False, actor="job:retention"):
    """Delete what retention allows for every server. Returns what was (or would be) deleted."""
    now = now or timezone.now()
    report = {"dry_run": dry_run, "servers": {}}
    for server in Server.objects.all():
        report["servers"][server.name] = server_retention(server, now, dry_run, actor)
    return report


def stop_time(run):
    stamp = run.details.get("stop_time")
    return datetime.fromisoformat(stamp) if stamp else run.finished_at


def doomed_base_backups(server, now):
    """Base backups past retention, except the newest and the one that anchors the WAL window."""
    bases = list(server.runs.good().filter(kind=BackupRun.Kind.BASE).order_by("-finished_at"))
    cutoff = now - timedelta(days=server.base_retention_days)
    anchor = window_anchor(bases, now - timedelta(days=server.wal_retention_days))
    return [b for b in bases[1:] if b.finished_at < cutoff and b != anchor], bases


def window_anchor(bases, window_start):
    """The newest base backup consistent before the window starts: PITR to that moment starts there."""
    before = [b for b in bases if stop_time(b) <= window_start]
    return max(before, key=stop_time) if before else None


def doomed_segments(server, kept_bases, now):
    """Segments older than the window that no kept base backup needs."""
    size = server.wal_segment_size
    window_start = now - timedelta(days=server.wal_retention_days)
    with_wal = [b for b in kept_bases if b.start_wal and size]
    anchor = window_anchor(with_wal, window_start) or (min(with_wal, key=stop_time) if with_wal else None)
    keep_from = wal.segno_of(anchor.start_wal, size) if anchor else None
    ranges = [(wal.segno_of(b.start_wal, size), wal.segno_of(b.end_wal, size)) for b in with_wal]
    doomed = []
    old = WalSegment.objects.filter(server=server, deleted_at=None, archived_at__lt=window_start).order_by("name")
    for segment in old.only("id", "name", "segno"):
        if segment.name.endswith(".history"):
            continue
        segno = segment.segno if segment.segno is not None else (wal.segno_of(segment.name, size) if size else None)
        if segno is None:
            continue  # the segment size is unknown yet: nothing can be proven unneeded
        if keep_from is not None and segno >= keep_from:
            continue
        if any(start <= segno <= end for start, end in ranges):
            continue
        doomed.append(segment)
    return doomed, anchor


def server_retention(server, now, dry_run, actor):
    doomed_bases, bases = doomed_base_backups(server, now)
    kept = [b for b in bases if b not in doomed_bases]
    segments, anchor = doomed_segments(server, kept, now)
    result = {
        "base_deleted": [b.pk for b in doomed_bases],
        "wal_deleted": len(segments),
        "wal_first_deleted": segments[0].name if segments else None,
        "wal_last_deleted": segments[-1].name if segments else None,
        "wal_kept_from": anchor.start_wal if anchor else None,
    }
    if dry_run:
        return result
    for run in doomed_bases:
        if not delete_copies(run.copies.exclude(status=BackupCopy.Status.DELETED)):
            continue
        BackupRun.objects.filter(pk=run.pk).update(deleted_at=now)
        journal.record(
            "backup_deleted",
            actor=actor,
            obj=run,
            reason=f"older than {server.base_retention_days} days",
            finished_at=run.finished_at,
        )
    if segments:
        gone = [s.pk for s in segments if delete_copies(s.copies.exclude(status=BackupCopy.Status.DELETED))]
        WalSegment.objects.filter(pk__in=gone).update(deleted_at=now)
        for segment in segments:
            (wal.spool_dir(server) / "ingested" / segment.name).unlink(missing_ok=True)
        journal.record(
            "wal_deleted",
            actor=actor,
            obj=server,
            count=len(segments),
            first=result["wal_first_deleted"],
            last=result["wal_last_deleted"],
            kept_from=result["wal_kept_from"],
            reason=f"older than {server.wal_retention_days} days and needed by no kept base backup",
        )
    return result


def delete_copies(copies):
    """Delete each copy's file or object on its tier. False when a tier failed: retried next time."""
    all_gone = True
    for copy in copies.select_related("location"):
        try:
            store_for(copy.location).delete(copy.key)
        except (OSError, StorageError) as e:
            BackupCopy.objects.filter(pk=copy.pk).update(last_error=f"retention could not delete it: {e}"[:2000])
            all_gone = False
            continue
        BackupCopy.objects.filter(pk=copy.pk).update(status=BackupCopy.Status.DELETED)
    return all_gone
