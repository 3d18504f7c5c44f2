"""What a PITR checks so that the restored cluster is production's past and touches nothing else.

- The data directory: never inside another cluster's data directory or a tablespace, nor in the
  portal's own storage (BACKUP_ROOT, WAL_ROOT, WAL_SPOOL, NAS_ROOT, the locations, the var/
  directory beside SANDBOX_ROOT): check_datadir.
- The timeline: production's, asked of the server when it answers, else its newest base
  backup's; WAL is chosen along that timeline's history only, never from a timeline some other
  cluster archived into the same spool: production_lineage.
- Tablespaces: replaying CREATE TABLESPACE ... LOCATION '/x' makes the restored cluster write
  into /x, the source's own directory. Every segment is read by pg_waldump --rmgr=Tablespace
  before recovery may have it (the prefetcher's threads call tablespace_creations); one that
  creates a tablespace stops the restore and is never handed over.
- The WAL archived before the restore: catalogued first, waiting for an ingest pass already
  running; a spool still holding WAL when the wait ends refuses it, as a restore planned on the
  catalog alone would stop before that WAL and call it the end: ingest_first.
- A restore point name used more than once: recovery would stop at the first silently, so the
  restore is refused, listing each: duplicate_restore_points.
"""

import errno
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from backupportal.lib.osuser import DB_OS_USER, only_root_can_change
from backups import timelines, walingest, walnames, walspool
from backups.models import StorageLocation, WalSegment
from backups.walnames import WalError
from restores.pitr_plan import Refused, RestoreFailed

# ----------------------------------------------------------------------------- the data directory

CLUSTER_FILES = ("PG_VERSION", "postmaster.pid")
TABLESPACE_VERSION_DIR = re.compile(r"^PG_\d+_\d+$")  # what CREATE TABLESPACE makes in its location


def check_datadir(into_datadir) -> Path:
    if not into_datadir:
        raise Refused("give --into-datadir: an empty or missing directory for the new cluster")
    datadir = Path(into_datadir).absolute()
    if datadir.is_symlink():  # its owner and mode change: those of whatever it points at
        raise Refused(f"{datadir} is a symbolic link: give the directory it points to")
    if datadir.exists():
        if not datadir.is_dir():
            raise Refused(f"{datadir} is a file: give an empty or missing directory")
        if any(datadir.iterdir()):
            raise Refused(f"{datadir} is not empty: give an empty or missing directory (a restore never overwrites)")
    elif not datadir.parent.is_dir():
        raise Refused(f"{datadir.parent} does not exist: create it, or choose another place")
    refuse_portal_storage(datadir)
    refuse_inside_a_cluster(datadir)
    if os.geteuid() == 0:
        uid, gid = walspool.db_user_ids(DB_OS_USER)
        existing = datadir if datadir.exists() else datadir.parent
        blocked = walspool.unreachable_by(existing, uid, gid)
        if blocked is not None:
            raise Refused(
                f"the {DB_OS_USER} user cannot reach {datadir} ({blocked} is closed to it): choose another place"
            )
        refuse_parents_it_could_change(datadir)
    return datadir


def refuse_parents_it_could_change(datadir):
    """The new cluster's directory is the database OS user's (PostgreSQL requires it), and the
    portal, as root, writes into it, empties it on failure and gives it back: from a parent
    another user could change (its own, one it may write, even a sticky one when it is the
    direct parent, whose entry would be that user's), that user could rename the directory and
    put a link to any other in its place, for root to write into, empty or chmod."""
    for parent in datadir.parents:
        if why := only_root_can_change(parent, direct=datadir.parent):
            raise Refused(
                f"{parent} {why}, and {datadir} will be the {DB_OS_USER} OS user's: from there it could swap that"
                " directory for a link while the portal (root) writes into it; choose a place whose parent"
                f" directories only root can change (say /srv/restores/{datadir.name}, or under SANDBOX_ROOT)"
            )


