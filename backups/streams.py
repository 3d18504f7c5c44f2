"""The streaming layer: every byte that goes into or comes out of a storage location through gpg.

Writing: encrypt_into() streams a source (a client tool's stdout, a WAL file) through gpg into
an atomic file in a location, hashing the ciphertext as it passes. Reading: open_first() and
decrypt_first_healthy() take the first copy that can be read (primary → NAS → S3), its sha256
checked as it streams (VerifiedReader), and decrypt_first_healthy() decrypts it into a sink.

Nothing here writes the catalog: these run in gpg's threads and in fetch pools, where a
database write would wait on the caller's transaction. Copies found missing or corrupt are
handed back as faults (Fault, CopyCorrupt); the caller marks them bad on its own thread with
backups.copies.mark_faults().
"""

import hashlib
import io
import os
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from backups import walkeys
from backups.crypto import KeyMissing, gpg_failure
from backups.storage import MissingArtifact, StorageError, store_for

CHUNK = 1024 * 1024
HEARTBEAT_EVERY = 2.0  # seconds between on_tick calls while a source is encrypted


# --- Writing: a source through gpg into a location. ----------------------------------------


class WriteFailed(StorageError):
    """The location refused the ciphertext (disk full, capacity reached ...); `.error` is why."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class EncryptFailed(Exception):
    """The source or gpg failed; the message is one line a DBA can act on."""


class GpgKilled(EncryptFailed):
    """gpg ended by a signal (the OOM killer's SIGKILL, an operator's kill) while it encrypted."""


class Source:
    """What encrypt_into() reads: a readable stream. A running tool (backups.pipeline) also
    stops when the location fails and says, once gpg is done, whether it failed itself."""

    name = "the source"
    what = "the data"  # what gpg was encrypting, in a message

    def __init__(self, stream=None):
        self.stream = stream

    def open(self):
        return self.stream

    def stop(self):
        pass

    def finish(self):
        """Called once gpg is done, whatever happened (a tool is waited for here)."""

    def check(self):
        """Raises EncryptFailed when the source itself failed."""


class Ciphertext:
    """python-gnupg's on_data: gpg's output into the writer, never buffered in memory.

    A failed write stops the source at once, instead of producing into the void.
    """

    def __init__(self, writer, source):
        self.writer, self.source = writer, source
        self.bytes = 0
        self.error = None

    def __call__(self, chunk):
        if self.error is not None or not chunk:
            return False
        try:
            self.writer.write(chunk)
            self.bytes += len(chunk)
        except (OSError, StorageError) as e:
            self.fail(e)
        return False

    def fail(self, error):
        self.error = self.error or error
        self.source.stop()


def encrypt_into(store, key, source, encryption, compress_level=None, on_tick=None, timeout=None):
    """Stream `source` (a Source, opened here) through gpg into `store` under `key`. Returns (size, sha256).

    On any failure nothing is left under `key`: WriteFailed when the location fails, EncryptFailed
    when the source or gpg does; opening and committing the file raise the location's own error.
    `on_tick(progress)` (progress.bytes) runs in the calling thread every few seconds.
    """
    with store.writer(key) as writer:
        out = Ciphertext(writer, source)
        result = _run_gpg(source.open(), encryption, out, compress_level, on_tick, timeout)
        if isinstance(result, Exception) or result.returncode != 0:
            source.stop()  # nothing reads the source any more: a tool writing on would wait forever
        source.finish()
        if isinstance(out.error, (OSError, StorageError)):
            raise WriteFailed(out.error)
        if out.error is not None:
            raise out.error
        source.check()
        if isinstance(result, Exception):
            raise EncryptFailed(f"gpg: {result}")
        if (result.returncode or 0) < 0:
            raise GpgKilled(f"{gpg_failure(result)} while encrypting {source.what}")
        if result.returncode != 0 or getattr(result, "on_data_failure", None):
            raise EncryptFailed(gpg_failure(result))
        if writer.size == 0:
            raise EncryptFailed(f"{source.name} produced no output")
        return writer.commit()


def _run_gpg(stream, encryption, out, compress_level, on_tick, timeout):
    """gpg on a thread of its own, so that this one can tick and enforce the timeout.

    Returns python-gnupg's result, or the exception it raised (a broken pipe and the like).
    """
    box = {}

    def run():
        try:
            box["result"] = encryption.encrypt_stream(stream, out, compress_level)
        except Exception as e:  # noqa: BLE001 - reported by the caller, in its order of checks
            box["result"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = time.monotonic()
    while thread.is_alive():
        thread.join(HEARTBEAT_EVERY)
        if on_tick:
            on_tick(out)
        if timeout and time.monotonic() - started > timeout:
            out.fail(EncryptFailed(f"timed out after {timeout} s: the run was stopped"))
    return box["result"]


# --- Reading: the first healthy copy, verified as it streams. -----------------------------


@dataclass
class Fault:
    """A copy found missing: the caller marks it bad (copies.mark_faults) on its own thread."""

    copy: object  # a BackupCopy (models import this layer, so it is not imported here)
    why: str
    marked: bool = False

    def __str__(self):
        return self.why


class CopyCorrupt(StorageError):
    """A copy's bytes do not hash to the sha256 catalogued for it. A fault, like Fault."""

    def __init__(self, copy, message):
        super().__init__(message)
        self.copy = copy
        self.marked = False


