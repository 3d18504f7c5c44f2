"""Copies of artifacts to the other tiers (NAS, S3), each with its own state and sha256.

A copy never fails or blocks the backup it copies: its failure is on the copy row.
"""

import hashlib

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


def delete_run_artifacts(run, actor):
    """Delete every copy of a run from every location, then mark the run deleted. Journaled."""
    for copy in run.copies.exclude(status=BackupCopy.Status.DELETED).select_related("location"):
        store_for(copy.location).delete(copy.key)
        copy.status = BackupCopy.Status.DELETED
        copy.save(update_fields=["status"])
        journal.record(
            "copy_deleted", actor=actor, obj=copy, server=run.server.name, location=copy.location.name, key=copy.key
        )
    run.deleted_at = timezone.now()
    run.save(update_fields=["deleted_at"])
    journal.record(
        "backup_deleted", actor=actor, obj=run, kind=run.kind, age_days=(run.deleted_at - run.finished_at).days
    )


class CopyCorrupt(StorageError):
    """A copy's bytes do not hash to its catalogued sha256."""

    def __init__(self, copy, actual):
        self.copy = copy
        super().__init__(
            f"copy {copy.location.name}:{copy.key} is corrupt: sha256 {actual[:12]} differs from the catalogued {copy.sha256[:12]}"
        )

    def mark_bad(self):
        self.copy.status, self.copy.last_error = BackupCopy.Status.BAD, str(self)[:2000]
        self.copy.save(update_fields=["status", "last_error"])
        journal.record("copy_corrupt", actor="job:restore", obj=self.copy, outcome="failed", error=str(self))


class VerifyingReader:
    """Reads a copy and checks its sha256 at the end: a restore never trusts a file it has not hashed."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n=-1):
        chunk = self.stream.read(n)
        if chunk:
            self.sha256.update(chunk)
            self.size += len(chunk)
        elif self.sha256.hexdigest() != self.copy.sha256:
            # Raised in whatever thread reads (gpg's feeder): the caller marks the copy bad.
            raise CopyCorrupt(self.copy, self.sha256.hexdigest())
        return chunk

    def corrupt(self):
        """After a failed read: a CopyCorrupt if the rest of the file does not match its hash, else None."""
        try:  # read (and hash) what the consumer left unread
            while self.read(CHUNK):
                pass
        except CopyCorrupt as e:
            return e
        return None

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def healthy_copies(run, artifact="main"):
    """The run's good copies of one artifact, in restore order: primary, NAS, S3."""
    copies = run.copies.filter(artifact=artifact, status=BackupCopy.Status.OK).select_related("location")
    return sorted(copies, key=lambda c: c.location.read_order)


def open_first_healthy(run, artifact="main"):
    """(reader, copy, notes): the first copy that opens, verifying sha256 as it is read."""
    notes = []
    for copy in healthy_copies(run, artifact):
        try:
            stream = store_for(copy.location).open(copy.key)
        except (OSError, StorageError) as e:
            copy.status, copy.last_error = BackupCopy.Status.BAD, str(e)[:2000]
            copy.save(update_fields=["status", "last_error"])
            notes.append(f"{copy.location.name} copy unreadable ({e}); tried the next")
            continue
        return VerifyingReader(stream, copy), copy, notes
    raise StorageError(
        f"no healthy copy of run #{run.pk} ({artifact}) in any location: " + ("; ".join(notes) or "none catalogued")
    )