def portal_storage():
    """(directory, what it is) of everything the portal keeps on this host."""
    places = [
        (settings.BACKUP_ROOT, "BACKUP_ROOT"),
        (settings.WAL_ROOT, "WAL_ROOT"),
        (settings.WAL_SPOOL, "the WAL spool (WAL_SPOOL)"),
        (settings.KEYRING_DIR, "the keyring (KEYRING_DIR)"),
        (settings.SIGNING_KEY_DIR, "the signing key (SIGNING_KEY_DIR)"),
        (settings.PITR_STAGING_ROOT, "the WAL staging of PITRs (PITR_STAGING_ROOT)"),
    ]
    if settings.NAS_ROOT:
        places.append((settings.NAS_ROOT, "NAS_ROOT"))
    for name, path in StorageLocation.objects.exclude(path="").values_list("name", "path"):
        places.append((path, f"storage location {name}"))
    return [(Path(p).resolve(), what) for p, what in places]


def refuse_portal_storage(datadir):
    real = datadir.resolve()
    for place, what in portal_storage():
        if real.is_relative_to(place):
            raise Refused(f"{datadir} is inside {what} ({place}): choose a directory outside the portal's storage")
    # SANDBOX_ROOT is where the portal's own clusters go; the rest of its var/ directory (the
    # catalog's database, keys, spools) is not a place for one.
    var, sandboxes = Path(settings.VAR_DIR).resolve(), Path(settings.SANDBOX_ROOT).resolve()
    if real.is_relative_to(var) and not (real.is_relative_to(sandboxes) and real != sandboxes):
        raise Refused(
            f"{datadir} is inside the portal's var directory ({var}): choose a directory under SANDBOX_ROOT "
            f"({sandboxes}) or outside the portal"
        )


def refuse_inside_a_cluster(datadir):
    """No parent is a data directory (PG_VERSION, postmaster.pid), a tablespace (PG_15_...) or a
    WAL directory (pg_wal, or one initdb --waldir made: archive_status, segments), as the path is
    written or with its links followed: a/data/pg_wal/x resolves into another cluster's WAL
    directory, outside its data directory."""
    parents = dict.fromkeys([*Path(os.path.abspath(datadir)).parents, *datadir.resolve().parents])
    for parent in parents:
        for name in CLUSTER_FILES:
            try:
                os.stat(parent / name)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise Refused(f"cannot look into {parent} ({e.strerror}): choose another place") from None
            raise Refused(
                f"{datadir} is inside the data directory of another cluster ({parent} holds {name}): "
                "choose a directory outside every cluster"
            )
        names = names_in(parent)
        if TABLESPACE_VERSION_DIR.match(parent.name) or any(TABLESPACE_VERSION_DIR.match(n) for n in names):
            raise Refused(f"{datadir} is inside a tablespace's directory ({parent}): choose a directory outside it")
        if parent.name == "pg_wal" or any(n == "archive_status" or walnames.WAL_FILE.match(n) for n in names):
            raise Refused(f"{datadir} is inside a cluster's WAL directory ({parent}): choose a directory outside it")


def names_in(directory):
    """The names in `directory`; none when it is not listable by us (a tablespace or WAL there
    would be no place we could write either)."""
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries]
    except OSError:
        return []


# ----------------------------------------------------------------------------- the timeline


