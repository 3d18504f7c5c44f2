"""Ingest of a server's WAL spool into the archive (WAL_ROOT), the catalog and the other tiers.

`ingest()` catalogues each file of the spool (timeline, name, size, sha256, archive time),
encrypts it through gpg into the WAL location, records the copy, and only then removes it
from the spool: a worker killed at any moment loses nothing, it ingests again. What goes
wrong is left as a marker in the spool (SPOOL/errors/) for the monitor.
"""

import fcntl
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from backupportal import conditions, journal
from backupportal.lib.signing import SigningError
from backups import archive_wal, keyring, manifests, walkeys, walseal
from backups.copies import copy_one
from backups.crypto import EncryptionError
from backups.models import WAL_LOCATION, BackupCopy, LocationMoved, Server, StorageLocation, WalSegment
from backups.storage import StorageError, store_for
from backups.walcheck import check_segment_header, check_segment_size
from backups.walnames import SEGMENT, WalError, segno_of, timeline_of, wal_key
from backups.walspool import (
    clear_error_marker,
    clear_settled_conflicts,
    leave_spool,
    mark_ingested,
    open_lock,
    pending_names,
    publish_segment_size,
    remove_stale_tmp,
    sha256_of_wal_file,
    source_of,
    spool_dir,
    wal_file_size,
    write_error_marker,
)

logger = logging.getLogger(__name__)

# SPOOL/errors/ingest.json: the last ingest failed (the WAL location refused); removed by the next good one.
INGEST_MARKER = "ingest"
# SPOOL/errors/manifest.json: the last pass's signed manifest could not be written.
MANIFEST_MARKER = "manifest"
# The cores this process may use (a cpuset's or taskset's, not the host's), where the system says.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
# Segments compressed and encrypted at once by an ingest: a thread each (zstandard and
# backups.openpgp leave the GIL for the work; with GPG_RECIPIENTS a zstd and a gpg process). One
# more than the cores: each thread ends its segment waiting on the disk (the fsync), and with one
# per core the cores idled meanwhile. tests/test_wal_ingest_speed.py on 2 cores, 150 copies of a
# segment of the bench's WAL: 29.1-30.8 segments/s with two, 32.9-34.2 with three.
INGEST_WORKERS = max(2, min(8, CORES + 1))
# In a pass longer than this (seconds), the pending copies to NAS and S3 are made on the way, so a
# backlog does not hold the offsite copy back: below archive_timeout (checkserver asks <= 60 s).
COPY_EVERY = 30
# A pass keeps taking the WAL that arrives while it runs for this long (seconds), then leaves the
# rest to the next one: the pull receiver, which ingests between checks of pg_receivewal, waits no longer.
PASS_SECONDS = 50
LINGER_POLL = 0.5  # seconds between looks at a lingering pass's spool
# The worker's scheduled push pass has no such bound while WAL keeps coming: it ends when the next
# occurrence waits to take over (it holds HANDOVER's lock), so under sustained load one pass follows
# the other with no gap; ending at PASS_SECONDS left the spool unread until the next minute's
# schedule fired, up to 30 s late (bench/RESULTS.md: 43 s while a checkpoint burst filled it to
# 432 MiB). A pass whose successor does not come (every worker busy) ends after HANDOVER_BOUND
# seconds: the minute's cadence, the scheduler's lateness and a margin, so that passes queued
# behind a busy worker do not pile up, and the first free worker hands them over in turn.
HANDOVER = ".ingest.next"
HANDOVER_BOUND = 100
# A successor waits this long for the running pass to end: it looks between batches (a backlog's
# batch can take most of a minute), then writes its manifest; its last offsite copies are made
# after it lets go of the spool.
HANDOVER_WAIT = 120


@dataclass
class IngestResult:
    ingested: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    busy: bool = False
    copied_at: float = field(default_factory=time.monotonic)  # the pass's last offsite copies (COPY_EVERY)

    def as_dict(self):
        return {
            "ingested": len(self.ingested),
            "first": self.ingested[0] if self.ingested else None,
            "last": self.ingested[-1] if self.ingested else None,
            "duplicates": len(self.duplicates),
            "conflicts": self.conflicts,
            "busy": self.busy,
        }


