"""Reading an artifact back: the first healthy copy (primary, NAS, S3), sha256 checked while
it streams through gpg into a sink. A bad or missing copy falls back to the next one."""

import hashlib
import os
from pathlib import Path

from backups.models import BackupCopy
from backups.storage import StorageError, store_for
from backups.wal import HashingReader


class FetchFailed(Exception):
    """No copy of an artifact could be read intact; the message names it and each copy's fault."""


class FileSink:
    """Plaintext into a file under a temporary name; renamed into place only when all is well."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.fetching")
        self.sha256 = hashlib.sha256()

    def open(self):
        self.f = open(self.tmp, "wb")
        os.chmod(self.tmp, 0o600)

    def write(self, chunk):
        self.f.write(chunk)
        self.sha256.update(chunk)

    def commit(self):
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def ordered_copies(copies):
    """Copies believed good, in read order: primary first, then NAS, then S3."""
    good = [c for c in copies if c.status == BackupCopy.Status.OK and c.location.enabled]
    return sorted(good, key=lambda c: (c.location.read_order, c.location.name))


def fetch(copies, sink, encryption, what, plain_sha256=None):
    """Decrypt the first healthy copy into `sink` (open/write/commit/abort). Returns notes."""
    faults = []
    for copy in copies:
        fault = _try_copy(copy, sink, encryption, plain_sha256)
        if fault is None:
            return [f"{what}: read from {copy.location.name} after {'; '.join(faults)}"] if faults else []
        faults.append(f"{copy.location.name}: {fault}")
    if not faults:
        raise FetchFailed(f"{what} has no copy in any enabled location")
    raise FetchFailed(f"{what} cannot be read intact from any location ({'; '.join(faults)})")


def _try_copy(copy, sink, encryption, plain_sha256):
    try:
        source = store_for(copy.location).open(copy.key)
    except (StorageError, OSError) as e:
        return f"missing ({e})"
    errors = []

    def on_data(chunk):
        if chunk and not errors:
            try:
                sink.write(chunk)
            except OSError as e:
                errors.append(e)
        return False

    sink.open()
    try:
        with source:
            hashing = HashingReader(source)  # the ciphertext, hashed on its way to gpg
            result = encryption.decrypt_stream(hashing, on_data)
    except Exception:
        sink.abort()
        raise
    if hashing.sha256.hexdigest() != copy.sha256:
        fault = f"corrupt: sha256 {hashing.sha256.hexdigest()[:12]} differs from the catalog's {copy.sha256[:12]}"
    elif errors:
        fault = f"cannot write the plaintext: {errors[0]}"
    elif not result.ok:
        fault = f"gpg cannot decrypt it ({result.status or 'failed'})"
    elif plain_sha256 and getattr(sink, "sha256", None) and sink.sha256.hexdigest() != plain_sha256:
        fault = "decrypts to other bytes than were archived"
    else:
        sink.commit()
        return None
    sink.abort()
    return fault
