"""Re-encryption: kept artifacts moved from an old key to the current one (manage.py reencrypt).

Each copy is streamed where it lies: read (its sha256 checked as it streams), decrypted by gpg
with the old key into a pipe, encrypted by another gpg with the current key into a new object
beside it (KEY with the new key's id in its name). The plaintext is only ever in that pipe.
The new object is read back and its sha256 compared before the catalog points at it; only then
is the old object removed (remove_replaced), and until it is, the copy keeps it catalogued
with its key (old_key, old_encryption_key), so the old key stays in the keyring.

Only the gpg layer changes: what pg_dump or zstd compressed stays as it was, so a restore reads
the copy as before. WAL copies get the current key's WAL data key (backups.walkeys).

Resumable: a copy is done once its catalog row names the current key; running again continues
with the rest, and removes old objects an interrupted run left behind.

The portal's own backups (selfbackups) are not re-encrypted: their signed `.json` names the
file's sha256, which a new ciphertext changes. A fresh selfbackup is taken with the current key
instead (the catalog as it is now, which is what a restore wants), then the files of those made
with the old key are removed from every location (by version on S3): a leaked key then opens
none. One an Object Lock holds stays, with its key in the keyring, until the lock expires.
"""

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from backupportal import journal
from backupportal.lib import signing
from backups import keyring, manifests, selfbackup, walkeys
from backups.crypto import Encryption, EncryptionError, PipeSource, gpg_failure
from backups.models import BackupCopy, BackupRun, EncryptionKey, PortalBackup, Server, StorageLocation
from backups.pipeline import BackupFailed, encrypt_bytes
from backups.storage import StorageError, store_for
from backups.streams import CopyCorrupt, EncryptFailed, Source, encrypt_into, open_copy

CHUNK = 1024 * 1024
TAG = re.compile(r"\.k[0-9a-f]{16}(?=\.gpg$)|\.k[0-9a-f]{16}$")


class ReencryptError(Exception):
    """The command cannot start: the message says why and what to do."""


@dataclass
class Outcome:
    key_id: str
    to_key: str
    reencrypted: list = field(default_factory=list)  # copy ids
    wal_manifests: int = 0  # WAL passes' manifests moved (not catalogued: found by listing)
    removed: int = 0  # old objects removed
    waiting: list = field(default_factory=list)  # copy ids whose old object could not be removed yet
    failed: list = field(default_factory=list)  # {"copy", "error"}
    skipped_bad: list = field(default_factory=list)  # copies found bad before: nothing to read
    under_way: list = field(default_factory=list)  # runs still writing with the old key: not moved
    wal_writing: bool = False  # a WAL ingest still writes segments with the old key (keyring.writing)
    selfbackup: int | None = None  # the fresh selfbackup taken with the new key
    selfbackups_removed: list = field(default_factory=list)  # PortalBackup ids made with the old key
    selfbackups_locked: list = field(default_factory=list)  # ... whose files an Object Lock still holds

    @property
    def left(self):
        """Copies still encrypted with the old key that this run could not move."""
        return len(self.failed) + len(self.skipped_bad) + len(self.under_way) + self.wal_writing

    def as_dict(self):
        return {
            "from_key": self.key_id,
            "to_key": self.to_key,
            "reencrypted": len(self.reencrypted),
            "wal_manifests": self.wal_manifests,
            "old_removed": self.removed,
            "old_waiting": len(self.waiting),
            "failed": self.failed,
            "skipped_bad": self.skipped_bad,
            "under_way": self.under_way,
            "wal_writing": self.wal_writing,
            "selfbackup": self.selfbackup,
            "selfbackups_removed": self.selfbackups_removed,
            "selfbackups_locked": self.selfbackups_locked,
            "status": "failed" if self.left else "succeeded",
        }


