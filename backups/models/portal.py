"""The portal's own database (catalog and journal) as a backup: what `manage.py selfbackup` made.

A row is written once the backup is over (succeeded or failed), never while it runs: the
backup then holds no half-done row of itself, and a restored portal's catalog is the one the
backup saw. The copies are listed on the row (location, key, sha256), each location also
holding a `.sha256` file beside the backup, so that a fresh host checks it before restoring.
"""

from datetime import timedelta

from django.db import models
from django.template.defaultfilters import filesizeformat
from django.utils import timezone


class PortalBackupQuerySet(models.QuerySet):
    def good(self):
        return self.filter(status=PortalBackup.Status.SUCCEEDED, deleted_at=None)

    def with_files(self):
        """Succeeded selfbackups whose files are still somewhere: kept, or removed but locked."""
        kept = models.Q(deleted_at=None) | models.Q(locked_until__isnull=False)
        return self.filter(kept, status=PortalBackup.Status.SUCCEEDED)

    def newest_good(self):
        """The newest succeeded selfbackup with a copy left that the weekly verify has not found
        bad: one whose every copy is corrupt or missing is nothing to restore from."""
        for row in self.good().order_by("-finished_at", "-pk").iterator():
            if row.good_copies:
                return row
        return None


class PortalBackup(models.Model):
    class Status(models.TextChoices):
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    status = models.CharField(max_length=9, choices=Status.choices)
    requested_by = models.CharField(max_length=150, blank=True, help_text="user, or job:<name>")
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(default=timezone.now)
    engine = models.CharField(max_length=10, help_text="sqlite or postgresql: what restores it")
    key = models.CharField(max_length=500, blank=True, help_text="the file's path relative to each location")
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, verbose_name="SHA-256")
    encryption = models.CharField(max_length=16, blank=True)
    # Key custody: the keyring's key that encrypted it (what reencrypt and drop_unneeded count).
    encryption_key = models.ForeignKey(
        "backups.EncryptionKey", null=True, blank=True, on_delete=models.PROTECT, related_name="portal_backups"
    )
    # The journal as the backup holds it: a restored portal's journal ends at this entry.
    journal_entry = models.BigIntegerField(null=True, blank=True)
    journal_count = models.BigIntegerField(null=True, blank=True)
    copies = models.JSONField(default=list, blank=True, help_text="[{location, uri, sha256, status, error}]")
    error = models.TextField(blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True, help_text="set when the files were removed (kept count)")
    # Removed, but S3 Object Lock still holds a copy's files until then: its key stays in the
    # keyring, and the removal is tried again once the lock has expired (selfbackup.remove_old).
    locked_until = models.DateTimeField(null=True, blank=True)

    objects = PortalBackupQuerySet.as_manager()

    class Meta:
        ordering = ["-finished_at"]
        verbose_name = "portal backup"
        indexes = [
            # Used by the monitor's and the dashboard's newest good selfbackup.
            models.Index(fields=["status", "-finished_at"], name="portal_backup_newest"),
        ]

    def __str__(self):
        when = timezone.localtime(self.finished_at).strftime("%Y-%m-%d %H:%M")
        size = f", {filesizeformat(self.size)}" if self.size else ""
        return f"portal backup #{self.pk} {when}{size} ({self.status})"

    @property
    def good_copies(self):
        return [c for c in self.copies if c.get("status") == "ok"]

    def age(self, now=None) -> timedelta:
        return (now or timezone.now()) - self.finished_at
