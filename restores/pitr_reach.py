"""Does the archived WAL reach a PITR's target time? Answered before anything is written.

Recovery to a time stops only at a commit (or abort) record stamped after the target. Without
one in the archive, recovery replays all there is and ends short of the target, without
whatever was committed before it but not yet archived. So the archive is read (pg_waldump, in
a private scratch directory, removed at once) for the first commit after the target. When
there is none, the source server is asked for its clock and, when the restore runs, for one
small transaction and a WAL switch; the restore waits until that segment is archived and
catalogued, then recovers through it. A source that cannot be reached, whose clock is before
the target, or whose role may not switch WAL, refuses the restore, naming how far the archive
reaches.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
from django.conf import settings
from django.utils import timezone

from backupportal import journal
from backupportal.lib.pgerrors import explain
from backups import walchain, walingest, walnames, walspool
from backups.binaries import MissingBinaries, backup_major, cluster_dir
from backups.copies import decrypt_here
from backups.crypto import Encryption
from backups.models import Server, WalSegment
from backups.streams import FetchFailed, FileSink, readable
from restores.models import RestoreRun
from restores.pitr_plan import Refused, RestoreFailed

# Archive times and commit times come from different clocks (pull: the portal's): a segment
# archived this long before the target is still read for commits after it.
CLOCK_MARGIN = timedelta(minutes=5)
COMMIT_LINE = re.compile(
    r"lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: (?:COMMIT|ABORT)\S*(?: \d+:)? "
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC"
)
# How far back the archive is read for its last transaction when the target lies past it.
LOOK_BACK_SEGMENTS = 64
PROGRESS_EVERY_S = 5


@dataclass
class Commit:
    segno: int  # the last segment read when it was seen: replaying the record needs it
    lsn: str
    at: datetime


# ----------------------------------------------------------------------------- reading WAL


def waldump(bin_dir, directory, first_name, last_name, rmgr):
    """pg_waldump's lines for the segments first_name..last_name in directory (times in UTC)."""
    proc = subprocess.run(
        [str(Path(bin_dir) / "pg_waldump"), "--path", str(directory), f"--rmgr={rmgr}", first_name, last_name],
        capture_output=True,
        text=True,
        env={"TZ": "UTC", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=600,
    )
    # It exits non-zero at the end of the last segment's valid records: that is expected.
    return proc.stdout.splitlines()


def commits(bin_dir, directory, first_name, last_name):
    """(lsn, commit time) of every commit and abort record in those segments."""
    found = []
    for line in waldump(bin_dir, directory, first_name, last_name, "Transaction"):
        m = COMMIT_LINE.search(line)
        if m:
            found.append((m.group(1), datetime.fromisoformat(m.group(2) + "+00:00")))
    return found


class Scratch:
    """Archived segments decrypted into a private directory, for reading only; removed on exit."""

    def __init__(self, plan):
        self.plan, self.encryption = plan, None

    def __enter__(self):
        self.path = Path(tempfile.mkdtemp(prefix="bp-pitr-scan-"))  # mode 0700
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)

    def fetch(self, segment):
        """The segment's plaintext (sha256 checked) in the scratch directory; bad copies marked."""
        self.encryption = self.encryption or Encryption()
        copies = readable(segment.copies.select_related("location"))
        sink = FileSink(self.path / segment.name)
        try:
            self.plan.notes += decrypt_here(
                copies, sink, self.encryption, f"WAL segment {segment.name}", segment.sha256
            )
        except FetchFailed as e:
            raise Refused(str(e)) from None

    def commits(self, first_name, last_name):
        try:
            bin_dir = cluster_dir(backup_major(self.plan.base), f"reading the WAL of {self.plan.server}")
        except MissingBinaries as e:
            raise Refused(str(e)) from None
        return commits(bin_dir, self.path, first_name, last_name)


def chain(plan, first, last):
    """The catalogued segments first..last up to the first missing one, and a Refused naming that
    one (None without a gap): raised only if the search gets there, as a gap after the target
    must not refuse a restore that never needs the WAL beyond it."""
    gap, missing = None, walchain.missing_segments(plan.server, first, last, plan.lineage)
    if missing:
        last = plan.segno(missing[0]) - 1
        gap = Refused(
            f"WAL segment {missing[0]} is missing from the archive: the WAL chain to the target "
            f"{plan.target.text} has a gap there"
        )
    return walchain.chain_segments(plan.server, first, last, plan.lineage), gap