def reencrypt(from_key_id, actor):
    """Re-encrypt every kept copy made with `from_key_id` to the current key. Returns an Outcome."""
    key = EncryptionKey.objects.filter(pk=from_key_id).first()
    if key is None:
        raise ReencryptError(f"no key {from_key_id} in the catalog: the key custody page (/keys/) lists the key ids")
    if key.dropped_at is not None:
        raise ReencryptError(f"key {key.pk} left the keyring on {key.dropped_at:%Y-%m-%d}: no kept artifact needs it")
    try:
        new = keyring.current(actor)
        old = Encryption.of_key(key.pk)
    except EncryptionError as e:
        raise ReencryptError(str(e)) from None
    if new.custody_key == key.pk:
        raise ReencryptError(f"key {key.pk} is the current key: rotate first (manage.py rotatekey), then re-encrypt")
    outcome = Outcome(key.pk, new.custody_key)
    for copy in _replaced(key):  # left by an earlier, interrupted run
        if _removed(copy, outcome, actor):
            outcome.removed += 1
    for copy in _to_move(key):
        if copy.status == BackupCopy.Status.BAD:
            outcome.skipped_bad.append(copy.pk)
            continue
        if not copy.location.enabled:
            error = f"location {copy.location.name} is disabled: enable it, then run reencrypt again"
            outcome.failed.append({"copy": copy.pk, "error": error})
            continue
        if copy.old_key and not _removed(copy, outcome, actor):
            continue  # an object already replaced once must go before the next
        try:
            reencrypt_copy(copy, old, new)
        except (StorageError, OSError, EncryptFailed, EncryptionError, walkeys.WalKeyError) as e:
            outcome.failed.append({"copy": copy.pk, "error": str(e)})
            journal.record(
                "reencrypt_failed", actor=actor, obj=copy, outcome="failed", key_id=key.pk, error=str(e)[:500]
            )
            continue
        outcome.reencrypted.append(copy.pk)
        copy.refresh_from_db()
        if _removed(copy, outcome, actor):
            outcome.removed += 1
    move_wal_manifests(old, new, outcome, actor)
    # A backup that took the old key before the rotation catalogues its copies at its end: this
    # run could not move them, and must not say the key is done with (a probe's finding).
    outcome.under_way = list(keyring.runs_writing_with(key).values_list("pk", flat=True))
    outcome.wal_writing = keyring.held_by_a_writer(key.pk)  # its batch is catalogued on the old key
    renew_selfbackups(key, outcome, actor)
    journal.record(
        "reencrypt_run", actor=actor, obj=key, outcome="failed" if outcome.left else "ok", **outcome.as_dict()
    )
    return outcome


def renew_selfbackups(key, outcome, actor):
    """A fresh selfbackup with the current key, then the files of those made with `key` removed
    (see the module's docstring). Run again, it only retries what is left."""
    if not PortalBackup.objects.with_files().filter(encryption_key=key).exists():
        return
    fresh = selfbackup.take(actor)
    if fresh.status != PortalBackup.Status.SUCCEEDED:
        outcome.failed.append({"copy": None, "error": f"a fresh selfbackup could not be taken: {fresh.error}"})
        return
    outcome.selfbackup = fresh.pk
    for old in PortalBackup.objects.with_files().filter(encryption_key=key).order_by("pk"):
        if old.locked_until and old.locked_until > timezone.now():
            outcome.selfbackups_locked.append(old.pk)  # S3 would refuse: tried once the lock expires
        elif not selfbackup.remove(old, actor, why=f"reencrypt from key {key.pk}"):
            error = f"the files of portal backup #{old.pk} could not all be removed: run reencrypt again"
            outcome.failed.append({"copy": None, "error": error})
        elif old.locked_until:
            outcome.selfbackups_locked.append(old.pk)
        else:
            outcome.selfbackups_removed.append(old.pk)


def move_wal_manifests(old, new, outcome, actor):
    """The WAL passes' manifests `old` encrypted, on every location, to `new` (with their notes).

    They are not catalogued (one per pass, found by listing SERVER/wal/manifests/), so which key
    wrote one is learnt by trying `old` on it; those of the other keys are left as they are."""
    for location in StorageLocation.objects.filter(enabled=True):
        store = store_for(location)
        for server in Server.objects.values_list("name", flat=True):
            try:
                listed = [k for k in store.list(f"{server}/wal/manifests/") if k.endswith(manifests.SUFFIX)]
            except StorageError as e:
                outcome.failed.append({"copy": None, "error": f"{location.name}: cannot list WAL manifests: {e}"})
                continue
            for key in listed:
                try:
                    moved = move_wal_manifest(store, key, old, new)
                except (StorageError, OSError, EncryptFailed, signing.SigningError) as e:
                    outcome.failed.append({"copy": None, "error": f"{location.name}: {key}: {e}"})
                    journal.record(
                        "reencrypt_failed", actor=actor, outcome="failed", key_id=old.custody_key, error=str(e)[:500]
                    )
                    continue
                outcome.wal_manifests += moved