def wal_location():
    location = StorageLocation.objects.filter(name=WAL_LOCATION, enabled=True).first()
    if location is None:
        try:
            StorageLocation.sync_from_settings()
        except LocationMoved:
            pass  # another location's settings moved (migrate says so): the WAL location is made
        location = StorageLocation.objects.get(name=WAL_LOCATION)
    return location


def ingest(server, actor="job:ingestwal", linger=0, wait=False):
    """Ingest everything in the server's spool. One ingest per spool at a time (flock). `linger`:
    the worker's schedule watches the spool that many seconds for more (WAL_INGEST_LINGER).
    `wait`: a running pass is asked to hand over and waited for (a restore about to plan)."""
    spool = spool_dir(server)
    result, manifest, ran = IngestResult(), None, False
    if not spool.is_dir():
        return result
    source = source_of(server)
    hand_over = linger > 0 and source == "push"
    try:
        lock_fd = open_lock(spool, ".ingest.lock")  # postgres can put anything in the spool: never followed
    except WalError as e:
        ingest_failed(server, spool, result, e)
        raise
    try:
        holds = locked(lock_fd)
        took_over = not holds and (hand_over or wait) and take_over(lock_fd, spool)
        if not (holds or took_over):
            result.busy = True
            return result
        result.copied_at = time.monotonic()  # the wait for a hand-over is not time spent copying
        publish_segment_size(server)  # for a server whose size was learned before the file existed
        names = pending_names(spool, source)
        # A pass that took over from a running one watches the spool even when it is empty now:
        # the one before it has just drained it, and WAL is still coming.
        ran = bool(names or took_over)
        if ran:
            try:
                _ingest_while_arriving(server, spool, names, source, result, linger if hand_over else 0)
            except WalError as e:
                ingest_failed(server, spool, result, e)
                raise
            finally:
                manifest = keep_manifest(server, spool, result.ingested)
        clear_error_marker(spool, INGEST_MARKER)
        clear_settled_conflicts(spool)
        remove_stale_tmp(spool)
    finally:
        os.close(lock_fd)  # before the offsite copies: a successor need not wait for NAS and S3
    if result.ingested:
        journal.record(
            "wal_ingested",
            actor=actor,
            obj=server,
            count=len(result.ingested),
            first=result.ingested[0],
            last=result.ingested[-1],
            manifest=manifest,
        )
    if ran:
        copy_pending(server)  # a failed copy stays pending for the copy worker; never fails the ingest
    return result


def locked(lock_fd):
    """True when this process now holds the spool's lock, False when another pass does."""
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def take_over(lock_fd, spool):
    """Wait, holding HANDOVER's lock, up to HANDOVER_WAIT seconds for the running pass to let go
    of the spool's: True once this process holds it. False at once when another successor waits
    already (it takes over), or when HANDOVER cannot be opened (the running pass goes on)."""
    wait_fd = _open_handover(spool)
    if wait_fd is None:
        return False
    try:
        # A few tries: the running pass's look (successor_waits) holds it for an instant.
        return _lock_within(wait_fd, 0.25) and _lock_within(lock_fd, HANDOVER_WAIT)
    finally:
        os.close(wait_fd)  # lets go of HANDOVER's lock: a pass that goes on sees nobody waiting


def _lock_within(fd, seconds):
    deadline = time.monotonic() + seconds
    while not locked(fd):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def successor_waits(spool):
    """True while the next pass waits to take over (it holds HANDOVER's lock)."""
    fd = _open_handover(spool)
    if fd is None:
        return False
    try:
        return not locked(fd)
    finally:
        os.close(fd)  # and with it the lock this look took


def _open_handover(spool):
    try:
        return open_lock(spool, HANDOVER)
    except (OSError, WalError):
        return None  # a spool that refuses it (or a link, or postgres's file): passes end as before, at their bound


