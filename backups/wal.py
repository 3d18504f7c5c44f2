"""The WAL archive: the spool, ingest into WAL_ROOT, the catalog, continuity and health.

Segments reach the spool (WAL_SPOOL/<server>/) from the archive program (push) or from
pg_receivewal (pull). `ingest()` catalogues each one (timeline, name, size, sha256, archive
time), encrypts it through gpg into the WAL location, records the copy, and only then
removes it from the spool: a worker killed at any moment loses nothing, it ingests again.

Segment names depend on wal_segment_size, which is read from each server (never assumed).
"""

import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from backupportal import conditions, journal
from backups import archive_wal, streams
from backups.crypto import Encryption, EncryptionError
from backups.models import WAL_LOCATION, BackupCopy, Server, StorageLocation, WalSegment
from backups.pipeline import BackupFailed
from backups.storage import StorageError, store_for

SEGMENT = re.compile(r"^[0-9A-F]{24}$")
WAL_FILE = re.compile(r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$")
PROGRAM_NAME = "archive_wal.py"
SYSTEM_PYTHON = "/usr/bin/python3"
# WAL compresses well (a switched segment is mostly zeros); gpg's own compression is undone
# by the same `gpg --decrypt`. Level 1: nearly all of the gain at a fraction of the cost.
WAL_COMPRESS_LEVEL = 1
CHUNK = 1024 * 1024
# SPOOL/errors/ingest.json: the last ingest failed (the WAL location refused); removed by the next good one.
INGEST_MARKER = "ingest"
# Temporary files a killed archive program left behind are removed after this long.
STALE_TMP = timedelta(minutes=10)
# Segments encrypted at once by an ingest: one gpg each, so about one per core.
INGEST_WORKERS = max(2, min(4, os.cpu_count() or 2))


class WalError(Exception):
    """A WAL operation cannot go on; the message names the segment and what to do."""


# --------------------------------------------------------------------------- names


def lsn_to_int(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def segments_per_id(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segno_of(name: str, segment_size: int) -> int:
    return int(name[8:16], 16) * segments_per_id(segment_size) + int(name[16:24], 16)


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = segments_per_id(segment_size)
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def segno_of_lsn(lsn, segment_size: int) -> int:
    return (lsn_to_int(lsn) if isinstance(lsn, str) else lsn) // segment_size


def timeline_of(name: str) -> int:
    return int(name[:8], 16)


def wal_key(server, name):
    """Where a WAL file lives in every location: one directory per 4 GB of WAL."""
    folder = name[:16] if len(name) >= 24 else name[:8]
    return f"{server.name}/wal/{folder}/{name}.gpg"


def segment_size(server, conn=None) -> int:
    """wal_segment_size in bytes, read from the server once and kept on the row."""
    if server.wal_segment_size:
        return server.wal_segment_size
    import psycopg

    from backupportal.lib.pgerrors import explain

    try:
        if conn is None:
            with server.connect() as own:
                size = read_segment_size(own)
        else:
            size = read_segment_size(conn)
    except psycopg.Error as e:
        raise WalError(explain(e, server)) from None
    Server.objects.filter(pk=server.pk).update(wal_segment_size=size)
    server.wal_segment_size = size
    publish_segment_size(server)
    return size


def read_segment_size(conn) -> int:
    # pg_settings reports it in bytes (unit B) on PostgreSQL 11 and newer.
    return int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()[0])


# --------------------------------------------------------------------------- the spool


def spool_root() -> Path:
    return Path(settings.WAL_SPOOL)


def spool_dir(server) -> Path:
    return spool_root() / server.name


def program_path() -> Path:
    return spool_root() / PROGRAM_NAME


def db_user_ids(db_user):
    try:
        pw = pwd.getpwnam(db_user)
    except KeyError:
        raise WalError(f"there is no OS user {db_user!r} on this host: give the database server's user") from None
    return pw.pw_uid, pw.pw_gid


def unreachable_by(path: Path, uid: int, gid: int):
    """The first of `path` and its parents that the user cannot traverse, or None."""
    groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    for p in (path, *path.parents):
        st = p.stat()
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH
        if uid != 0 and not st.st_mode & bit:
            return p
    return None


def _make_dir(path: Path, mode: int, owner_uid=None, gid=None):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and owner_uid is not None:
        os.chown(path, owner_uid, gid)
    elif gid is not None and os.stat(path).st_gid != gid:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise WalError(
                f"cannot give {path} to group {grp.getgrgid(gid).gr_name}: add the portal's service user "
                f"to that group (usermod -aG {grp.getgrgid(gid).gr_name} USER)"
            ) from None
    os.chmod(path, mode)


def prepare_push_spool(server, db_user="postgres") -> Path:
    """The server's spool and the archive program, installed where `db_user` can use them.

    The spool belongs to the database server's user and group (setgid, 2770): postgres writes
    segments, the portal (root, or a member of that group) reads and removes them. Nobody
    else can read WAL. The program is copied out of the portal's checkout (which may be under
    /root, unreadable to postgres) next to the spool.
    """
    uid, gid = db_user_ids(db_user)
    root = spool_root()
    _make_dir(root, 0o755)
    blocked = unreachable_by(root, uid, gid)
    if blocked is not None:
        raise WalError(
            f"the {db_user} user cannot reach {root} ({blocked} is closed to it): "
            "set WAL_SPOOL to a directory it can traverse, such as /var/lib/backupportal/walspool"
        )
    install_program()
    spool = spool_dir(server)
    _make_dir(spool, 0o2770, uid, gid)
    _make_dir(spool / "errors", 0o2770, uid, gid)
    _make_dir(spool / "ingested", 0o2750, None, gid)
    publish_segment_size(server)
    return spool


def publish_segment_size(server):
    """SPOOL/segment_size for the archive program, which has no database: it refuses a segment
    of another size (truncated) while PostgreSQL still has the whole one. Atomic, 0640 (postgres
    reads it through the spool's group); rewritten only when missing or different."""
    spool = spool_dir(server)
    if not server.wal_segment_size or not spool.is_dir():
        return
    path = spool / archive_wal.SIZE_FILE
    text = f"{server.wal_segment_size}\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, ValueError):
        pass
    tmp = spool / f".{archive_wal.SIZE_FILE}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a spool the portal cannot write fails its ingest, which says so; ingest checks sizes anyway


def prepare_pull_spool(server) -> Path:
    """pg_receivewal runs as the portal's own user: its directory is private."""
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(spool, 0o700)
    (spool / "ingested").mkdir(exist_ok=True, mode=0o700)
    return spool


def install_program() -> Path:
    """Copy archive_wal.py next to the spool (atomically; readable, never writable, by others)."""
    source = Path(__file__).with_name(PROGRAM_NAME)
    target = program_path()
    if target.exists() and target.read_bytes() == source.read_bytes():
        return target
    tmp = target.with_name(f".{PROGRAM_NAME}.tmp")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def archive_command(server) -> str:
    """The archive_command line.

    A segment already in the spool byte for byte (the program's look-ahead copied it there
    during the previous call) is acknowledged by cmp, after sync has fsynced it and the spool
    directory, without starting Python: that halves the cost of each segment of a backlog.
    Anything else goes to the program, which alone decides (conflicts, sizes, error markers):
    the system Python, an empty environment, no site packages.
    """
    program, spool = _command_paths(server)
    # `test` is a shell builtin: a segment not in the spool costs no process, and cmp never opens %p.
    already = f"test -f {spool}/%f && /usr/bin/cmp -s {spool}/%f %p && /usr/bin/sync {spool}/%f {spool}"
    # In braces, one command: chained with another tool's (`A && B`, `B && A`), a failure of
    # either fails the line. No `exec`: it would skip whatever is chained after it.
    return f"{{ {already} || {program_command(program, spool)}; }}"


def _command_paths(server):
    # `%` is archive_command's escape character: a literal one in a path must be doubled.
    return tuple(shlex.quote(str(p)).replace("%", "%%") for p in (program_path(), spool_dir(server)))


def program_command(program, spool):
    return f"/usr/bin/env -i {SYSTEM_PYTHON} -I -S {program} {spool} %p %f"


def is_portal_command(server, command):
    """The current archive_command, or the earlier one without the cmp shortcut (still correct)."""
    return command in (archive_command(server), program_command(*_command_paths(server)))


def conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def archive_settings(server):
    """The postgresql.conf lines for push archiving, in order, with why."""
    timeout = min(60, server.rpo_minutes * 60 // 4)
    return [
        ("wal_level", "replica", "restart"),
        ("archive_mode", "on", "restart"),
        ("archive_command", conf_quote(archive_command(server)), "reload"),
        ("archive_timeout", str(timeout), "reload"),
        ("max_wal_senders", "10", "restart"),
    ]


# --------------------------------------------------------------------------- ingest


@dataclass
class IngestResult:
    ingested: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    busy: bool = False

    def as_dict(self):
        return {
            "ingested": len(self.ingested),
            "first": self.ingested[0] if self.ingested else None,
            "last": self.ingested[-1] if self.ingested else None,
            "duplicates": len(self.duplicates),
            "conflicts": self.conflicts,
            "busy": self.busy,
        }


class HashingReader:
    """A file wrapper that hashes what is read through it (the plaintext, on its way to gpg)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        chunk = self.f.read(n)
        self.sha256.update(chunk)
        self.size += len(chunk)
        return chunk


def wal_location():
    location = StorageLocation.objects.filter(name=WAL_LOCATION, enabled=True).first()
    if location is None:
        StorageLocation.sync_from_settings()
        location = StorageLocation.objects.get(name=WAL_LOCATION)
    return location


def pending_names(spool: Path, source):
    """WAL files ready to ingest, oldest first. The newest .partial of pg_receivewal is still
    being written; an older one was left behind by a timeline switch and is final."""
    names = sorted(n for n in os.listdir(spool) if WAL_FILE.match(n))
    partials = [n for n in names if n.endswith(".partial")]
    if source == "pull" and partials:
        names.remove(partials[-1])
    return names


def ingest(server, actor="job:ingestwal"):
    """Ingest everything in the server's spool. One ingest per spool at a time (flock)."""
    spool = spool_dir(server)
    result = IngestResult()
    if not spool.is_dir():
        return result
    source = "pull" if server.archiving == Server.Archiving.PULL else "push"
    lock_fd = os.open(spool / ".ingest.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            result.busy = True
            return result
        publish_segment_size(server)  # for a server whose size was learned before the file existed
        names = pending_names(spool, source)
        if names:
            try:
                _ingest_names(server, spool, names, source, result)
            except WalError as e:
                ingest_failed(server, spool, result, e)
                raise
            copy_pending(server)  # a failed copy stays pending for the copy worker; never fails the ingest
        clear_error_marker(spool, INGEST_MARKER)
        _remove_stale_tmp(spool)
    finally:
        os.close(lock_fd)
    if result.ingested:
        journal.record(
            "wal_ingested",
            actor=actor,
            obj=server,
            count=len(result.ingested),
            first=result.ingested[0],
            last=result.ingested[-1],
        )
    return result


def _ingest_names(server, spool, names, source, result):
    """Ingest `names` in order. gpg encrypts up to INGEST_WORKERS of them at once (one process,
    one core each: with the strategy's key derivation and compression a segment costs a tenth
    of a second or more); this thread alone checks and catalogues them, in order."""
    try:
        encryption = Encryption()  # a misconfiguration is one message, before any file is touched
    except EncryptionError as e:
        raise WalError(str(e)) from None
    location = wal_location()
    store = store_for(location)

    def encrypt(path, key):
        with open(path, "rb") as f:
            reader = HashingReader(f)
            size, sha256 = encrypt_into(store, key, reader, encryption)
        return reader, size, sha256

    window = deque()  # (name, key, future) in name order

    def catalogue_until(size):
        while len(window) > size:
            _catalogue_next(server, spool, window, source, store, location, result)

    with ThreadPoolExecutor(max_workers=INGEST_WORKERS) as pool:
        try:
            for name in names:
                try:
                    outcome = prepare(server, spool / name, store)
                except (WalError, StorageError) as e:
                    catalogue_until(0)  # those before it are good: catalogued before it stops the ingest
                    if isinstance(e, StorageError):
                        raise stays_in_spool(e, name, spool) from None
                    raise
                if outcome:
                    getattr(result, outcome).append(name)
                    continue
                key = wal_key(server, name)
                window.append((name, key, pool.submit(encrypt, spool / name, key)))
                catalogue_until(INGEST_WORKERS - 1)
            catalogue_until(0)
        except BaseException:
            for _, key, future in window:  # encrypted ahead, never catalogued: nothing refers to them
                if future.exception() is None:
                    store.delete(key)
            raise


def ingest_failed(server, spool, result, error):
    """What the monitor must keep seeing until an ingest succeeds: a marker, which it reads now."""
    message = f"WAL of {server} cannot be ingested: {error}"
    if result.ingested:
        message += f" (ingested up to {result.ingested[-1]} before it failed)"
    try:
        write_error_marker(spool, INGEST_MARKER, "ingest_failed", message)
    except OSError:
        pass  # the spool itself refuses: so does the archive command, which the server reports
    conditions.changed("archive_failing", server=server)


def stays_in_spool(error, name, spool):
    # Before the catalog and the unlink: the file stays in the spool for the next ingest.
    return WalError(f"{error}; {name} and the WAL after it wait in {spool}, nothing is lost")


def _catalogue_next(server, spool, window, source, store, location, result):
    name, key, future = window.popleft()
    path = spool / name
    try:
        reader, size, sha256 = future.result()
    except StorageError as e:
        raise stays_in_spool(e, name, spool) from None
    try:
        check_segment_size(server, path, reader.size)  # what gpg got, whatever stat said
    except WalError:
        store.delete(key)  # never catalogued: nothing may look archived
        raise
    getattr(result, record(server, path, source, location, key, reader, size, sha256)).append(name)


def prepare(server, path: Path, store):
    """Before encrypting: "duplicates" or "conflicts" when the name is catalogued, else None.
    Raises WalError for a segment of the wrong size."""
    existing = WalSegment.objects.filter(server=server, name=path.name, deleted_at=None).first()
    if existing is not None:
        return _already_archived(server, path, existing)
    key = wal_key(server, path.name)
    if store.exists(key):
        store.delete(key)  # left by an ingest killed before it catalogued the file: nothing refers to it
    check_segment_size(server, path, path.stat().st_size)
    return None


def record(server, path: Path, source, location, key, reader, size, sha256):
    """Catalogue one encrypted file; returns "ingested" (or "duplicates" after a race)."""
    archived_at = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
    if SEGMENT.match(path.name) and not server.wal_segment_size:
        learn_segment_size(server, reader.size)
    try:
        with transaction.atomic():
            segment = catalogue(server, path.name, reader, key, archived_at, source)
            BackupCopy.record_made(location, key, size, sha256, wal_segment=segment, artifact="wal")
            plan_wal_copies(segment, key)
    except IntegrityError:  # another ingest catalogued it a moment ago
        return _already_archived(server, path, WalSegment.objects.get(server=server, name=path.name))
    mark_ingested(path.parent, path.name, segment.sha256)
    path.unlink()
    return "ingested"


def catalogue(server, name, reader, key, archived_at, source):
    fields = {
        "timeline": timeline_of(name),
        "segno": segno_of(name, server.wal_segment_size) if SEGMENT.match(name) else None,
        "size": reader.size,
        "sha256": reader.sha256.hexdigest(),
        "key": key,
        "archived_at": archived_at,
        "ingested_at": timezone.now(),
        "source": source,
        "deleted_at": None,
    }
    # A name retention deleted long ago can come back (re-archived): the row is reused.
    segment, _ = WalSegment.objects.update_or_create(server=server, name=name, defaults=fields)
    return segment


def check_segment_size(server, path: Path, size):
    """A full segment must be wal_segment_size long: a shorter one is truncated, and catalogued
    it would look good until a PITR needed it. It stays in the spool (and the WAL after it)."""
    if not SEGMENT.match(path.name):
        return
    expected = server.wal_segment_size
    if expected == size or (not expected and archive_wal.plausible_segment_size(size)):
        return  # an unknown size is learned from the first plausible segment (learn_segment_size)
    what = f"the {expected} bytes of {server}'s segments" if expected else "a power of two from 1 MiB to 1 GiB"
    raise WalError(
        f"WAL segment {path.name} is {size} bytes, not {what}: it is truncated or not a segment; "
        f"replace {path} with the whole segment from pg_wal on {server} (if it is gone, remove it and take a "
        "base backup: PITR cannot cross it); nothing after it is ingested until then"
    )


def learn_segment_size(server, size):
    if archive_wal.plausible_segment_size(size):
        Server.objects.filter(pk=server.pk).update(wal_segment_size=size)
        server.wal_segment_size = size
        publish_segment_size(server)


def encrypt_into(store, key, reader, encryption):
    """Stream `reader` through gpg into an atomic file (backups.streams). Returns (size, sha256) of the ciphertext."""
    try:
        return streams.encrypt_into(store, key, streams.Source(reader), encryption, WAL_COMPRESS_LEVEL)
    except streams.WriteFailed as e:
        raise WalError(f"cannot write {key} into the WAL archive: {e.error}") from None
    except streams.EncryptFailed as e:
        raise WalError(str(e)) from None


def _already_archived(server, path, existing):
    sha256 = archive_wal.sha256_of(path)  # the archive program's own: the same rule on both sides
    if sha256 == existing.sha256:
        mark_ingested(path.parent, path.name, sha256)
        path.unlink()
        return "duplicates"
    message = (
        f"WAL file {path.name} of {server} arrived again with different content (sha256 {sha256[:12]}, "
        f"archived {existing.sha256[:12]}): the archive keeps the first; it is left in {path.parent} to investigate"
    )
    write_error_marker(path.parent, path.name, "conflict", message)
    conditions.changed("archive_failing", server=server)
    return "conflicts"


def mark_ingested(spool: Path, name, sha256):
    """SPOOL/ingested/NAME holds the sha256: the archive program compares a re-archived file with it."""
    folder = spool / "ingested"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(sha256 + "\n")
    os.replace(tmp, folder / name)


def write_error_marker(spool: Path, name, reason, message):
    folder = spool / "errors"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"segment": name, "reason": reason, "message": message}))


def clear_error_marker(spool: Path, name):
    (spool / "errors" / f"{name}.json").unlink(missing_ok=True)


def _remove_stale_tmp(spool: Path):
    cutoff = time.time() - STALE_TMP.total_seconds()
    for entry in os.scandir(spool):
        if entry.name.endswith(".tmp") and entry.name.startswith(".") and entry.stat().st_mtime < cutoff:
            os.unlink(entry.path)


def plan_wal_copies(segment, key):
    """A pending copy on every secondary location (NAS, S3); the copy worker makes them."""
    for location in StorageLocation.objects.filter(enabled=True).exclude(kind=StorageLocation.Kind.PRIMARY):
        BackupCopy.objects.get_or_create(
            wal_segment=segment, location=location, defaults={"artifact": "wal", "key": key}
        )


def copy_pending(server, limit=1000):
    """Make the pending WAL copies of a server now (the foreground ingest calls this)."""
    from backups.copies import copy_one

    todo = BackupCopy.objects.filter(
        wal_segment__server=server, status__in=[BackupCopy.Status.PENDING, BackupCopy.Status.FAILED]
    ).select_related("location", "wal_segment")
    return [copy_one(c, journal_it=False) for c in todo.order_by("wal_segment__name")[:limit]]


# --------------------------------------------------------------------------- continuity


def present_segnos(server, first, last):
    return set(
        WalSegment.objects.filter(server=server, deleted_at=None, segno__gte=first, segno__lte=last).values_list(
            "segno", flat=True
        )
    )


def missing_segments(server, first, last):
    """Names of the segments absent from the catalog between two segment numbers, inclusive."""
    if last < first:
        return []
    present = present_segnos(server, first, last)
    missing = [s for s in range(first, last + 1) if s not in present]
    if not missing:
        return []
    size = server.wal_segment_size
    names = []
    for segno in missing[:20]:
        before = (
            WalSegment.objects.filter(server=server, deleted_at=None, segno__lt=segno)
            .order_by("-segno", "-timeline")
            .values_list("timeline", flat=True)
            .first()
        )
        names.append(segment_name(before or 1, segno, size))
    return names


def chain_segments(server, first, last):
    """The catalogued segment for each number from first to last: on the newest timeline that
    has it. Raises WalError naming the first missing one."""
    missing = missing_segments(server, first, last)
    if missing:
        raise WalError(f"WAL segment {missing[0]} is missing from the archive")
    rows = (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__gte=first, segno__lte=last)
        .order_by("segno", "timeline")
        .only("id", "name", "segno", "timeline", "size", "sha256", "archived_at")
    )
    chosen = {}
    for row in rows:
        chosen[row.segno] = row  # ordered by timeline: the newest wins
    return [chosen[s] for s in range(first, last + 1)]


