"""Retention: which backups and WAL have outlived their server's policy, and their deletion on every tier.

Never deleted, whatever its age: the newest good backup of each server and kind (of each
database, for logical backups), a backup that a restore or restore test is reading right now
(it goes on the next pass), a logical run whose globals file a kept run pairs with, and the
base backup from which the WAL window starts.

Block-level incrementals (17+) are kept their server's `incremental_retention_days` (the
strategy's 7), and retention keeps whole chains: an incremental never outlives its ancestors
(a full or an incremental a kept one was taken against stays, whatever its age), and a chain
goes only when its newest link has expired.

WAL is kept `wal_retention_days` (7), but never a segment that a kept base backup needs to
become consistent, nor one on the way from the base backup that reaches the start of the
window to now: any moment of the window stays recoverable. History files are tiny and kept.
"""

from datetime import timedelta
from operator import attrgetter

from django.db.models import Q
from django.utils import timezone

from backupportal import journal
from backups import walnames, walspool
from backups.copies import delete_run_artifacts
from backups.models import BackupCopy, BackupRun, Server, WalSegment
from backups.storage import StorageError, store_for

DAYS_FIELD = {
    BackupRun.Kind.LOGICAL: "logical_retention_days",
    BackupRun.Kind.BASE: "base_retention_days",
    BackupRun.Kind.INCREMENTAL: "incremental_retention_days",
}
KINDS = list(DAYS_FIELD)


def _days(server, kind):
    return getattr(server, DAYS_FIELD[kind])


def _good(server, kind):
    good = server.runs.good().filter(kind=kind)
    # A WAL-chain run (15, 16) has no artifact: nothing to delete.
    return good.filter(details__method="block") if kind == BackupRun.Kind.INCREMENTAL else good


def chain_needs(server, now):
    """Pks of the ancestors (fulls and incrementals) of every block incremental that is kept."""
    links = dict(_good(server, BackupRun.Kind.INCREMENTAL).values_list("pk", "details__parent"))
    cutoff = now - timedelta(days=_days(server, BackupRun.Kind.INCREMENTAL))
    kept = _good(server, BackupRun.Kind.INCREMENTAL).filter(Q(finished_at__gte=cutoff) | _being_read())
    kept = {*kept.values_list("pk", flat=True), *_newest(_good(server, BackupRun.Kind.INCREMENTAL), "incremental")}
    needed = set()
    for pk in kept:
        while links.get(pk) is not None and links[pk] not in needed:
            pk = links[pk]
            needed.add(pk)
    return needed


def expired_runs(server, kind, now=None):
    """Good runs of this server and kind older than its retention, the newest good one excluded:
    of the cluster for a base backup, of each database (a dropped one too) for a logical one;
    never an ancestor of a kept incremental."""
    now = now or timezone.now()
    good = _good(server, kind)
    cutoff = now - timedelta(days=_days(server, kind))
    expired = good.filter(finished_at__lt=cutoff).exclude(pk__in=_newest(good, kind)).exclude(_being_read())
    if kind != BackupRun.Kind.LOGICAL:
        expired = expired.exclude(pk__in=chain_needs(server, now))
    # A run whose globals file a kept run of the same pass pairs with stays, whole, until that one goes.
    expired = expired.exclude(pk__in=BackupRun.objects.globals_in_use())
    if kind == BackupRun.Kind.BASE:
        anchor = window_anchor(list(good), now - timedelta(days=server.wal_retention_days))
        if anchor is not None:
            expired = expired.exclude(pk=anchor.pk)
    return expired.order_by("finished_at")


def _newest(good, kind):
    if kind != BackupRun.Kind.LOGICAL:
        return [pk for pk in [good.order_by("-finished_at").values_list("pk", flat=True).first()] if pk]
    databases = good.order_by().values_list("database", flat=True).distinct()  # no ordering: one row each
    return [good.filter(database=db).order_by("-finished_at").values_list("pk", flat=True)[0] for db in databases]


def _being_read():
    """Runs a restore or restore test is reading now (see restores.models)."""
    return Q(restores__status__in=["queued", "running"]) | Q(restore_tests__status="running")