def keep_manifest(server, spool, names):
    """The signed manifest of this pass's segments (backups.manifests) on every tier; its key, or
    None. A failure leaves a marker for the monitor and never fails the ingest: the segments are
    archived, but a fresh portal could not find them again (rebuildcatalog) until it is fixed."""
    if not names:
        return None
    try:
        key = manifests.write_for_wal(server, names, wal_location(), secondary_locations())
    except (StorageError, EncryptionError, SigningError, OSError) as e:
        message = f"the manifest of WAL {names[0]}..{names[-1]} of {server} cannot be written: {e}"
        write_error_marker(spool, MANIFEST_MARKER, "manifest_failed", message)
        conditions.changed("archive_failing", server=server)
        return None
    clear_error_marker(spool, MANIFEST_MARKER)
    return key


def _ingest_while_arriving(server, spool, names, source, result, linger=0):
    """Ingest `names`, then what the archive program added meanwhile, for up to PASS_SECONDS:
    under sustained load the spool is drained by one pass instead of waiting for the next
    schedule. With `linger` (the worker's push pass), an empty spool is watched that many seconds
    for more before the pass ends, and a pass taking WAL goes on until the next one takes over."""
    started = last_arrival = time.monotonic()
    seen = set()
    bound = HANDOVER_BOUND if linger else PASS_SECONDS
    while time.monotonic() - started <= bound and not (linger and successor_waits(spool)):
        if names:
            seen.update(names)
            _ingest_names(server, spool, names, source, result)
            last_arrival = time.monotonic()
        elif time.monotonic() - last_arrival >= linger:
            return
        else:
            copy_on_the_way(server, result)
            time.sleep(LINGER_POLL)
        names = [n for n in pending_names(spool, source) if n not in seen]  # a conflict is left, not retried


def _ingest_names(server, spool, names, source, result):
    """Ingest `names` in order. Up to INGEST_WORKERS of them are compressed and encrypted at once
    (backups.walseal); this thread alone checks and catalogues them, in order."""
    try:  # the key stays in the keyring until the batch is catalogued (keyring.writing)
        with keyring.writing("job:ingestwal") as custody:
            _ingest_with(custody, server, spool, names, source, result)
    except EncryptionError as e:  # a misconfiguration (only the key raises it): one message
        raise WalError(str(e)) from None


def _ingest_with(custody, server, spool, names, source, result):
    location = wal_location()
    store = store_for(location)
    try:
        encryption = walkeys.writing(custody, server, [location, *secondary_locations()])
    except walkeys.WalKeyError as e:  # the WAL location refused the key file: as it would the segments
        raise stays_in_spool(e, names[0], spool) from None

    def encrypt(path, key):
        reader, size, sha256 = walseal.seal(store, key, path, encryption, server.wal_segment_size)
        return reader, size, sha256, {"key_id": encryption.key_id, "encryption_key_id": encryption.custody_key}

    window = deque()  # (name, key, future) in name order: encrypting, or encrypted and not yet examined
    catalogued = catalogued_names(server, names)
    sysid = manifests.known_system_identifier(server)  # the cluster its backups are of, asked once a pass

    def catalogue_until(size):
        """Catalogue the oldest until `size` remain in flight, and those already encrypted besides,
        in one transaction: one commit (with SQLite, several fsyncs) for several segments."""
        ready, failure = [], None
        try:
            while window and (len(window) > size or window[0][2].done()):
                try:
                    ready.append(_checked_next(server, spool, window, store))
                except WalError as e:
                    failure = e  # those before it are good: catalogued before it stops the ingest
                    break
        except BaseException:
            for _, key, *_ in ready:  # examined, never catalogued
                forget_encrypted(store, key)
            raise
        # A failed transaction leaves their files: a commit that fails may still have gone through
        # (the connection lost), and then the catalog refers to them. Not catalogued, the next pass
        # removes a file left under a name before it encrypts it again (prepare).
        with transaction.atomic() if ready else nullcontext():
            outcomes = record_batch(server, spool, source, location, ready) if ready else []
        for (name, _, reader, *_), outcome in zip(ready, outcomes, strict=True):
            getattr(result, outcome).append(name)
            if outcome == "ingested":  # out of the spool only once the catalog has it for good
                leave_spool(spool / name, reader.sha256.hexdigest())
        if failure is not None:
            raise failure

    with ThreadPoolExecutor(max_workers=INGEST_WORKERS) as pool:
        try:
            for name in names:
                if time.monotonic() - result.copied_at > COPY_EVERY:
                    catalogue_until(0)
                    copy_on_the_way(server, result)
                try:
                    outcome = prepare(server, spool / name, store, catalogued, sysid)
                except (WalError, StorageError, OSError) as e:
                    catalogue_until(0)  # those before it are good: catalogued before it stops the ingest
                    if not isinstance(e, WalError):
                        raise stays_in_spool(e, name, spool) from None
                    raise
                if outcome:
                    getattr(result, outcome).append(name)
                    continue
                key = wal_key(server, name)
                window.append((name, key, pool.submit(encrypt, spool / name, key)))
                if failed_ahead(window):
                    catalogue_until(0)  # raises at it: a full disk stops the pass, not the encryption of a backlog
                elif len(window) >= 3 * INGEST_WORKERS or encrypted_in_a_row(window) >= INGEST_WORKERS:
                    # At least INGEST_WORKERS segments a transaction, and up to twice as many still
                    # in flight, so the workers stay busy while this thread catalogues. Catalogued
                    # one at a time (as they were when the window was kept just full), each segment
                    # cost this thread ~6 ms of statements and SQLite's commit (cProfile, 100 segments).
                    catalogue_until(2 * INGEST_WORKERS)
            catalogue_until(0)
        except BaseException:
            for _, key, future in window:  # never catalogued: nothing refers to what they wrote
                if not future.cancel():  # one not started wrote nothing
                    future.exception()  # until it ends: one that failed may have renamed its file
                    forget_encrypted(store, key)
            raise


