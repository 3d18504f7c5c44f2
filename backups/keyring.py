"""Key custody: the keyring of every key that encrypted a kept artifact, and key rotation.

The keyring directory (KEYRING_DIR, 0700) holds one 0600 file per key, named by its random key
id: KEYID.passphrase (the passphrase itself) or KEYID.recipients (the recipients' key ids).
The catalog (EncryptionKey) says which key is current; every copy names the key that encrypted
it, and readers pick the key by that id (Encryption.for_copy), so a rotated key's backups keep
restoring while its file is in the keyring.

The configured key (BACKUP_PASSPHRASE_FILE or GPG_RECIPIENTS) is set up in the keyring on first
use. From then on `manage.py rotatekey` changes the current key. The configuration must still
name a key the keyring knows (the first, or any rotated in): a passphrase file changed behind
the portal's back is refused by name instead of being used, or silently ignored.
"""

import fcntl
import hmac
import os
import secrets
from contextlib import contextmanager

from django.db import IntegrityError, transaction
from django.utils import timezone

from backupportal import journal
from backupportal.lib.privatefile import write_private
from backups.crypto import Encryption, EncryptionError, KeyMissing, keyring_dir
from backups.models import BackupCopy, BackupRun, EncryptionKey

_of_key = {}  # key id -> Encryption, for this process: a key id's file never changes


def current(actor="job:backup") -> Encryption:
    """The Encryption new artifacts are written with, its `custody_key` their key id: the
    keyring's current key, set up from the settings on first use. Raises EncryptionError."""
    configured = Encryption()  # the settings are still checked: a bad file is refused as before
    key = EncryptionKey.objects.filter(current=True).first() or _set_up(configured, actor)
    _check_configured(configured, key)
    if key.pk not in _of_key:
        _of_key[key.pk] = Encryption.of_key(key.pk)
    return _of_key[key.pk]


def _set_up(configured, actor):
    """The configured key as the keyring's first, current key. Copies from before the keyring
    are adopted by it: they were encrypted with the configuration of their day, this one."""
    key = _new_key(configured, actor)
    try:
        with transaction.atomic():
            key.current = True
            key.save()
            BackupCopy.objects.filter(encryption_key=None).update(encryption_key=key)
    except IntegrityError:  # another worker set one up a moment before: that one is current
        return EncryptionKey.objects.get(current=True)
    journal.record("key_set_up", actor=actor, obj=key, key_id=key.pk, kind=key.kind, recipients=key.recipient_list)
    return key


def _new_key(encryption, actor):
    """An unsaved EncryptionKey with a random id, its secret (or recipients) written to the keyring."""
    key_id = secrets.token_hex(8)
    if encryption.recipients:
        key = EncryptionKey(
            key_id=key_id, kind=EncryptionKey.Kind.RECIPIENTS, recipients="\n".join(encryption.recipients)
        )
        write_private(keyring_dir() / f"{key_id}.recipients", (key.recipients + "\n").encode())
    else:
        if not encryption.passphrase.isascii():
            # python-gnupg gives gpg a passphrase in Latin-1, stock gpg --passphrase-file the file's
            # UTF-8: the two would derive different keys. Keys made before stay as they were.
            raise EncryptionError(
                "the passphrase holds characters beyond ASCII, which gpg's tools do not read alike: "
                "choose a passphrase of ASCII characters (a long random one: openssl rand -base64 32)"
            )
        key = EncryptionKey(key_id=key_id, kind=EncryptionKey.Kind.PASSPHRASE)
        write_private(keyring_dir() / f"{key_id}.passphrase", (encryption.passphrase + "\n").encode())
    key.created_by = actor
    return key


def _check_configured(configured, key):
    """The configuration must name a key of the keyring, or nothing changes silently."""
    if any(_same(configured, known) for known in EncryptionKey.objects.in_keyring().order_by("-created_at")):
        return
    held = keyring_dir() / f"{key.pk}.{'recipients' if key.kind == key.Kind.RECIPIENTS else 'passphrase'}"
    if not held.is_file():  # not a changed configuration: the keyring lost its file (a probe's finding)
        raise EncryptionError(
            f"the current encryption key {key.pk} is not in the keyring {keyring_dir()}: put {held.name} back there "
            "(mode 0600) from your key escrow; rotating instead would leave its backups with no key to read them"
        )
    setting = "GPG_RECIPIENTS" if configured.recipients else "BACKUP_PASSPHRASE_FILE"
    raise EncryptionError(
        f"{setting} names a key the keyring does not hold (current key {key.pk}): "
        f"switch to it with manage.py rotatekey, or set {setting} back"
    )