def last_segno(server):
    return (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__isnull=False)
        .order_by("-segno")
        .values_list("segno", flat=True)
        .first()
    )


def oldest_kept_base(server):
    return server.runs.restorable_bases().order_by("start_wal", "finished_at").first()


def chain_gaps(server):
    """Missing segments since the oldest kept base backup (the window PITR can reach)."""
    base = oldest_kept_base(server)
    last = last_segno(server)
    if base is None or last is None or not server.wal_segment_size:
        return []
    return missing_segments(server, segno_of(base.start_wal, server.wal_segment_size), last)


def wait_for_wal(server, first, last, timeout):
    """Until every segment from first to last is catalogued (ingesting the spool meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        ingest(server)
        missing = missing_segments(server, first, last)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BackupFailed(
                f"WAL segment {missing[0]} was not archived within {timeout} s: "
                f"check archiving with `manage.py checkserver {server.name}`"
            )
        time.sleep(0.3)


# --------------------------------------------------------------------------- health


def error_markers(server):
    folder = spool_dir(server) / "errors"
    markers = []
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            try:
                markers.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                markers.append({"segment": path.stem, "reason": "failed", "message": f"unreadable marker {path}"})
    return markers


# What archiver_failure(), push_problems() and receiver_problem() return, when asked to, for a
# condition they cannot tell now: the server does not answer, or pg_receivewal has streamed too
# briefly to count as recovered. Unknown is neither a failure nor a recovery.
UNKNOWN = object()

ARCHIVER_SQL = "SELECT failed_count, last_failed_wal, last_failed_time, last_archived_time FROM pg_stat_archiver"
# The values PostgreSQL runs with (not what its configuration files say until a reload or restart).
ARCHIVING_SETTINGS_SQL = (
    "SELECT name, setting, pending_restart FROM pg_settings "
    "WHERE name IN ('archive_mode', 'archive_command', 'archive_library')"
)


def archiver_failure(server, unknown=None):
    """pg_stat_archiver's last failure when it is newer than its last success, else None."""
    import psycopg

    try:
        with server.connect() as conn:
            return _archiver_failure(conn)
    except psycopg.Error:
        return unknown  # the RPO check reports the server unreachable