def encrypted_in_a_row(window):
    """How many of the oldest in flight are encrypted already, with no gap."""
    count = 0
    for _, _, future in window:
        if not future.done():
            break
        count += 1
    return count


def failed_ahead(window):
    return any(future.done() and future.exception() is not None for _, _, future in window)


def forget_encrypted(store, key):
    """Remove what was encrypted and never catalogued. Best effort: the next pass removes a file
    left under a name it is about to encrypt (prepare), and nothing refers to it meanwhile."""
    try:
        store.delete(key)
    except (StorageError, OSError) as e:
        logger.warning("cannot remove %s, encrypted and never catalogued (the next pass will): %s", key, e)


def ingest_failed(server, spool, result, error):
    """What the monitor must keep seeing until an ingest succeeds: a marker, which it reads now."""
    message = f"WAL of {server} cannot be ingested: {error}"
    if result.ingested:
        message += f" (ingested up to {result.ingested[-1]} before it failed)"
    try:
        write_error_marker(spool, INGEST_MARKER, "ingest_failed", message)
    except (OSError, WalError):
        pass  # the spool itself refuses (or errors/ is not a directory): the error raised says why
    conditions.changed("archive_failing", server=server)


def stays_in_spool(error, name, spool):
    # Before the catalog and the unlink: the file stays in the spool for the next ingest.
    return WalError(f"{error}; {name} and the WAL after it wait in {spool}, nothing is lost")


def _checked_next(server, spool, window, store):
    """The oldest segment in flight, encrypted and of the right size: (name, key, reader, size, sha256, keys)."""
    name, key, future = window[0]  # left in the window while waiting: an interrupt removes what it wrote
    path = spool / name
    try:
        reader, size, sha256, keys = future.result()
    except WalError:
        raise
    except Exception as e:  # noqa: BLE001 - a full disk's OSError, zstd's: those before it are catalogued
        raise stays_in_spool(e, name, spool) from None
    window.popleft()
    try:
        check_segment_size(server, path, reader.size)  # what gpg got, whatever stat said
    except WalError:
        forget_encrypted(store, key)  # never catalogued: nothing may look archived
        raise
    return name, key, reader, size, sha256, keys