def _same(encryption, key):
    """Whether `encryption` (from the settings or a command) is the keyring's `key`."""
    if encryption.recipients:
        return key.kind == key.Kind.RECIPIENTS and sorted(encryption.recipients) == sorted(key.recipient_list)
    if key.kind != key.Kind.PASSPHRASE:
        return False
    try:
        held = (keyring_dir() / f"{key.pk}.passphrase").read_text().strip("\r\n")
    except OSError:
        return False
    return hmac.compare_digest(held.encode(), encryption.passphrase.encode())


def rotate(passphrase_file=None, recipients=None, actor="") -> EncryptionKey:
    """Make a new key current (new backups use it); the old one stays in the keyring, retired."""
    new = Encryption(passphrase_file=passphrase_file or "", recipients=recipients or [])
    old = EncryptionKey.objects.filter(current=True).first()
    if old is None:
        old = _set_up(Encryption(), actor)
    if _same(new, old):
        raise EncryptionError(f"that is already the current key {old.pk}: give a new passphrase file or recipients")
    key = _new_key(new, actor)
    try:
        with transaction.atomic():
            EncryptionKey.objects.filter(pk=old.pk, current=True).update(current=False, retired_at=timezone.now())
            key.current = True
            key.save()
    except IntegrityError:
        raise EncryptionError(
            "another rotation made a key current at the same moment: check /keys/, then run again"
        ) from None
    journal.record("key_rotated", actor=actor, obj=key, key_id=key.pk, kind=key.kind, retired=old.pk)
    return key


def require_keys(copies, what):
    """KeyMissing (naming the key id) unless the keyring holds the key of one of `copies`."""
    missing, configured = None, Encryption()
    for copy in copies:
        try:
            configured.for_copy(copy)
            return
        except KeyMissing as e:
            missing = e
    if missing is not None:
        raise KeyMissing(f"{what}: {missing}")


def runs_writing_with(key):
    """The backups still under way that encrypt with `key`: they took it before a rotation, and
    catalogue their copies only at their end. Dropped now, the key would leave them with nothing
    to decrypt them (a probe's finding). A run records its key id before any byte."""
    unfinished = [BackupRun.Status.QUEUED, BackupRun.Status.RUNNING]
    return BackupRun.objects.filter(status__in=unfinished, details__key_id=key.pk)


@contextmanager
def writing(actor):
    """The current key (as current()), which stays in the keyring until the block ends. For a
    writer that catalogues what it wrote only later, and is no BackupRun (runs_writing_with): a
    WAL ingest's batch, which may last minutes on a backlog. A rotation, a re-encryption and
    the key drop in that time took the key its segments were written with out of the keyring,
    leaving WAL no PITR could read (a probe's finding). The writer holds the key's lock file
    shared; drop_unneeded must hold it exclusively."""
    for _ in range(3):
        encryption = current(actor)
        fd = _key_lock(encryption.custody_key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # Dropped between current() and the lock: the key was retired meanwhile, and the
            # current one is another; a key still in the keyring now stays while this holds it.
            if EncryptionKey.objects.in_keyring().filter(pk=encryption.custody_key).exists():
                yield encryption
                return
        finally:
            os.close(fd)
    raise EncryptionError("the current key changed three times while a writer took it: run again")


def held_by_a_writer(key_id):
    """Whether a writer (writing) holds `key_id` now: what it writes will still be on that key."""
    fd = _key_lock(key_id)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _key_lock(key_id):
    return os.open(keyring_dir() / f"{key_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def drop_unneeded(dry_run=False, actor="job:retention"):
    """Retired keys that no kept artifact needs any more leave the keyring. Returns their ids.
    A key a writer holds (writing) stays, and is dropped by a later run."""
    dropped = []
    for key in EncryptionKey.objects.in_keyring().filter(current=False).order_by("created_at"):
        fd = _key_lock(key.pk)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer uses it now: what it writes will name the key
            # Under the lock: a writer that held it has catalogued what it wrote.
            if key.artifacts().exists() or runs_writing_with(key).exists():
                continue
            dropped.append(key.pk)
            if not dry_run:
                _drop(key, actor)
        finally:
            os.close(fd)
    return dropped


def _drop(key, actor):
    for suffix in ("passphrase", "recipients", "lock"):
        (keyring_dir() / f"{key.pk}.{suffix}").unlink(missing_ok=True)
    EncryptionKey.objects.filter(pk=key.pk).update(dropped_at=timezone.now())
    journal.record("key_dropped", actor=actor, obj=key, key_id=key.pk, kind=key.kind)