def _archiver_failure(conn):
    failed_count, failed_wal, failed_at, archived_at = conn.execute(ARCHIVER_SQL).fetchone()
    if failed_count and failed_at and (archived_at is None or failed_at > archived_at):
        return f"PostgreSQL's archiver fails on {failed_wal} (last failure {timezone.localtime(failed_at):%Y-%m-%d %H:%M:%S})"
    return None


def push_problems(server, unknown=None):
    """Push: what the server says keeps its WAL from the portal (its settings, its archiver), as a list."""
    import psycopg

    try:
        with server.connect() as conn:
            running = {name: (value, pending) for name, value, pending in conn.execute(ARCHIVING_SETTINGS_SQL)}
            problems = [archiving_settings_problem(server, running), _archiver_failure(conn)]
    except psycopg.Error:
        return unknown
    return [p for p in problems if p]


def archiving_settings_problem(server, running):
    """The running setting that sends no WAL to the portal's spool, and what to do; None when all is set.

    `running` maps archive_mode, archive_command and archive_library to (setting, pending_restart)
    from pg_settings. With archive_mode off, or another archive_command, PostgreSQL reports no
    archiving failure at all: WAL simply never arrives, and only the RPO would tell, much later.
    """
    lines = f"`manage.py archivecommand {server.name}` prints the lines to set"
    mode, restart_pending = running["archive_mode"]
    if mode not in ("on", "always"):
        if restart_pending:
            return f"archive_mode is {mode} on {server}: a new value is in its configuration; restart PostgreSQL"
        return f"archive_mode is {mode} on {server}: set archive_mode = on and restart PostgreSQL ({lines})"
    reload = "then reload (SELECT pg_reload_conf())"
    library = running.get("archive_library", ("", False))[0]  # PostgreSQL 15 and newer
    if library:
        # The library, not archive_command, archives; its name is no secret.
        return (
            f"archive_library is {library} on {server}, so the portal's archive_command "
            f"is not used: ALTER SYSTEM RESET archive_library, {reload}"
        )
    command = running["archive_command"][0]
    if not is_portal_command(server, command):
        # Someone else's command is not repeated: it may hold a password or a key.
        what = "empty" if not command else "not the portal's"
        return (
            f"archive_command is {what} on {server}: no WAL reaches {spool_dir(server)}; "
            f"set it to what `manage.py archivecommand {server.name}` prints, {reload}"
        )
    return None