def catalogued_names(server, names, batch=500):
    """Which of `names` the catalog holds (retention's deleted ones included), a few queries for a pass."""
    found = set()
    for start in range(0, len(names), batch):
        chunk = names[start : start + batch]
        found.update(WalSegment.objects.filter(server=server, name__in=chunk).values_list("name", flat=True))
    return found


def prepare(server, path: Path, store, catalogued, sysid=""):
    """Before encrypting: "duplicates" or "conflicts" when the name is catalogued, else None.
    Raises WalError for a segment of the wrong size, or written by another cluster than `sysid`
    (its backups'). `catalogued`: catalogued_names() of the pass."""
    existing = None
    if path.name in catalogued:
        existing = WalSegment.objects.filter(server=server, name=path.name, deleted_at=None).first()
    if existing is not None:
        return _already_archived(server, path, existing)
    key = wal_key(server, path.name)
    if store.exists(key):
        store.delete(key)  # left by an ingest killed before it catalogued the file: nothing refers to it
    check_segment_size(server, path, wal_file_size(path, server.wal_segment_size))  # a link, a FIFO: WalError
    check_segment_header(server, path, sysid)
    return None


def record_batch(server, spool, source, location, ready):
    """Catalogue the encrypted files `ready` [(name, key, reader, size, sha256, keys)]: their outcomes
    ("ingested" ...), in order. New names take three statements for the whole batch (one catalog
    write per segment cost the ingest ~0.02 s each, measured); a name the catalog already has (one
    retention deleted, re-archived; a race) or a server whose segment size is not known yet goes
    through record(), one by one."""
    names = [name for name, *_ in ready]
    known = set(WalSegment.objects.filter(server=server, name__in=names).values_list("name", flat=True))
    if not server.wal_segment_size or not connection.features.can_return_rows_from_bulk_insert:
        known = set(names)
    fresh = [item for item in ready if item[0] not in known]
    try:
        with transaction.atomic():
            _bulk_record(server, spool, source, location, fresh)
    except IntegrityError:  # another ingest catalogued one of them a moment ago
        known.update(names)
    return [
        record(server, spool / item[0], source, location, *item[1:]) if item[0] in known else "ingested"
        for item in ready
    ]


def _bulk_record(server, spool, source, location, fresh):
    if not fresh:
        return
    now, secondaries = timezone.now(), secondary_locations()
    segments = WalSegment.objects.bulk_create(
        WalSegment(server=server, **segment_fields(server, name, reader, key, archived_time(spool / name), source, now))
        for name, key, reader, *_ in fresh
    )
    copies = []
    for segment, (_, key, _, size, sha256, keys) in zip(segments, fresh, strict=True):
        encoded = copy_fields(keys)
        copies.append(BackupCopy.made(location, key, size, sha256, wal_segment=segment, artifact="wal", **encoded))
        copies += [
            BackupCopy(wal_segment=segment, location=to, artifact="wal", key=key, **encoded) for to in secondaries
        ]
    BackupCopy.objects.bulk_create(copies)


def archived_time(path: Path):
    return datetime.fromtimestamp(path.lstat().st_mtime, tz=UTC)


def copy_fields(keys):
    """What a WAL copy records of its encryption: its data key id, the keyring's key that wraps it."""
    keys = keys or {}
    return {
        "key_id": keys.get("key_id", ""),
        "encryption_key_id": keys.get("encryption_key_id") or None,
        "compression": walseal.WAL_COMPRESSION,
    }


def record(server, path: Path, source, location, key, reader, size, sha256, keys=None):
    """Catalogue one encrypted file; returns "ingested" (or "duplicates" after a race, then
    already out of the spool). `keys`: its WAL data key id and the keyring's key that wraps it."""
    archived_at = archived_time(path)
    if SEGMENT.match(path.name) and not server.wal_segment_size:
        learn_segment_size(server, reader.size)
    try:
        with transaction.atomic():
            segment = catalogue(server, path.name, reader, key, archived_at, source)
            encoded = copy_fields(keys)
            BackupCopy.record_made(location, key, size, sha256, wal_segment=segment, artifact="wal", **encoded)
            plan_wal_copies(segment, key, encoded)
    except IntegrityError:  # another ingest catalogued it a moment ago
        return _already_archived(server, path, WalSegment.objects.get(server=server, name=path.name))
    return "ingested"  # the caller takes it out of the spool (leave_spool) once its transaction committed