def scan(plan, first, last):
    """The first commit after the target in segments first..last, and the last one before it."""
    moment, before, previous, seen = plan.target.value, None, None, set()
    if last is None or last < first:
        return None, None
    segments, gap = chain(plan, first, last)
    with Scratch(plan) as scratch:
        for segment in segments:
            scratch.fetch(segment)
            # From the segment before when there is one: a record may start there and end here.
            start = previous.name if previous and previous.timeline == segment.timeline else segment.name
            found = scratch.commits(start, segment.name)
            if start != segment.name and not any(in_segment(plan, lsn, segment) for lsn, _ in found):
                # pg_waldump stops at the first bad record: an unreadable segment before this
                # one must not hide this one's commits.
                found += scratch.commits(segment.name, segment.name)
            for lsn, at in sorted(found, key=lambda c: walnames.lsn_to_int(c[0])):
                if lsn in seen:
                    continue
                seen.add(lsn)
                if at > moment:
                    return Commit(segment.segno, lsn, at), before
                before = Commit(segment.segno, lsn, at)
            if previous is not None:
                (scratch.path / previous.name).unlink(missing_ok=True)
            previous = segment
    if gap is not None:
        raise gap
    return None, before


def in_segment(plan, lsn, segment):
    return walnames.segno_of_lsn(lsn, plan.segment_size) == segment.segno


def scan_partial(plan, partial):
    """Pull: the first commit after the target in the segment pg_receivewal is still receiving."""
    with Scratch(plan) as scratch:
        name = partial.name[:24]
        shutil.copyfile(partial, scratch.path / name)
        for lsn, at in scratch.commits(name, name):
            if at > plan.target.value:
                return Commit(plan.segno(name), lsn, at)
    return None


def last_commit_before(plan, first):
    """The newest archived commit in the segments before `first`, read backwards (bounded)."""
    floor = max(plan.segno(plan.base.start_wal), first - LOOK_BACK_SEGMENTS)
    for segno in range(first - 1, floor - 1, -1):
        _, before = scan(plan, segno, segno)
        if before is not None:
            return before
    return None


# ----------------------------------------------------------------------------- before writing


def scan_start(plan):
    """The first segment that can hold a commit after the target: none archived well before it
    can, nor any before the base backup's end (it stopped before the target)."""
    floor = plan.segno(plan.base.end_wal)
    first = (
        WalSegment.objects.filter(
            server=plan.server,
            deleted_at=None,
            segno__gte=floor,
            archived_at__gte=plan.target.value - CLOCK_MARGIN,
        )
        .order_by("segno")
        .values_list("segno", flat=True)
        .first()
    )
    return first if first is not None else (walchain.last_segno(plan.server, plan.lineage) or floor) + 1


def cover(plan):
    """A time target: plan.last through the first archived commit after it; or, when the archive
    holds none, plan.switch (the restore asks the source for one). Refused when neither can be had."""
    first, last = scan_start(plan), walchain.last_segno(plan.server, plan.lineage)
    after, before = scan(plan, first, last)
    if after is None:
        partial = partial_for(plan, (last or 0) + 1)
        after = scan_partial(plan, partial) if partial is not None else None
        plan.use_partial = after is not None
    if after is not None:
        # No more than that: recovery stops there, and a gap further on must not refuse it.
        plan.last = max(plan.segno(plan.base.end_wal), after.segno if not plan.use_partial else after.segno - 1)
        plan.after_lsn, plan.after_time = after.lsn, after.at
        return
    plan.reach = reach_text(plan, before or last_commit_before(plan, first))
    ask_source(plan)
    plan.switch = True


def reach_text(plan, before):
    if before is None:
        return f"it holds no transaction after base backup #{plan.base.pk} that a time target can stop at"
    return f"it reaches targets before {local(before.at)}, when its last archived transaction committed"


def local(moment):
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S.%f%z}"


def ask_source(plan):
    """The source's clock and its right to switch WAL; Refused when it cannot help."""
    server, target = plan.server, plan.target
    short = f"the archived WAL of {server} ends before {target.text}: {plan.reach}"
    try:
        with server.connect() as conn:
            now, may_switch, role = conn.execute(
                "SELECT now(), has_function_privilege('pg_switch_wal()', 'EXECUTE'), current_user"
            ).fetchone()
    except psycopg.Error as e:
        raise Refused(
            f"{short}; {server} cannot be reached to archive what came after ({explain(e, server)}): "
            "choose an earlier target, or retry when it answers"
        ) from None
    if target.value > now:
        raise Refused(f"the target time {target.text} is after the current time of {server} ({local(now)})")
    if not may_switch:
        raise Refused(f"{short}; {role} may not switch WAL on {server}: {grant(role)}, or choose an earlier target")
    plan.notes.append(f"{server}'s clock read {local(now)} when the restore was planned")


