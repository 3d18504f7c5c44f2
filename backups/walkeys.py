"""The WAL data key: what encrypts WAL segments, so that ingest pays no key derivation per segment.

gpg's iterated key derivation (the strategy's s2k-mode 3) costs ~0.2 s of CPU per gpg process
whatever its count; at one gpg per segment it capped ingest at ~8 segments/s. So the portal
makes, once per passphrase, a data key: 32 random bytes (as 64 hex digits, a gpg passphrase)
with a random key id (never derived from the passphrase). The key is wrapped, encrypted with the
user's passphrase and the full derivation, into KEYID.key.gpg: kept in VAR_DIR/walkeys (0600)
and copied beside the WAL on every WAL tier (SERVER/wal/keys/), so a fresh machine with only the
passphrase can recover. Segments are encrypted with AES-256 and the data key as passphrase,
salted but not iterated (a random 256-bit secret gains nothing from iteration). Each copy
records its key id (BackupCopy.key_id); readers unwrap a key once per process and keep it in
memory only. Copies without a key id are decrypted with the passphrase, as before.

With GPG_RECIPIENTS there is no derivation to save (measured ~0.03 s a segment): segments stay
encrypted to the recipients, and no data key exists.
"""

import io
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

from django.conf import settings

from backupportal import journal
from backupportal.lib.privatefile import write_private
from backups.crypto import ZstdDecrypting, expecting_bad_passphrase, gpg_failure
from backups.storage import StorageError, store_for

CURRENT = "current"  # VAR_DIR/walkeys/current: the id of the key new segments use
KEY_HEX = 64

_lock = threading.Lock()
_unwrapped = {}  # key id -> data key, for this process only
_current = {}  # passphrase -> (key id, data key): a new passphrase (rotatekey) gets a new key
_published = set()  # URIs of key files known to be on a tier
_failed = {}  # location pk -> when putting a key file there last failed (monotonic)
RETRY_AFTER = 300  # seconds


class WalKeyError(Exception):
    """A WAL key cannot be made, found or unwrapped (the message names the key id), or zstd is missing."""


def keyring() -> Path:
    path = Path(settings.VAR_DIR) / "walkeys"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def tier_key(server_name, key_id):
    """Where a key file lives in a WAL location: beside that server's WAL."""
    return f"{server_name}/wal/keys/{key_id}.key.gpg"


def writing(encryption, server, locations):
    """The Encryption an ingest writes segments with; the key file is put on `locations` first
    (the first one must take it: a segment is never written where its key is not)."""
    if encryption.recipients:
        return encryption
    key_id, secret = current_key(encryption)
    for n, location in enumerate(locations):
        if n and time.monotonic() < _failed.get(location.pk, 0) + RETRY_AFTER:
            continue
        try:
            publish(server.name, key_id, location)
        except (StorageError, OSError) as e:
            if n == 0:
                raise WalKeyError(f"cannot store WAL key {key_id} in location {location.name}: {e}") from None
            # A secondary tier (S3 down): tried again later, not by every pass, which it would slow.
            _failed[location.pk] = time.monotonic()
    return encryption.with_data_key(key_id, secret)


def current_key(encryption):
    """(key id, data key) for the configured passphrase: the current key when it unwraps with it,
    else a new one (the passphrase was rotated, or the key file is gone)."""
    with _lock:
        known = _current.get(encryption.passphrase)
        if known and (keyring() / f"{known[0]}.key.gpg").is_file():
            return known
        pointer = keyring() / CURRENT
        key_id = pointer.read_text().strip() if pointer.is_file() else ""
        try:
            with expecting_bad_passphrase():  # after a rotation the old key does not open: expected
                found = (key_id, _unwrap_bytes(key_id, (keyring() / f"{key_id}.key.gpg").read_bytes(), encryption))
        except (OSError, WalKeyError):
            found = _new_key(encryption)
        _current[encryption.passphrase] = found
        return found