def catalogue(server, name, reader, key, archived_at, source):
    fields = segment_fields(server, name, reader, key, archived_at, source, timezone.now())
    # A name retention deleted long ago can come back (re-archived): the row is reused, and the
    # tombstones of its deleted copies give way to the new ones (one copy a location: a probe saw
    # the new one collide with the old, the segment then taken for a duplicate and left deleted).
    segment, _ = WalSegment.objects.update_or_create(server=server, name=name, defaults=fields)
    segment.copies.filter(status=BackupCopy.Status.DELETED).delete()
    return segment


def segment_fields(server, name, reader, key, archived_at, source, now):
    return {
        "name": name,
        "timeline": timeline_of(name),
        "segno": segno_of(name, server.wal_segment_size) if SEGMENT.match(name) else None,
        "size": reader.size,
        "sha256": reader.sha256.hexdigest(),
        "key": key,
        "archived_at": archived_at,
        "ingested_at": now,
        "source": source,
        "deleted_at": None,
    }


def learn_segment_size(server, size):
    if archive_wal.plausible_segment_size(size):
        Server.objects.filter(pk=server.pk).update(wal_segment_size=size)
        server.wal_segment_size = size
        publish_segment_size(server)


def _already_archived(server, path, existing):
    sha256 = sha256_of_wal_file(path, server.wal_segment_size)  # the archive program's rule, never through a link
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


def secondary_locations():
    """Where WAL is copied after the WAL location: every enabled tier but the primary (NAS, S3)."""
    return list(StorageLocation.objects.filter(enabled=True).exclude(kind=StorageLocation.Kind.PRIMARY))


def plan_wal_copies(segment, key, encoded):
    """A pending copy on every secondary location (NAS, S3); the copy worker makes them."""
    for location in secondary_locations():
        BackupCopy.objects.get_or_create(
            wal_segment=segment, location=location, defaults={"artifact": "wal", "key": key, **encoded}
        )


def copy_on_the_way(server, result):
    """In a pass longer than COPY_EVERY, the copies due: a long pass (a backlog, sustained load)
    must not hold back the offsite copies, nor wait long on a location that is down, as it holds
    the spool (the pass's last copies, after it lets go, and the copy worker retry those)."""
    if time.monotonic() - result.copied_at > COPY_EVERY:
        copy_pending(server, on_the_way=True)
        result.copied_at = time.monotonic()


# Seconds a pass spends at most on the copies it makes on its way, holding the spool.
ON_THE_WAY_BUDGET = 10


def copy_pending(server, limit=1000, on_the_way=False):
    """Make the pending WAL copies of a server now (the foreground ingest calls this), in enabled
    locations. `on_the_way`: only where no copy waits for its next attempt (a location that is
    down), one failure stopping a location, for at most ON_THE_WAY_BUDGET seconds."""
    todo = BackupCopy.objects.filter(
        wal_segment__server=server,
        status__in=[BackupCopy.Status.PENDING, BackupCopy.Status.FAILED],
        location__enabled=True,
    ).select_related("location", "wal_segment")
    if not on_the_way:
        return [copy_one(c, journal_it=False) for c in todo.order_by("wal_segment__name")[:limit]]
    backing_off = BackupCopy.objects.filter(
        wal_segment__server=server, status=BackupCopy.Status.FAILED, next_attempt_at__gt=timezone.now()
    ).values("location")
    made, failing, deadline = [], set(), time.monotonic() + ON_THE_WAY_BUDGET
    for copy in todo.exclude(location__in=backing_off).order_by("wal_segment__name")[:limit]:
        if time.monotonic() > deadline:
            break
        if copy.location_id in failing:
            continue
        made.append(copy_one(copy, journal_it=False))
        if made[-1].status == BackupCopy.Status.FAILED:
            failing.add(copy.location_id)
    return made