def grant(role):
    quoted = role if re.fullmatch(r"[a-z_][a-z0-9_$]*", role) else '"' + role.replace('"', '""') + '"'
    return f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {quoted}"


def partial_for(plan, segno):
    """Pull: the segment pg_receivewal is still writing, when it is the one after the archive."""
    if plan.server.archiving != Server.Archiving.PULL:
        return None
    spool = walspool.spool_dir(plan.server)
    if not spool.is_dir():
        return None
    for path in sorted(spool.glob("*.partial"), reverse=True):
        if walnames.SEGMENT.match(path.name[:24]) and walnames.segno_of(path.name, plan.segment_size) == segno:
            return path
    return None


# ----------------------------------------------------------------------------- when it runs


def archive_past_target(plan, run):
    """Have the source commit one transaction after the target and switch WAL; wait until that
    segment is archived and catalogued; set plan.last through it. Nothing is written before."""
    server = plan.server
    xid, lsn, name = commit_and_switch(plan)
    note = f"committed transaction {xid} on {server} and switched WAL at {lsn}: segment {name} holds its commit"
    plan.notes.append(note)
    journal.record(
        "pitr_wal_switched", actor=run.requested_by or "job:restore", obj=run, server=server.name, xid=xid, lsn=lsn,
        segment=name, target=plan.target.text,
    )  # fmt: skip
    end = walnames.segno_of(name, plan.segment_size)
    wait_catalogued(plan, run, name)
    after, _ = scan(plan, min(scan_start(plan), end), end)
    if after is None:
        raise RestoreFailed(
            f"no commit after {plan.target.text} is in the archived WAL through {name}, although transaction "
            f"{xid} committed on {server} after it: recovery could not prove it reached the target"
        )
    plan.last = max(plan.segno(plan.base.end_wal), after.segno)
    plan.after_lsn, plan.after_time = after.lsn, after.at


def commit_and_switch(plan):
    """One transaction that takes an id (its commit writes a commit record, stamped after the
    target: a WAL switch alone writes none), then pg_switch_wal()."""
    server = plan.server
    try:
        with server.connect() as conn:
            with conn.transaction():
                xid = conn.execute("SELECT pg_current_xact_id()").fetchone()[0]
            lsn, name = conn.execute("SELECT lsn, pg_walfile_name(lsn) FROM pg_switch_wal() AS lsn").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        raise RestoreFailed(
            f"the archived WAL of {server} ends before {plan.target.text}: {plan.reach}; "
            f"{server.user} may not switch WAL: {grant(server.user)}, or choose an earlier target"
        ) from None
    except psycopg.Error as e:
        raise RestoreFailed(
            f"the archived WAL of {server} ends before {plan.target.text}: {plan.reach}; "
            f"cannot switch WAL on {server} ({explain(e, server)})"
        ) from None
    return str(xid), str(lsn), name


def wait_catalogued(plan, run, name):
    """Ingest the spool (or let a worker do it) until segment `name` is catalogued, bounded. By its
    name, timeline and all: another timeline's segment of the same number (a copy restored by hand
    that archives into production's spool) ended the wait early, and the restore then failed on a
    gap that one more ingest pass would have filled."""
    server, limit = plan.server, settings.WAL_WAIT_SECONDS
    started = time.monotonic()
    shown = started - PROGRESS_EVERY_S
    while not WalSegment.objects.filter(server=server, deleted_at=None, name=name).exists():
        waited = time.monotonic() - started
        if waited > limit:
            raise RestoreFailed(
                f"WAL segment {name}, switched to hold a commit after {plan.target.text}, was not archived "
                f"within {limit} s (WAL_WAIT_SECONDS): check archiving with manage.py checkserver {server.name}; "
                f"without it {plan.reach}"
            )
        if time.monotonic() - shown >= PROGRESS_EVERY_S:
            shown = time.monotonic()
            progress(
                run, plan, f"waiting for WAL segment {name} to be archived and ingested: {waited:.0f} s of {limit}"
            )
        try:
            walingest.ingest(server, actor="job:restore")  # busy when a worker ingests it: then it is the worker's
        except walnames.WalError as e:
            raise RestoreFailed(f"the WAL after the target cannot be ingested: {e}") from None
        time.sleep(0.3)
    plan.notes.append(f"segment {name} archived and ingested after {time.monotonic() - started:.1f} s")


def progress(run, plan, line):
    """What the restore waits for: to whoever runs it (plan.report) and on the run (its notes)."""
    plan.report(line)
    RestoreRun.objects.filter(pk=run.pk).update(
        notes="\n".join([*plan.notes, line])[:5000], heartbeat_at=timezone.now()
    )