def production_lineage(server, bases, segment_size):
    """(walchain.Lineage of the timeline production is on, the base backups on it, notes).

    Production's timeline is the one the server says it is on when it answers (as the cluster
    whose system identifier its backups recorded), else its newest base backup's (BackupRun.
    timeline, read from the backup manifest's WAL-Ranges). Another timeline in the archive (a
    copy restored from a base backup and archiving into production's spool) is left aside
    and named in a note; the archive keeps its files.
    """
    try:
        lineage, why = timelines.production_lineage(server, bases, segment_size)
    except WalError as e:
        raise Refused(str(e)) from None
    timeline, live = lineage.timeline, not why
    notes = []
    if why:
        notes.append(
            f"{server} could not be asked which timeline it is on ({why}): following timeline {timeline}, "
            f"its newest base backup's"
        )
    on_it = [b for b in bases if timelines.on_lineage(lineage, b)]
    left = [b for b in bases if b not in on_it]
    if not on_it:
        raise Refused(
            f"no kept base backup of {server} is on the timeline it is on ({timeline}, history {lineage}): "
            f"take one with backup {server.name} --kind base"
        )
    if left:
        ids = ", ".join(f"#{b.pk} (timeline {b.timeline})" for b in left)
        notes.append(f"base backups not on production's timeline history ({lineage}) are not used: {ids}")
    archived = WalSegment.objects.filter(server=server, deleted_at=None).order_by().values_list("timeline", flat=True)
    foreign = sorted(set(archived.distinct()) - set(lineage.timelines))
    if foreign:
        names = ", ".join(map(str, foreign))
        notes.append(
            f"WAL of timeline {names} in the archive is not on production's history ({lineage}): ignored. "
            "A copy restored by hand that archives into production's spool makes such a timeline; its files "
            "stay in the archive (nothing quarantines them)"
            + ("" if live else f"; if {server} was promoted onto it, take a base backup and restore again")
        )
    return lineage, on_it, notes


def history_names(lineage):
    """The history files recovery needs to follow the lineage (none for timeline 1)."""
    return [f"{tli:08X}.history" for tli in lineage.timelines if tli > 1]


# ----------------------------------------------------------------------------- tablespaces

# pg_waldump's record for XLOG_TBLSPC_CREATE (tblspcdesc.c): desc: CREATE <oid> "<location>".
# The location is printed as it is: it may hold line breaks (and a Python line end such as \r or
# \x1c), so a record is found by its start, at a line's start before its location is printed, and
# its location runs to the quote that ends the record. A location that fakes another record can
# only add one: nothing in it can hide the record it is printed in.
CREATE_RECORD = re.compile(
    r'^rmgr: Tablespace [^\n]*?lsn: ([0-9A-F]+/[0-9A-F]+),[^\n]*?desc: CREATE (\d+) "(.*?)" *(?=\nrmgr: |\n?\Z)',
    re.M | re.S,
)
# pg_waldump's ways of saying the WAL it was given ends before its last byte (the end of the
# valid WAL, the zeros after a WAL switch, a segment that only continues a record): normal.
WAL_ENDS = ("error in WAL record at", "could not find a valid record after")
# Where the valid WAL of one segment read alone ends, and why: a whole archived segment reads to
# its end or to a WAL switch (zeros after it); one that stops before is damaged from there.
UNREADABLE = re.compile(r"error in WAL record at ([0-9A-F]+/[0-9A-F]+): (.*)")
# A CREATE TABLESPACE record is at most about 1.1 kB (its path is at most MAXPGPATH): one that
# ends in a segment began within this many bytes before it, and ends within as many after.
TAIL = 64 << 10


class TablespaceInWal(RestoreFailed):
    """The WAL creates a tablespace: replaying it would write into the source's directory."""