def move_wal_manifest(store, key, old, new):
    """1 when `old` opened the manifest at `key` and it now lies, under `new`, beside its note; else 0."""
    with store.open(key) as f:
        data = f.read()
    try:
        plain = manifests.decrypt(data, old, key)
    except manifests.ManifestRefused:
        return 0  # another key's
    target = retagged(key, new.custody_key)
    if store.exists(target):
        store.delete(target)  # left by an interrupted run: written again from the old one
    try:
        size, sha256 = encrypt_bytes(store, target, plain, new)
    except BackupFailed as e:
        raise EncryptFailed(str(e)) from None
    _read_back(store, target, (size, sha256))
    manifests.write_note(store, key, target, size, sha256, new.custody_key, "")
    version, until = newest_version(store, key)
    if until is None or until <= timezone.now():
        store.delete(key, version)  # held by a lock, it stays: the note leads a rebuild past it
    return 1


def _to_move(key):
    """Kept copies made with `key`, of artifacts the catalog still keeps."""
    kept = Q(run__deleted_at=None, wal_segment=None) | Q(run=None, wal_segment__deleted_at=None)
    copies = BackupCopy.objects.kept().filter(kept, encryption_key=key)
    return list(copies.select_related("location", "run", "wal_segment__server").order_by("pk"))


def _replaced(key):
    return list(BackupCopy.objects.filter(old_encryption_key=key).exclude(old_key="").select_related("location"))


def reencrypt_copy(copy, old, new):
    """One copy from `old` to `new` (Encryptions of the keyring), verified; the catalog then
    names the new object, and keeps the old one as old_key until remove_replaced()."""
    store = store_for(copy.location)
    target = retagged(copy.key, new.custody_key)
    reading, writing = old, new
    if copy.wal_segment_id:
        if copy.key_id:
            reading = old.with_data_key(copy.key_id, walkeys.unwrap(copy.key_id, old, copy))
        writing = walkeys.writing(new, copy.wal_segment.server, [copy.location])
    reader = open_copy(copy)
    try:
        size, sha256 = encrypt_into(store, target, Decrypted(reader, reading), writing)
    finally:
        reader.close()
    _read_back(store, target, (size, sha256))
    try:
        # Before the catalog moves: the manifests still name the old object, and a rebuilt
        # catalog finds the new one only through this note.
        manifests.write_note(store, copy.key, target, size, sha256, new.custody_key, writing.key_id)
    except (signing.SigningError, StorageError, OSError) as e:
        store.delete(target)
        raise EncryptFailed(
            f"the re-encryption note of {target} cannot be written ({e}): the old copy is kept"
        ) from None
    version_id, retain_until = newest_version(store, target)
    with transaction.atomic():
        BackupCopy.objects.filter(pk=copy.pk, key=copy.key, encryption_key=copy.encryption_key_id).update(
            old_key=copy.key,
            old_encryption_key=copy.encryption_key_id,
            key=target,
            size=size,
            sha256=sha256,
            encryption_key=new.custody_key,
            key_id=writing.key_id,
            verified_at=timezone.now(),
            # Reads and deletes of an S3 copy go by its version (S3 Object Lock): the new object's.
            version_id=version_id,
            retain_until=retain_until,
        )
        # Copies to other locations not made yet copy this one: they get what it now is.
        owner = {"run": copy.run_id} if copy.run_id else {"wal_segment": copy.wal_segment_id}
        BackupCopy.objects.filter(
            status__in=[BackupCopy.Status.PENDING, BackupCopy.Status.FAILED], artifact=copy.artifact, **owner
        ).update(key=target, size=size, encryption_key=new.custody_key, key_id=writing.key_id)
        if copy.run_id:
            _rename_in_run(copy.run, copy.key, target)


