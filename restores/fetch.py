"""Reading artifacts back for PITR: the first healthy copy (primary, NAS, S3), sha256 checked
while it streams through gpg into a sink. A missing or corrupt copy is marked bad and the
next one is tried, as the logical restore does (backups.copies). A copy that cannot be reached
(S3 down, timing out, answering 500) is skipped and left as it is."""

import hashlib
import os
from pathlib import Path

from backups.copies import CopyCorrupt, VerifiedReader
from backups.models import BackupCopy
from backups.storage import MissingArtifact, StorageError, store_for


class FetchFailed(Exception):
    """No copy of an artifact could be read intact; the message names it and each copy's fault."""

    def __init__(self, message, marks=()):
        super().__init__(message)
        self.marks = list(marks)


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
    """Decrypt the first healthy copy into `sink` (open/write/commit/abort).

    Returns (notes, marks): `marks` are callables that mark the bad copies met on the way;
    the caller runs them on its own thread (fetches run in a pool, the catalog does not).
    """
    faults, marks = [], []
    for copy in copies:
        fault, mark = _try_copy(copy, sink, encryption, plain_sha256)
        if fault is None:
            notes = [f"{what}: read from {copy.location.name} after {'; '.join(faults)}"] if faults else []
            return notes, marks
        faults.append(f"{copy.location.name}: {fault}")
        marks.append(mark)
    if not faults:
        raise FetchFailed(f"{what} has no healthy copy in any enabled location")
    raise FetchFailed(f"{what} cannot be read intact from any location ({'; '.join(faults)})", marks)


def _try_copy(copy, sink, encryption, plain_sha256):
    try:
        stream = store_for(copy.location).open(copy.key)
    except MissingArtifact as e:
        error = f"missing ({e})"
        return error, lambda: mark_bad(copy, error)
    except (StorageError, OSError) as e:
        # S3 down, timing out or answering 500: the copy may be fine; it is skipped, never condemned.
        return f"unreachable ({e})", lambda: None
    reader = VerifiedReader(copy, stream)
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
        try:
            result = _decrypt(encryption, reader, sink, on_data, errors)
            corrupt = reader.corrupt()  # the hash of every byte, including any gpg left unread
        except CopyCorrupt as e:  # noticed at the end of the file by gpg's feeder, re-raised here
            result, corrupt = None, e
        except BrokenPipeError:
            # gpg gave up on bad data before reading it all (a large artifact); python-gnupg
            # re-raises its feeder's broken pipe. Whether the copy is corrupt, its hash says.
            result, corrupt = None, reader.corrupt()
        # After BrokenPipeError (an OSError too): the location went away mid-stream, try the next copy.
        except (StorageError, OSError) as e:
            sink.abort()
            return f"unreachable ({e})", lambda: None
    except Exception:
        sink.abort()
        raise
    finally:
        # The reader writes no catalog row; the caller runs the returned mark on its own thread.
        reader.close()
    if corrupt is not None:
        sink.abort()
        return f"corrupt: {corrupt}", corrupt.mark_bad
    if errors:
        fault = f"cannot write the plaintext: {errors[0]}"
    elif result is None:
        fault = "gpg stopped reading it: the data is not what was encrypted"
    elif not result.ok:
        fault = f"gpg cannot decrypt it ({result.status or 'failed'})"
    elif plain_sha256 and getattr(sink, "sha256", None) and sink.sha256.hexdigest() != plain_sha256:
        fault = "decrypts to other bytes than were archived"
    else:
        sink.commit()
        return None, None
    sink.abort()
    return fault, lambda: None


def _decrypt(encryption, reader, sink, on_data, errors):
    """Through on_data, or, for a sink with a descriptor (tar's stdin), by gpg writing into it."""
    if not hasattr(sink, "fileno"):
        return encryption.decrypt_stream(reader, on_data)
    result = encryption.decrypt_to_fd(reader, sink.fileno())
    if not result.ok and (failure := sink.failure()):
        errors.append(failure)  # gpg failed because the sink stopped reading: say why it stopped
    return result


def mark_bad(copy, error):
    copy.status, copy.last_error = BackupCopy.Status.BAD, error[:2000]
    copy.save(update_fields=["status", "last_error"])