class NoReadableCopy(StorageError):
    """No copy could be opened; the message says why for each, `.faults` are the missing ones."""

    def __init__(self, message, faults=()):
        super().__init__(message)
        self.faults = list(faults)


class FetchFailed(Exception):
    """No copy of an artifact could be read intact; the message names it and each copy's fault."""

    def __init__(self, message, faults=()):
        super().__init__(message)
        self.faults = list(faults)


def in_read_order(copies):
    return sorted(copies, key=lambda c: (c.location.read_order, c.location.name))


def readable(copies):
    """Copies believed good, in read order: primary first, then NAS, then S3."""
    return in_read_order(c for c in copies if c.status == c.Status.OK and c.location.enabled)


class VerifiedReader(io.IOBase):
    """A copy's bytes as a binary file; at EOF the sha256 (and size) must match the catalog.

    On a mismatch read() raises CopyCorrupt, also kept in `.error` for callers (such as
    python-gnupg's feeder thread) that swallow it. `.note` says which copies were skipped to
    get here; empty when the first one was read.
    """

    def __init__(self, copy, stream, note=""):
        super().__init__()
        self.copy, self.stream, self.note = copy, stream, note
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.verified = False
        self.error = None
        self.read_error = None  # the location failed mid-stream (I/O error, S3 timeout): not corruption
        self.abandoned = False  # hashed_beside() stopped part-way: no verdict on the copy

    def read(self, n=CHUNK):
        if self.error is not None:
            raise self.error
        try:
            chunk = self.stream.read(n)
        except (OSError, StorageError) as e:
            self.read_error = self.read_error or e
            raise
        if chunk:
            self.sha256.update(chunk)
            self.size += len(chunk)
        elif not self.verified:
            self._check()
        return chunk

    def _check(self):
        digest, expected = self.sha256.hexdigest(), self.copy.sha256
        if digest == expected and (self.copy.size is None or self.size == self.copy.size):
            self.verified = True
            return
        self.error = CopyCorrupt(
            self.copy,
            f"sha256 {digest[:12]}… over {self.size} bytes, catalogued {expected[:12]}… over {self.copy.size} "
            f"bytes ({self.copy.location.name} copy {self.copy.key})",
        )
        raise self.error

    def local_file(self):
        """The descriptor of a copy in a local or NAS directory, not read yet, else None: gpg may
        read such a file itself while hashed_beside() checks it (crypto.Encryption.decrypt_to_fd)."""
        if self.size or self.error is not None:
            return None
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None  # S3's body: through Python, as before
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None

    @contextmanager
    def hashed_beside(self):
        """The whole file hashed on a thread of its own while the body runs gpg on the same
        descriptor, then checked as at EOF: CopyCorrupt on a mismatch, an I/O error raised as the
        location's. The thread reads (pread: gpg's offset stays its own) only what gpg has read
        already, from the page cache, so that a copy larger than memory is not read twice from
        its disk or NAS; once the body ends, the rest, so that corrupt() can tell a bad copy from
        a wrong key even when gpg stopped early, as read() does."""
        fd, failed, body_done, abandoned = self.stream.fileno(), [], threading.Event(), threading.Event()

        def hash_all():
            offset = 0
            try:
                while not abandoned.is_set():
                    limit = None if body_done.is_set() else os.lseek(fd, 0, os.SEEK_CUR)
                    if limit is not None and offset >= limit:
                        body_done.wait(0.01)  # caught up with gpg
                        continue
                    chunk = os.pread(fd, CHUNK if limit is None else min(CHUNK, limit - offset), offset)
                    if not chunk:
                        break
                    self.sha256.update(chunk)
                    offset += len(chunk)
            except OSError as e:
                failed.append(e)
            self.size = offset

        thread = threading.Thread(target=hash_all, daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            abandoned.set()  # gpg did not run or the restore stops: no verdict is wanted
            self.abandoned = True
            raise
        finally:
            body_done.set()
            thread.join()
        if failed:
            self.read_error = failed[0]
            raise failed[0]
        self._check()

    def corrupt(self):
        """After a failed read (gpg may stop first): the CopyCorrupt if the whole copy does not hash right, else None."""
        if self.error is not None:
            return self.error
        if self.verified or self.read_error is not None or self.abandoned:
            # Hashed whole already (hashed_beside); unreachable, which is no proof of corruption;
            # or a hash stopped part-way, which the rest read from gpg's offset would not complete.
            return None
        try:
            while self.read(CHUNK):  # hash what the consumer left unread
                pass
        except CopyCorrupt as e:
            return e
        except (OSError, StorageError):
            return None
        return None

    def close(self):
        self.stream.close()
        super().close()


def open_copy(copy, note=""):
    """A VerifiedReader on `copy`: MissingArtifact when the file is gone, OSError or
    StorageError when its location cannot be reached."""
    # By version on a locked S3 location: a delete marker put by key alone must not hide the copy.
    return VerifiedReader(copy, store_for(copy.location).open(copy.key, getattr(copy, "version_id", "")), note)


def open_first(copies):
    """The first of `copies` that opens, as a VerifiedReader, and the faults met before it.

    A missing copy is a fault; one that cannot be reached (S3 down) is skipped, never condemned.
    A mismatch found at EOF cannot fall back mid-stream: the caller marks the copy bad and
    starts again without it. Raises NoReadableCopy.
    """
    skipped, faults = [], []
    for copy in copies:
        note = f"read from {copy.location.name}: " + "; ".join(skipped) if skipped else ""
        try:
            return open_copy(copy, note), faults
        except MissingArtifact as e:
            faults.append(Fault(copy, str(e)))
            skipped.append(f"{copy.location.name} copy missing")
        except (OSError, StorageError) as e:
            skipped.append(f"{copy.location.name} unreadable ({e})")
    raise NoReadableCopy("; ".join(skipped) or "no healthy copy is catalogued", faults)


# --- Decrypting the first healthy copy into a sink. -----------------------------------------


class FileSink:
    """Plaintext into a file under a temporary name; renamed into place only when all is well."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.fetching")
        self.sha256 = hashlib.sha256()

    def open(self):
        # A new file, never one already there nor through a link: the directory may be another
        # user's (a data directory, the database OS user's, receives a backup_manifest).
        self.tmp.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.f = os.fdopen(os.open(self.tmp, flags, 0o600), "wb")

    def write(self, chunk):
        self.f.write(chunk)
        self.sha256.update(chunk)

    def commit(self):
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def decrypt_first_healthy(copies, sink, encryption, what, plain_sha256=None):
    """Decrypt the first of `copies` (see readable()) that reads intact into `sink`
    (open/write/commit/abort). Returns (notes, faults); raises FetchFailed, whose `.faults`
    are the bad copies met. The caller marks them on its own thread (copies.mark_faults)."""
    problems, faults = [], []
    for copy in copies:
        problem, fault = _try_copy(copy, sink, encryption, plain_sha256)
        if problem is None:
            notes = [f"{what}: read from {copy.location.name} after {'; '.join(problems)}"] if problems else []
            return notes, faults
        problems.append(f"{copy.location.name}: {problem}")
        faults += [fault] if fault else []
    if not problems:
        raise FetchFailed(f"{what} has no healthy copy in any enabled location")
    raise FetchFailed(f"{what} cannot be read intact from any location ({'; '.join(problems)})", faults)


def _try_copy(copy, sink, encryption, plain_sha256):
    """(None, None) when the copy was decrypted into the sink, else (what went wrong, a fault or None)."""
    try:
        encryption = walkeys.reading(encryption, copy)  # a WAL copy's data key and zstd, when it has them
    except (walkeys.WalKeyError, KeyMissing) as e:
        return str(e), None
    try:
        reader = open_copy(copy)
    except MissingArtifact as e:
        problem = f"missing ({e})"
        return problem, Fault(copy, problem)
    except (StorageError, OSError) as e:
        # S3 down, timing out or answering 500: the copy may be fine; it is skipped, never condemned.
        return f"unreachable ({e})", None
    errors = []
    try:
        sink.open()
    except BaseException:
        reader.close()
        raise
    try:
        result, corrupt = _decrypt_verified(encryption, reader, sink, errors)
    except (StorageError, OSError) as e:  # the location went away mid-stream: try the next copy
        sink.abort()
        return f"unreachable ({e})", None
    except Exception:
        sink.abort()
        raise
    finally:
        reader.close()
    problem = _problem(corrupt, errors, result, sink, plain_sha256)
    if problem is None:
        sink.commit()
        return None, None
    sink.abort()
    return problem, corrupt


def _decrypt_verified(encryption, reader, sink, errors):
    """gpg's result and the CopyCorrupt (or None) of every byte, including any gpg left unread."""
    try:
        result = _decrypt(encryption, reader, sink, errors)
        return result, reader.corrupt()
    except CopyCorrupt as e:  # noticed at the end of the file by gpg's feeder, re-raised here
        return None, e
    except BrokenPipeError:
        # gpg gave up on bad data before reading it all (a large artifact); python-gnupg
        # re-raises its feeder's broken pipe. Whether the copy is corrupt, its hash says.
        return None, reader.corrupt()


def _problem(corrupt, errors, result, sink, plain_sha256):
    if corrupt is not None:
        return f"corrupt: {corrupt}"
    if errors:
        return f"cannot write the plaintext: {errors[0]}"
    if result is None:
        return "gpg stopped reading it: the data is not what was encrypted"
    if not result.ok:
        return f"it does not decrypt ({result.status or 'gpg failed'})"
    if plain_sha256 and getattr(sink, "sha256", None) and sink.sha256.hexdigest() != plain_sha256:
        return "decrypts to other bytes than were archived"
    return None


def _decrypt(encryption, reader, sink, errors):
    """Through on_data, or, for a sink with a descriptor (tar's stdin), by gpg writing into it."""
    if hasattr(sink, "fileno"):
        result = encryption.decrypt_to_fd(reader, sink.fileno())
        if not result.ok and (failure := sink.failure()):
            errors.append(failure)  # gpg failed because the sink stopped reading: say why it stopped
        return result

    def on_data(chunk):
        if chunk and not errors:
            try:
                sink.write(chunk)
            except OSError as e:
                errors.append(e)
        return False

    return encryption.decrypt_stream(reader, on_data)
