"""Reading and writing artifacts in a storage location.

A file is written under a temporary name (`.name.PID-RANDOM.partial`, never mistaken for an artifact),
hashed as bytes pass, fsynced, then renamed into place: a reader sees a whole file or none. The
temporary file of a writer that was killed is removed by the next write of its key and by
retention's pass over the location (remove_leftovers), once it is stale (stale_partial).
"""

import errno
import hashlib
import os
import pwd
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils.module_loading import import_string

PARTIAL_SUFFIX = ".partial"
# AtomicWriter's temporary names; PostgreSQL's own `.partial` WAL segments start with no dot.
_PARTIAL_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.partial$")
# A temporary file untouched this long was left by a dead writer: a live one writes every chunk,
# and a copy that moves no bytes for its lease (10 minutes) is taken over by another worker.
STALE_PARTIAL_AGE = timedelta(hours=1)


class StorageError(Exception):
    """A location cannot take or give a file; the message names it and what to do."""


class MissingArtifact(StorageError):
    """The catalog has a copy here, but the location does not have the file."""


class ObjectLocked(StorageError):
    """S3 refused to delete a version because its Object Lock holds it; `.retain_until` says until when."""

    def __init__(self, message, retain_until):
        super().__init__(message)
        self.retain_until = retain_until


def safe_key(key: str) -> str:
    """Keys are relative POSIX paths without '..': they can never leave the location's root."""
    parts = PurePosixPath(key).parts
    if not key or PurePosixPath(key).is_absolute() or ".." in parts:
        raise StorageError(f"refusing storage key {key!r}: it must be a relative path without '..'")
    return key


def allowed_storage_roots():
    roots = [settings.BACKUP_ROOT, settings.WAL_ROOT]
    if settings.NAS_ROOT:
        roots.append(Path(settings.NAS_ROOT))
    return [Path(r).resolve() for r in roots]


def check_storage_path(path):
    """Refuse a storage path outside the configured roots, or one that climbs with '..'."""
    if ".." in Path(path).parts:
        raise ValidationError(f"Storage path {path} contains '..': give the directory itself.")
    if not Path(path).is_absolute():
        raise ValidationError(f"Storage path {path} is relative: give an absolute directory.")
    resolved = Path(path).resolve()
    roots = allowed_storage_roots()
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ValidationError(
            f"Storage path {path} is outside the allowed roots ({allowed}): set BACKUP_ROOT or NAS_ROOT."
        )