def tablespace_creations(waldump, directory, name, previous, segment_size, unreadable=None):
    """(LSN, oid, location) of each tablespace created by a record that ends in segment `name`:
    those that begin in it, and one that begins at the end of `previous` (the segment before,
    both plaintext in `directory`; None for the first one replayed). RestoreFailed when
    pg_waldump cannot read them. Where pg_waldump stopped reading `name` before its end goes into
    the dict `unreadable`, as name: (LSN, why)."""
    segno = walnames.segno_of(name, segment_size)
    scratch = Path(tempfile.mkdtemp(prefix=".check-", dir=directory))
    try:
        os.link(Path(directory) / name, scratch / name)
        # Apart from the end of the one before: pg_waldump reading from there stops at the first
        # record it cannot read (the zeros after a WAL switch) without looking at this one.
        found = dump(waldump, scratch, [name, name], name, unreadable)
        if previous is not None:
            # Under the timeline of `name`: pg_waldump reads one timeline's files, and at a switch
            # the child's segment continues the parent's.
            first = walnames.segment_name(walnames.timeline_of(name), segno - 1, segment_size)
            os.link(Path(directory) / previous, scratch / first)
            boundary, tail = segno * segment_size, min(TAIL, segment_size)
            found += dump(waldump, scratch, [lsn_option("start", boundary - tail), lsn_option("end", boundary + tail),
                                             first, name], name)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sorted(set(found), key=lambda f: walnames.lsn_to_int(f[0]))


def lsn_option(name, position):
    return f"--{name}={position >> 32:X}/{position & 0xFFFFFFFF:X}"


def dump(waldump, directory, args, name, unreadable=None):
    proc = subprocess.run(
        [str(waldump), "--path", str(directory), "--rmgr=Tablespace", *args],
        capture_output=True,  # bytes: text mode would read a location's \r as a line break
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=300,
    )
    stderr = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 and not any(end in stderr for end in WAL_ENDS):
        error = (stderr.strip().splitlines() or ["it failed"])[-1]
        raise RestoreFailed(f"WAL segment {name} could not be checked for tablespaces: pg_waldump: {error}")
    stopped = UNREADABLE.search(stderr) if proc.returncode != 0 else None
    if stopped and unreadable is not None:
        unreadable[name] = stopped.groups()
    # A location need not be UTF-8 (a SQL_ASCII server's).
    return [m.groups() for m in CREATE_RECORD.finditer(proc.stdout.decode(errors="replace"))]


def refusal(name, creations):
    lsn, oid, location = creations[0]
    return TablespaceInWal(
        f"WAL segment {name} creates a tablespace in {printable(location)} (oid {oid}, at LSN {lsn}): replaying it would "
        f"write into that directory, which is the source cluster's; the portal does not restore clusters with "
        f"tablespaces physically: restore their databases from a logical backup (restore RUN_ID --into-database "
        f"NEWDB --tablespace-map OLD=NEW), or choose a target before the tablespace was created"
    )


def printable(location):
    """The location on one line: as it is, or quoted with its control characters escaped."""
    return location if location.isprintable() else repr(location)


# ----------------------------------------------------------------------------- restore points

POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
XLOG_RESTORE_POINT = 0x70
RECORD_HEADER = struct.Struct("<IIQBBxxI")  # XLogRecord: tot_len, xid, prev, info, rmid, crc


def duplicate_restore_points(plan, found):
    """Refused when the restore point's name occurs more than once in `found`, (LSN, creation
    time) of each occurrence in the WAL searched: recovery would stop at the first, whichever was meant."""
    seen = sorted(set(found), key=lambda f: walnames.lsn_to_int(f[0]))
    if len(seen) < 2:
        return
    each = []
    for lsn, at in seen:
        when = timezone.localtime(at).isoformat(sep=" ", timespec="milliseconds") if at else "time unreadable"
        each.append(f"{lsn} ({when})")
    raise Refused(
        f"restore point {plan.target.value!r} was created {len(seen)} times in the WAL archived since base backup "
        f"#{plan.base.pk}: at {', '.join(each)}; recovery would stop at the first of them: restore to the one "
        f"you mean with --target-lsn LSN instead"
    )


def restore_point(plan, lsn, printed):
    """(creation time or None, name) of the restore point at `lsn`, the name as recovery compares
    it (byte for byte), read from the record: pg_waldump's line ends at a line break in it, and
    a trailing blank is easily lost. `printed`, pg_waldump's, where the record runs into the
    next segment."""
    segno = walnames.segno_of_lsn(lsn, plan.segment_size)
    record = restore_point_record(plan.unchecked / plan.staged[segno], lsn, plan.segment_size)
    return record if record else (None, printed)