def apply(now=None, dry_run=False, actor="job:retention"):
    """Delete what has expired. Returns [{"id", "server", "kind", "finished_at"}] of what was (or would be) deleted."""
    deleted = []
    for server in Server.objects.all():
        for kind in KINDS:
            for run in expired_runs(server, kind, now):
                deleted.append(
                    {"id": run.pk, "server": server.name, "kind": kind, "finished_at": run.finished_at.isoformat()}
                )
                if not dry_run:
                    delete_run_artifacts(run, actor)
    return deleted


def apply_wal(now=None, dry_run=False, actor="job:retention"):
    """WAL retention of every server that has archived WAL: {server: what was (or would be) deleted}."""
    now = now or timezone.now()
    servers = Server.objects.filter(pk__in=WalSegment.objects.values("server").distinct())
    return {server.name: wal_retention(server, now, dry_run, actor) for server in servers}


def apply_wal_and_base_retention(now=None, dry_run=False, actor="job:retention"):
    """Backups first (so the WAL only they needed goes with them), then WAL."""
    now = now or timezone.now()
    return {"dry_run": dry_run, "deleted": apply(now, dry_run, actor), "wal": apply_wal(now, dry_run, actor)}


def window_anchor(bases, window_start):
    """The newest base backup consistent before the window starts: PITR to that moment starts there."""
    before = [b for b in bases if b.start_wal and b.stop_time <= window_start]
    return max(before, key=attrgetter("stop_time")) if before else None


def doomed_segments(server, kept_bases, now):
    """Segments older than the window that no kept base backup needs."""
    size = server.wal_segment_size
    window_start = now - timedelta(days=server.wal_retention_days)
    with_wal = [b for b in kept_bases if b.start_wal and size]
    anchor = window_anchor(with_wal, window_start) or (min(with_wal, key=attrgetter("stop_time")) if with_wal else None)
    keep_from = walnames.segno_of(anchor.start_wal, size) if anchor else None
    ranges = [(walnames.segno_of(b.start_wal, size), walnames.segno_of(b.end_wal, size)) for b in with_wal]
    doomed = []
    old = WalSegment.objects.filter(server=server, deleted_at=None, archived_at__lt=window_start).order_by("name")
    for segment in old.only("id", "name", "segno"):
        if segment.name.endswith(".history"):
            continue
        segno = (
            segment.segno if segment.segno is not None else (walnames.segno_of(segment.name, size) if size else None)
        )
        if segno is None:
            continue  # the segment size is unknown yet: nothing can be proven unneeded
        if keep_from is not None and segno >= keep_from:
            continue
        if any(start <= segno <= end for start, end in ranges):
            continue
        doomed.append(segment)
    return doomed, anchor


def wal_retention(server, now, dry_run, actor):
    expired = set(expired_runs(server, BackupRun.Kind.BASE, now).values_list("pk", flat=True))
    kept = [b for b in server.runs.good().filter(kind=BackupRun.Kind.BASE) if b.pk not in expired]
    segments, anchor = doomed_segments(server, kept, now)
    result = {
        "deleted": len(segments),
        "first_deleted": segments[0].name if segments else None,
        "last_deleted": segments[-1].name if segments else None,
        "kept_from": anchor.start_wal if anchor else None,
    }
    if dry_run or not segments:
        return result
    gone = [s.pk for s in segments if delete_copies(s.copies.exclude(status=BackupCopy.Status.DELETED))]
    WalSegment.objects.filter(pk__in=gone).update(deleted_at=now)
    for segment in segments:
        (walspool.spool_dir(server) / "ingested" / segment.name).unlink(missing_ok=True)
    journal.record(
        "wal_deleted",
        actor=actor,
        obj=server,
        count=len(gone),
        first=result["first_deleted"],
        last=result["last_deleted"],
        kept_from=result["kept_from"],
        reason=f"older than {server.wal_retention_days} days and needed by no kept base backup",
    )
    return result


def delete_copies(copies):
    """Delete each copy's file or object on its tier. False when a tier failed: retried next time.

    WAL is journaled by batch (wal_deleted), not one entry per segment and tier.
    """
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