def _rename_in_run(run, old, new):
    run = BackupRun.objects.select_for_update().get(pk=run.pk)
    run.details["keys"] = [new if k == old else k for k in run.details.get("keys", [])]
    run.key = new if run.key == old else run.key
    run.save(update_fields=["key", "details"])


def _removed(copy, outcome, actor):
    """remove_replaced(); a copy whose old object stays (a lock, a location away) is waiting."""
    try:
        if remove_replaced(copy):
            return True
    except (StorageError, OSError) as e:
        error = f"the old object {copy.old_key} is kept for now: {e}"
        journal.record("reencrypt_failed", actor=actor, obj=copy, outcome="failed", error=error[:500])
    if copy.pk not in outcome.waiting:
        outcome.waiting.append(copy.pk)
    return False


def remove_replaced(copy):
    """Remove the object a re-encryption replaced (copy.old_key); True when it is gone.

    The one place such an object is deleted. A version S3 Object Lock still holds stays
    catalogued, with its key (kept in the keyring), until its retain-until: False until then.
    """
    store = store_for(copy.location)
    version, until = newest_version(store, copy.old_key)
    if until is not None and until > timezone.now():
        return False
    # As retention removes a copy: a NAS unmounted now must not have its old object (still
    # readable with the old key when the NAS is back) forgotten, and the key dropped.
    store.remove_copy(copy.old_key, version)
    BackupCopy.objects.filter(pk=copy.pk, old_key=copy.old_key).update(old_key="", old_encryption_key=None)
    copy.old_key, copy.old_encryption_key = "", None
    return True


def newest_version(store, key):
    """(version id, retain-until) of the newest version of `key` on an S3 location; ("", None)
    on a directory, or where the bucket keeps no versions."""
    version = store.surviving_version(key)
    if not version or version == "null":
        return "", None
    return version, store.lock_of(key, version)["retain_until"]


def retagged(key, key_id):
    """The object key of a copy re-encrypted with `key_id`: its key with the key id in its name."""
    bare = TAG.sub("", key)
    return f"{bare[:-4]}.k{key_id}.gpg" if bare.endswith(".gpg") else f"{bare}.k{key_id}"


def _read_back(store, target, written):
    """The new object must read back as it was written, or it is removed (the old one is kept,
    and this one fails)."""
    if _hash_of(store, target) != written:
        store.delete(target)
        raise EncryptFailed(f"the new object {target} does not read back as written: the old one is kept")


def _hash_of(store, key):
    digest, size = hashlib.sha256(), 0
    f = store.open(key)
    try:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    finally:
        f.close()
    return size, digest.hexdigest()


class Decrypted(Source):
    """What encrypt_into() reads: a copy decrypted by gpg into a pipe, which the encrypting gpg
    reads itself. Plaintext passes through neither Python nor the disk."""

    name = "the old copy"

    def __init__(self, reader, encryption):
        super().__init__()
        self.reader, self.encryption = reader, encryption
        read_end, self.write_end = os.pipe()
        self.stream = PipeSource(os.fdopen(read_end, "rb"))
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._decrypt, daemon=True)

    def open(self):
        self.thread.start()
        return self.stream

    def _decrypt(self):
        try:
            self.result = self.encryption.decrypt_to_fd(self.reader, self.write_end)
        except Exception as e:  # noqa: BLE001 - reported by check(), in encrypt_into's order
            self.error = e
        finally:
            os.close(self.write_end)

    def finish(self):
        self.thread.join()

    def check(self):
        corrupt = self.error if isinstance(self.error, CopyCorrupt) else self.reader.corrupt()
        if corrupt is not None:
            raise EncryptFailed(f"the old copy is corrupt ({corrupt}): run manage.py verify")
        if self.error is not None:
            raise EncryptFailed(f"decrypting the old copy failed: {self.error}")
        if not self.result.ok:
            raise EncryptFailed(f"decrypting the old copy failed: {gpg_failure(self.result)}")
