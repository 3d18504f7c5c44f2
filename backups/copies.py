"""Copies of artifacts to the other tiers (NAS, S3), each with its own state and sha256.

A copy never fails or blocks the backup it copies: its failure is on the copy row.
"""

from django.utils import timezone

from backupportal import journal
from backups.models import BackupCopy, StorageLocation
from backups.storage import StorageError, store_for

CHUNK = 1024 * 1024


def secondary_locations():
    return StorageLocation.objects.filter(enabled=True).exclude(kind=StorageLocation.Kind.PRIMARY)


def plan_copies(run):
    """One pending copy row per artifact of the run and secondary location."""
    sources = list(run.copies.filter(status=BackupCopy.Status.OK, location__kind=StorageLocation.Kind.PRIMARY))
    for location in secondary_locations():
        for source in sources:
            BackupCopy.objects.get_or_create(
                run=run, location=location, artifact=source.artifact, defaults={"key": source.key, "size": source.size}
            )


def copy_one(copy, journal_it=True):
    """Stream the primary's file to the copy's location, hashing on the way. Returns the copy.

    WAL segments are copies too; their ingest journals them by batch (journal_it=False).
    """
    source = BackupCopy.objects.select_related("location").get(
        run=copy.run,
        wal_segment=copy.wal_segment,
        artifact=copy.artifact,
        location__kind=StorageLocation.Kind.PRIMARY,
        status=BackupCopy.Status.OK,
    )
    server = (copy.run or copy.wal_segment).server.name
    copy.status, copy.attempts = BackupCopy.Status.COPYING, copy.attempts + 1
    copy.save(update_fields=["status", "attempts"])
    try:
        with store_for(source.location).open(source.key) as src, store_for(copy.location).writer(copy.key) as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
            size, sha256 = out.commit()
        if sha256 != source.sha256:
            raise StorageError(f"sha256 of the copy ({sha256[:12]}) differs from the primary's ({source.sha256[:12]})")
    except (OSError, StorageError) as e:
        copy.status, copy.last_error = BackupCopy.Status.FAILED, str(e)[:2000]
        copy.save(update_fields=["status", "last_error"])
        if journal_it:
            journal.record("copy_failed", actor="job:copy", obj=copy, server=server, outcome="failed", error=str(e))
        return copy
    copy.status, copy.size, copy.sha256, copy.copied_at, copy.last_error = (
        BackupCopy.Status.OK,
        size,
        sha256,
        timezone.now(),
        "",
    )
    copy.save(update_fields=["status", "size", "sha256", "copied_at", "last_error"])
    if journal_it:
        journal.record(
            "copy_made", actor="job:copy", obj=copy, server=server, location=copy.location.name, sha256=sha256
        )
    return copy


def copy_run_foreground(run):
    """What `backup` does after the primary: make each copy now and report it."""
    if not run.is_good:
        return []
    plan_copies(run)
    return [
        copy_one(c)
        for c in run.copies.exclude(location__kind=StorageLocation.Kind.PRIMARY).exclude(status=BackupCopy.Status.OK)
    ]