def private_dirs(path: Path):
    """mkdir -p, each new directory 0700 (pathlib's parents=True gives the parents the default mode)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


class AtomicWriter:
    """Write-hash-fsync-rename. Use as a context manager; call commit() when complete."""

    def __init__(self, final: Path, capacity_left=None):
        self.final = final
        # A name of its own: two writers of one key (a copy's lease expired while its NAS write hung,
        # and another worker took it over) never write into one file; the first to commit wins.
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.capacity_left = capacity_left
        private_dirs(final.parent)
        # 0600: only the service user reads artifacts, even though they are encrypted.
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.file = os.fdopen(fd, "wb", buffering=0)

    def write(self, chunk: bytes):
        if self.capacity_left is not None and self.size + len(chunk) > self.capacity_left:
            raise StorageError(
                f"{self.final.parent} reached the location's configured capacity: raise it in the admin or free space"
            )
        self.file.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)

    def commit(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.final.exists():
            raise StorageError(f"{self.final} already exists: refusing to overwrite an artifact")
        os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        return self.size, self.sha256.hexdigest()

    def abort(self):
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.file.closed:
            self.abort()
        return False


def partials_of(final: Path):
    """The temporary files AtomicWriter left for `final` (a killed writer's), of any writer."""
    if not final.parent.is_dir():
        return []
    prefix = f".{final.name}."
    return [p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(PARTIAL_SUFFIX)]


def stale_partial(path: Path) -> bool:
    """Whether `path` is a temporary file a dead writer left: named as AtomicWriter names them,
    untouched for STALE_PARTIAL_AGE, and not of a process alive here (a pid names a process on
    one host only, and a NAS is shared by the workers of several: there its age decides)."""
    from backups.runner import alive  # the runner's test of a run's pid

    match = _PARTIAL_NAME.match(path.name)
    if not match:
        return False
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    old = time.time() - info.st_mtime > STALE_PARTIAL_AGE.total_seconds()
    return path.is_file() and not path.is_symlink() and old and not alive(int(match[1]))


def remove_stale_partials(paths) -> int:
    """Remove the stale ones (stale_partial) of `paths`; how many."""
    removed = 0
    for path in paths:
        if stale_partial(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _os_user():
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """What every kind of location shares: the space the catalog says the portal uses there."""

    def __init__(self, location):
        self.location = location

    def used_bytes(self) -> int:
        return self.location.catalogued_bytes()

    def capacity_left(self):
        if not self.location.capacity_bytes:
            return None
        return max(self.location.capacity_bytes - self.used_bytes(), 0)

    def versioned(self) -> bool:
        """Whether the location keeps earlier versions of its objects (an S3 bucket with
        versioning on): only then can an object outlive its deletion by key."""
        return False

    def surviving_version(self, key) -> str:
        """The version of `key` that reading by key alone reads (S3Store); "" where the location
        keeps no versions (a directory): its key is all there is."""
        return ""

    def remove_copy(self, key, version=""):
        """Delete a catalogued copy's file or object (retention, a deleted backup): the catalog
        then calls it deleted. Where it cannot be told gone, StorageError, and it is retried."""
        self.delete(key, version)

    def remove_leftovers(self) -> int:
        """Remove what killed writers left in the location (never an artifact); how many."""
        return 0


class FileStore(Store):
    """A primary or NAS location: a directory under the configured roots."""

    def __init__(self, location):
        super().__init__(location)
        self.root = Path(location.path)

    def path(self, key) -> Path:
        return self.root / safe_key(key)

    def uri(self, key) -> str:
        return f"file://{self.path(key)}"

    def check(self):
        """The directory is under the configured roots (settings may have changed since it was saved)."""
        try:
            check_storage_path(self.location.path)
        except ValidationError as e:
            raise StorageError(f"location {self.location.name}: {e.messages[0]}") from None

    @contextmanager
    def writable(self):
        """A directory the service user may not write (modes, a read-only mount): one line saying so."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise StorageError(
                f"location {self.location.name} ({self.root}) is not writable by the OS user "
                f"{_os_user()} that runs the backups ({e.strerror}: {e.filename}): make it writable by that "
                "user (chown/chmod, or remount read-write), or point the location at another directory"
            ) from None

    def writer(self, key) -> AtomicWriter:
        self.check()
        with self.writable():
            private_dirs(self.root)
            remove_stale_partials(partials_of(self.path(key)))  # an earlier attempt's, killed mid-write
            return AtomicWriter(self.path(key), capacity_left=self.capacity_left())

    def remove_leftovers(self) -> int:
        """The stale temporary files of killed writers anywhere in the location (retention's pass)."""
        if not self.root.is_dir():
            return 0
        with self.writable():
            return remove_stale_partials(self.root.rglob(f".*{PARTIAL_SUFFIX}"))

    # `version` is S3's (backups.s3): a directory keeps one version of a file, and ignores it.
    def open(self, key, version=""):
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise MissingArtifact(f"{self.path(key)} is missing from location {self.location.name}") from None
        except IsADirectoryError:  # the file replaced by a directory: no copy there (it read "unreachable" for ever)
            raise MissingArtifact(
                f"{self.path(key)} is a directory, not the copy, in location {self.location.name}"
            ) from None

    def exists(self, key, version="") -> bool:
        return self.path(key).is_file()

    def delete(self, key, version=""):
        with self.writable():
            self.path(key).unlink(missing_ok=True)

    def remove_copy(self, key, version=""):
        """A catalogued file already gone counts as deleted, unless the location itself is away: a
        NAS unmounted for maintenance leaves its mount point empty (or no directory at all), and
        its files come back with it; claimed deleted, one would outlive its catalog row for ever."""
        if not self.path(key).exists() and (not self.root.is_dir() or not any(self.root.iterdir())):
            raise StorageError(
                f"location {self.location.name} ({self.root}) is empty or missing (an unmounted NAS?): {key} "
                "cannot be told deleted; mount it again, and the deletion is retried"
            )
        self.delete(key, version)

    def list(self, prefix=""):
        """The keys of every whole file under `prefix` (a rebuilt catalog reads a location this way)."""
        start = self.path(prefix) if prefix else self.root
        if not start.is_dir():
            return
        for path in sorted(start.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # partials (.NAME.partial) are not artifacts
                yield path.relative_to(self.root).as_posix()

    def usage(self):
        """(free bytes, total bytes).

        With a configured capacity, the total is that capacity and the free space is what is
        left of it, or the filesystem's free space when that is smaller.
        """
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        disk = shutil.disk_usage(probe)
        if self.location.capacity_bytes:
            return min(self.capacity_left(), disk.free), self.location.capacity_bytes
        return disk.free, disk.total


# A location's kind -> its store, by dotted path (as schedules name their tasks): backups.s3
# builds on this module, and boto3 is loaded only by a process that has an S3 location.
STORES = {"s3": "backups.s3.S3Store"}


def store_for(location):
    path = STORES.get(location.kind)
    return import_string(path)(location) if path else FileStore(location)