def _new_key(encryption):
    key_id, secret = secrets.token_hex(8), secrets.token_hex(KEY_HEX // 2)
    wrapped = io.BytesIO()

    def collect(chunk):
        wrapped.write(chunk or b"")
        return False

    result = encryption.encrypt_stream(io.BytesIO(secret.encode()), collect)  # s2k_args(): the full derivation
    if result.returncode != 0:
        raise WalKeyError(f"cannot wrap a new WAL key: {gpg_failure(result)}")
    write_private(keyring() / f"{key_id}.key.gpg", wrapped.getvalue())
    write_private(keyring() / CURRENT, f"{key_id}\n".encode())
    _unwrapped[key_id] = secret
    journal.record("wal_key_created", actor="job:ingestwal", key_id=key_id)
    return key_id, secret


def publish(server_name, key_id, location):
    key = tier_key(server_name, key_id)
    store = store_for(location)
    if store.uri(key) in _published:
        return
    if not store.exists(key):
        with store.writer(key) as writer:
            writer.write((keyring() / f"{key_id}.key.gpg").read_bytes())
            writer.commit()
    _published.add(store.uri(key))


def reading(encryption, copy):
    """What decrypts `copy`: `encryption` itself for a copy from before the data key, else the
    unwrapped key's, through zstd when zstd compressed it. Raises WalKeyError naming the key."""
    encryption = encryption.for_copy(copy)  # the keyring's key that wrapped its data key (KeyMissing)
    key_id, compression = getattr(copy, "key_id", ""), getattr(copy, "compression", "")
    if compression == "zstd" and shutil.which("zstd") is None:
        raise WalKeyError("zstd is not installed, and this WAL copy is compressed by it: apt-get install zstd")
    if key_id:
        encryption = encryption.with_data_key(key_id, unwrap(key_id, encryption, copy))
    return ZstdDecrypting(encryption) if compression == "zstd" else encryption


def unwrap(key_id, encryption, copy=None):
    """The data key `key_id`, unwrapped with the passphrase once per process: from VAR_DIR/walkeys,
    else from beside the WAL in the copy's own location (a fresh portal)."""
    with _lock:
        if key_id in _unwrapped:
            return _unwrapped[key_id]
        wrapped, where = _wrapped(key_id, copy)
        _unwrapped[key_id] = _unwrap_bytes(key_id, wrapped, encryption, where)
        return _unwrapped[key_id]


def _wrapped(key_id, copy):
    local = keyring() / f"{key_id}.key.gpg"
    if local.is_file():
        return local.read_bytes(), str(local)
    if copy is None or "/wal/" not in copy.key:
        raise WalKeyError(f"WAL key {key_id}: its key file {local} is missing: copy {key_id}.key.gpg from a WAL tier")
    key = tier_key(copy.key.split("/wal/")[0], key_id)
    try:
        f = store_for(copy.location).open(key)
        try:
            return f.read(), f"{copy.location.name}:{key}"
        finally:
            f.close()
    except (StorageError, OSError) as e:
        raise WalKeyError(
            f"WAL key {key_id} is missing from {local} and from location {copy.location.name} ({e}): "
            f"copy {key_id}.key.gpg there from another WAL tier"
        ) from None


def _unwrap_bytes(key_id, wrapped, encryption, where="the keyring"):
    if not key_id:
        raise WalKeyError("no current WAL key")
    plain = io.BytesIO()

    def collect(chunk):
        plain.write(chunk or b"")
        return False

    result = encryption.decrypt_stream(io.BytesIO(wrapped), collect)
    secret = plain.getvalue().decode(errors="replace").strip()
    if not result.ok or len(secret) != KEY_HEX or not all(c in "0123456789abcdef" for c in secret):
        problem = gpg_failure(result) if not result.ok else "it does not hold a key"
        raise WalKeyError(
            f"WAL key {key_id} cannot be unwrapped from {where}: {problem} (corrupt key file, or another passphrase)"
        )
    return secret
