"""Copies: one file of a run, or one WAL segment, in one storage location, with its own sha256."""

from django.db import models
from django.utils import timezone

from backups.models.locations import StorageLocation
from backups.models.runs import BackupRun
from backups.models.walsegments import WalSegment


class BackupCopyQuerySet(models.QuerySet):
    def kept(self):
        """Copies the portal keeps in their location, good or found bad: they take its space."""
        return self.filter(status__in=[BackupCopy.Status.OK, BackupCopy.Status.BAD])


class BackupCopy(models.Model):
    """One file of a run (or one WAL segment) in one storage location, with its own sha256."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        COPYING = "copying", "Copying"
        OK = "ok", "OK"
        FAILED = "failed", "Failed"
        BAD = "bad", "Bad (checksum or missing)"
        DELETED = "deleted", "Deleted"

    run = models.ForeignKey(BackupRun, null=True, blank=True, on_delete=models.CASCADE, related_name="copies")
    wal_segment = models.ForeignKey(
        WalSegment, null=True, blank=True, on_delete=models.CASCADE, related_name="copies", verbose_name="WAL segment"
    )
    location = models.ForeignKey(StorageLocation, on_delete=models.PROTECT, related_name="copies")
    artifact = models.CharField(max_length=16, default="main", help_text="main, globals, manifest or wal")
    key = models.CharField(max_length=500, help_text="path relative to the location, or the object key")
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, verbose_name="SHA-256")
    status = models.CharField(max_length=7, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    copied_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    # A WAL copy since the WAL data key (backups.walkeys): the key that encrypts it ("" = the
    # passphrase or the recipients themselves, as before) and what compressed it before gpg
    # ("" = gpg's own compression, which `gpg --decrypt` undoes). Readers choose by these, never by guessing.
    key_id = models.CharField(max_length=32, blank=True, db_default="", verbose_name="WAL key id")
    compression = models.CharField(max_length=8, blank=True, db_default="")
    # The keyring's key that encrypted it (a WAL copy: the key that wraps its data key); null for
    # copies from before the keyring, which the configured passphrase or recipients decrypt.
    encryption_key = models.ForeignKey(
        "backups.EncryptionKey", null=True, blank=True, on_delete=models.PROTECT, related_name="copies"
    )
    # Re-encryption (backups.reencrypt) wrote the artifact anew under `key`; the object it replaced
    # stays catalogued here, with its key, until it is removed (an Object Lock may forbid that for now).
    old_key = models.CharField(
        max_length=500, blank=True, db_default="", help_text="object replaced by re-encryption, not yet removed"
    )
    old_encryption_key = models.ForeignKey(
        "backups.EncryptionKey", null=True, blank=True, on_delete=models.PROTECT, related_name="replaced_copies"
    )

    # On a location with Object Lock (StorageLocation.lock_mode): the S3 version this copy is, and
    # the date its lock (read back from S3 after the upload) holds it until. Reads, verify and
    # deletes go by version: a delete by key alone only hides the object behind a delete marker.
    version_id = models.CharField("S3 version id", max_length=1024, blank=True, default="", db_default="")
    retain_until = models.DateTimeField("locked until", null=True, blank=True)

    objects = BackupCopyQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "backup copies"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["run", "location", "artifact"], name="one_copy_per_run_location_artifact"),
            models.UniqueConstraint(fields=["wal_segment", "location"], name="one_copy_per_segment_location"),
            models.CheckConstraint(
                condition=models.Q(run__isnull=False) | models.Q(wal_segment__isnull=False), name="copy_of_something"
            ),
        ]
        indexes = [
            # Used by the copy worker: what is left to copy or retry.
            models.Index(
                fields=["next_attempt_at"], name="copy_todo", condition=models.Q(status__in=["pending", "failed"])
            ),
            models.Index(fields=["location", "status"], name="copy_location_status"),
            # Used by the copies catalog filtered by status (the bad ones, wherever they are).
            models.Index(fields=["status"], name="copy_status"),
        ]

    def __str__(self):
        return f"{self.location}:{self.key} ({self.status})"

    def locked_at(self, now) -> bool:
        """Does its lock still forbid deleting it at `now` (as the catalog knows it)?"""
        return self.retain_until is not None and self.retain_until > now

    @classmethod
    def record_made(cls, location, key, size, sha256, version_id="", retain_until=None, **of):
        """The copy a run or an ingest just wrote and hashed (of: run=, or wal_segment=; artifact=)."""
        made = cls.made(location, key, size, sha256, version_id, retain_until, **of)
        made.save(force_insert=True)
        return made

    @classmethod
    def made(cls, location, key, size, sha256, version_id="", retain_until=None, **of):
        """record_made's row, not saved yet (the WAL ingest saves a batch of them at once)."""
        return cls(
            location=location,
            key=key,
            size=size,
            sha256=sha256,
            status=cls.Status.OK,
            copied_at=timezone.now(),
            attempts=1,
            version_id=version_id or "",
            retain_until=retain_until,
            **of,
        )
