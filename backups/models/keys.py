"""Encryption keys: which key encrypted each artifact, so that a rotated key's backups still restore.

A key is a passphrase or a list of GPG recipients, named by a random key id given when it is set
up or rotated in (never derived from the passphrase: anyone reading the catalog could test
guesses against a hash offline). The secret itself lives only in the keyring directory
(backups.keyring, KEYRING_DIR); the catalog holds the id, the kind, and for recipients their
key ids, which are public.
"""

from django.db import models
from django.db.models import Q
from django.utils import timezone

from backups.models.copies import BackupCopy
from backups.models.portal import PortalBackup


class EncryptionKeyQuerySet(models.QuerySet):
    def in_keyring(self):
        return self.filter(dropped_at=None)


class EncryptionKey(models.Model):
    class Kind(models.TextChoices):
        PASSPHRASE = "passphrase", "Passphrase (symmetric AES-256)"
        RECIPIENTS = "recipients", "GPG recipients (public key)"

    key_id = models.CharField(max_length=16, primary_key=True, verbose_name="key id")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    recipients = models.TextField(blank=True, help_text="the recipients' key ids (public), one per line")
    # Exactly one key is current: what new backups are encrypted with.
    current = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True, help_text="user, or job:<name>")
    retired_at = models.DateTimeField(null=True, blank=True, help_text="when rotatekey replaced it")
    dropped_at = models.DateTimeField(
        null=True, blank=True, help_text="when retention removed it from the keyring (no kept artifact needed it)"
    )

    objects = EncryptionKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["current"], condition=Q(current=True), name="one_current_key")]

    def __str__(self):
        return f"key {self.key_id} ({self.kind})"

    @property
    def recipient_list(self):
        return self.recipients.split()

    def artifacts(self):
        """What needs this key: the copies made or still to be made with it, or an old object a
        re-encryption left in place (an Object Lock may keep it) that is still catalogued; and the
        portal's own backups (selfbackups) encrypted with it whose files are still somewhere."""
        live = BackupCopy.objects.exclude(status=BackupCopy.Status.DELETED)
        copies = live.filter(Q(encryption_key=self) | Q(old_encryption_key=self, old_key__gt=""))
        return KeyArtifacts(copies, PortalBackup.objects.with_files().filter(encryption_key=self))


class KeyArtifacts:
    """A key's artifacts, of two models: the copies (a BackupCopy queryset, which the custody
    page counts per artifact through values()) and the selfbackups. exists() and count() cover
    both, so that the keyring never drops a key a kept selfbackup still needs."""

    def __init__(self, copies, selfbackups):
        self.copies, self.selfbackups = copies, selfbackups

    def exists(self):
        return self.copies.exists() or self.selfbackups.exists()

    def count(self):
        return self.copies.count() + self.selfbackups.count()

    def values(self, *fields):
        return self.copies.values(*fields)