def restore_point_record(path, lsn, segment_size):
    """(rp_time, rp_name) of the XLOG_RESTORE_POINT record at `lsn` in the segment file `path`,
    or None (a record that does not read as one, or that runs into the next segment)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < 40:
        return None
    block = struct.unpack_from("<I", data, 36)[0]  # the long page header's xlp_xlog_blcksz
    offset = walnames.lsn_to_int(lsn) % segment_size
    record = bytearray()
    while len(record) < 128 and offset < len(data):
        if offset % block == 0:
            offset += 40 if offset == 0 else 24  # the page header (long at a segment's start)
            continue
        take = min(128 - len(record), block - offset % block, len(data) - offset)
        record += data[offset : offset + take]
        offset += take
    return restore_point_in(bytes(record))


def restore_point_in(record):
    if len(record) < RECORD_HEADER.size + 2:
        return None
    _, _, _, info, rmid, _ = RECORD_HEADER.unpack_from(record)
    if rmid != 0 or info & 0xF0 != XLOG_RESTORE_POINT:
        return None
    at = RECORD_HEADER.size
    while at < len(record):
        block_id = record[at]
        if block_id == 253:  # XLR_BLOCK_ID_ORIGIN
            at += 3
        elif block_id == 252:  # XLR_BLOCK_ID_TOPLEVEL_XID
            at += 5
        elif block_id == 255:  # XLR_BLOCK_ID_DATA_SHORT: the main data follows
            at += 2
            break
        elif block_id == 254:  # XLR_BLOCK_ID_DATA_LONG
            at += 5
            break
        else:
            return None
    end = record.find(b"\0", at + 8)  # rp_name: char[MAXFNAMELEN], NUL-terminated
    if at + 8 > len(record) or end < 0:
        return None
    micros = struct.unpack_from("<q", record, at)[0]
    return POSTGRES_EPOCH + timedelta(microseconds=micros), record[at + 8 : end].decode("utf-8", "replace")


def ingest_first(server, latest=True, wait=None):
    """Catalogue what the server archived so far, before a restore plans on the catalog: a pass
    already running (the worker's) is asked to hand over and waited for, up to `wait` seconds
    (walingest.HANDOVER_WAIT). Returns warnings. WAL still left in the spool behind another pass,
    or that cannot be ingested, refuses a restore to the `latest` WAL, which would stop before it;
    one to an earlier target (a time, a name, a base backup's own end in a restore test) is only warned."""
    wait = walingest.HANDOVER_WAIT if wait is None else wait
    deadline = time.monotonic() + wait
    while True:
        try:
            result = walingest.ingest(server, actor="job:restore", wait=True)
        except walnames.WalError as e:  # marked for the monitor by the ingest
            if latest:  # "the end of the archived WAL" would be short of what production archived
                raise Refused(
                    f"WAL of {server} could not be ingested before the restore ({e}): --target latest would stop "
                    "before it, short of what the server archived; restore to a time or LSN before it, or once it is ingested"
                ) from None
            # An earlier target goes as far as catalogued: past it, the plan finds the chain short.
            return [
                f"WAL of {server} could not be ingested before the restore ({e}): the copy ends at the WAL catalogued"
            ]
        if not result.busy:
            return []
        left = walspool.pending_names(walspool.spool_dir(server), walspool.source_of(server))
        if not left:
            return []
        if time.monotonic() >= deadline:
            waiting = (
                f"{len(left)} archived WAL segments of {server} still wait in its spool behind another ingest pass"
            )
            if latest:
                raise Refused(f"{waiting}, after {wait} s: the restore would stop before them; try again once it ends")
            return [f"{waiting}: a target in them is not seen by this restore"]
        time.sleep(1)