def receiver_problem(server, unknown=None):
    """Pull: the replication slot must exist and be in use by pg_receivewal, steadily.

    A stream younger than the supervisor's steadiness window is `unknown`: the receiver may be
    between two deaths (backups.receiver.steady is the one rule for both).
    """
    import psycopg

    from backups.receiver import steady

    try:
        with server.connect() as conn:
            row = conn.execute(
                # How long the walsender now holding the slot has been connected, by the server's clock.
                "SELECT s.active, extract(epoch FROM now() - a.backend_start)::float8 "
                "FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid "
                "WHERE s.slot_name = %s",
                [server.replication_slot],
            ).fetchone()
    except psycopg.Error:
        return unknown
    if row is None:
        return f"replication slot {server.replication_slot} does not exist: start `manage.py receivewal {server.name}`"
    active, streaming_for = row
    if not active:
        return (
            f"nothing streams from slot {server.replication_slot}: `manage.py receivewal {server.name}` is not running"
        )
    # backend_start is hidden only from another role (the portal's own role runs pg_receivewal): then steady.
    if streaming_for is not None and not steady(streaming_for):
        return unknown
    return None


def health(server):
    """What keeps the server's WAL from the archive: ({condition: message}, {conditions unknown}).

    The monitor (watching) calls it every minute and opens or resolves wal_gap,
    archive_failing and receiver_down from it; a condition that cannot be told now (the server
    does not answer) is unknown, neither found nor cleared.
    """
    findings, unknown = {}, set()
    gaps = chain_gaps(server)
    if gaps:
        findings["wal_gap"] = f"WAL gap in the archive of {server}: segment {gaps[0]} is missing; PITR cannot cross it"
    if server.archiving == Server.Archiving.PUSH:
        problems = push_problems(server, unknown=UNKNOWN)
        if problems is UNKNOWN:
            unknown.add("archive_failing")
            problems = []
    else:
        problems = []
    problems += [m.get("message") or f"{m.get('segment')}: {m.get('reason')}" for m in error_markers(server)]
    if problems:
        findings["archive_failing"] = "; ".join(problems)[:2000]
    if server.archiving == Server.Archiving.PULL:
        problem = receiver_problem(server, unknown=UNKNOWN)
        if problem is UNKNOWN:
            unknown.add("receiver_down")
        elif problem:
            findings["receiver_down"] = problem
    return findings, unknown
