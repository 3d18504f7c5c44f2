"""Achieved RPO: the age of the oldest WAL written but not yet archived (0 when all is archived).

Push (archive_command): the archive's end is the end of pg_stat_archiver.last_archived_wal
(PostgreSQL archives segments in order, so everything before it is archived too), or the end of
the newest segment the ingest has catalogued, whichever is lower: a segment in the spool only is
plaintext in one place, on no tier, and no restore uses it.
Pull (pg_receivewal): the archive's end is what the receiver has flushed (its walsender's
flush_lsn) or, while it is away, what its replication slot says it had confirmed.

PostgreSQL does not say when a WAL record was written, so the monitor dates unarchived WAL
itself (RpoStatus.points, pending_lsn / pending_since): see RpoStatus. An idle server whose last
segment was switched and archived has nothing unarchived, so it is never in breach.
"""

import re
from datetime import datetime, timedelta

import psycopg
from django.utils import timezone

from backupportal.lib.pgerrors import explain
from backups.models import WalSegment
from watching.models import RpoSample, RpoStatus

# Passes further apart than this (the monitor runs every minute) date new WAL at the pass before.
MONITOR_GAP = timedelta(minutes=5)
# Points kept to date unarchived WAL (about two hours of passes a minute apart); beyond, pairs merge.
MAX_POINTS = 120

ARCHIVER_SQL = """
SELECT pg_is_in_recovery(), current_setting('archive_mode'),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       last_archived_wal, failed_count, last_failed_wal, last_failed_time
FROM pg_stat_archiver
"""
CURRENT_SQL = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, pg_walfile_name(pg_current_wal_lsn())"
# The portal's own slot only: a standby's slot (or another tool's) says nothing of the archive.
RECEIVED_SQL = """
SELECT max(lsn) FROM (
    SELECT (r.flush_lsn - '0/0'::pg_lsn)::bigint AS lsn
    FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %(slot)s
    UNION ALL
    SELECT (restart_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = %(slot)s
) positions
"""
SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")


class Unmeasurable(Exception):
    """The RPO cannot be told now (server unreachable, a standby): the message says why."""


def segment_end_lsn(name, segment_size):
    """The LSN just past a WAL segment, from its file name; None for history or partial files."""
    match = SEGMENT.match(name or "")
    if not match:
        return None
    log, seg = int(match[2], 16), int(match[3], 16)
    return (log * (0x100000000 // segment_size) + seg + 1) * segment_size


def read_positions(server):
    """(write position, archived-through position or None, facts for the message) from the server."""
    with server.connect(options="-c statement_timeout=10000") as conn:
        recovery, archive_mode, segment_size, archived_wal, failed, failed_wal, failed_at = conn.execute(
            ARCHIVER_SQL
        ).fetchone()
        if recovery:
            raise Unmeasurable("it is a standby (in recovery): its RPO is measured on its primary")
        current_lsn, current_wal = conn.execute(CURRENT_SQL).fetchone()
        if server.archiving == server.Archiving.PULL:
            archived_lsn = conn.execute(RECEIVED_SQL, {"slot": server.replication_slot}).fetchone()[0]
            archived_wal = ""
        else:
            archived_lsn = segment_end_lsn(archived_wal, segment_size) if archive_mode != "off" else None
            if archived_lsn is None and archive_mode != "off" and archived_wal:
                # A .backup (or .history) file, archived after the segments before it: every base
                # backup left the server so, and an idle one read "nothing archived", its RPO the
                # hours since and rpo_breached open (a probe's finding). The catalog says how far.
                archived_lsn = catalogued_end(server, segment_size)
    facts = {
        "current_wal": current_wal,
        "archived_wal": archived_wal or "",
        "archive_mode": archive_mode,
        "failed": failed if failed_wal and failed_wal > (archived_wal or "") else 0,
        "failed_wal": failed_wal,
        "failed_at": failed_at,
    }
    if archived_lsn is not None:
        pulled = server.archiving == server.Archiving.PULL
        archived_lsn = catalogued_through(server, segment_size, archived_lsn, facts, partial_too=pulled)
    return current_lsn, archived_lsn, facts


def catalogued_end(server, segment_size):
    """The LSN just past the newest catalogued segment, None when none is."""
    segno = (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__isnull=False)
        .order_by("-segno")
        .values_list("segno", flat=True)
        .first()
    )
    return None if segno is None else (segno + 1) * segment_size


def catalogued_through(server, segment_size, spooled_lsn, facts, partial_too=False):
    """The archive's end: where the spool ends, or the newest catalogued segment's end when that
    is lower (None when none is catalogued); facts then name both. Pull (`partial_too`): the
    segment pg_receivewal is still receiving counts once every one before it is catalogued (a
    PITR reads the partial file), not completed segments the ingest has not caught."""
    newest = (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__isnull=False)
        .order_by("-segno")
        .values_list("name", "segno")
        .first()
    )
    catalogued = (newest[1] + 1) * segment_size if newest else None
    needed = spooled_lsn - spooled_lsn % segment_size if partial_too else spooled_lsn
    if catalogued is not None and catalogued >= needed or (catalogued is None and partial_too):
        return spooled_lsn  # (pull, nothing catalogued yet: the archive begins in the partial)
    facts["spooled_wal"], facts["archived_wal"] = facts["archived_wal"], newest[0] if newest else ""
    return catalogued


def measure(server):
    """Measure and store the server's achieved RPO; returns its RpoStatus (seconds None if unknown)."""
    status, _ = RpoStatus.objects.get_or_create(server=server)
    now = timezone.now()
    try:
        current_lsn, archived_lsn, facts = read_positions(server)
    except psycopg.Error as e:
        return _unknown(status, now, explain(e, server))
    except Unmeasurable as e:
        return _unknown(status, now, str(e))
    # WAL first seen now was written since the pass before: when that pass is long ago (the monitor
    # was stopped), it may be as old as it, and is dated so (the worst case), never as new.
    seen = _first_possible(server, status.measured_at, now)
    status.measured_at, status.error = now, ""
    status.current_wal, status.archived_wal = facts["current_wal"], facts["archived_wal"]
    if archived_lsn is not None and current_lsn <= archived_lsn:
        status.points, status.pending_lsn, status.pending_since, status.seconds = [], None, None, 0.0
    else:
        status.points = unarchived_points(status, current_lsn, archived_lsn, seen)
        status.pending_lsn, since = status.points[0]
        status.pending_since = datetime.fromisoformat(since)
        status.seconds = (now - status.pending_since).total_seconds()
        if status.seconds < 0:  # the clock stepped back (NTP): a negative age resolved an open breach
            return _unknown(
                status,
                now,
                f"the portal's clock reads {now:%Y-%m-%d %H:%M:%S %Z}, before the WAL pending since "
                f"{status.pending_since:%Y-%m-%d %H:%M:%S %Z} was first seen: measured again once it has caught up",
            )
    status.facts = facts
    status.save()
    RpoSample.record(server, now, status.seconds)
    return status


def _first_possible(server, previous, now):
    """When WAL first seen unarchived now may have been written: now, as passes go a minute apart;
    after a longer gap (the monitor stopped) the pass before, the worst case, or later, when the
    archive's end moved since (the newest segment handed over then: none before it waits)."""
    if previous is None or now - previous <= MONITOR_GAP:
        return now
    moved = (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__isnull=False)
        .order_by("-segno")
        .values_list("archived_at", flat=True)
        .first()
    )
    return min(now, max(previous, moved)) if moved else previous


def unarchived_points(status, current_lsn, archived_lsn, now):
    """The status's points past the archive's end, with the write position now if it moved. The
    first is when WAL past the archive's end was first seen: an archive that caught up only part of
    the way leaves the WAL after it as old as that, not new."""
    points = status.points or (
        [[status.pending_lsn, status.pending_since.isoformat()]] if status.pending_lsn is not None else []
    )
    points = [p for p in points if archived_lsn is None or p[0] > archived_lsn]
    if not points or current_lsn > points[-1][0]:
        points.append([current_lsn, now.isoformat()])
    while len(points) > MAX_POINTS:
        # Two points become one: the later position, the earlier time (older, never younger).
        merged = [[b[0], a[1]] for a, b in zip(points[0::2], points[1::2], strict=False)]
        points = merged + (points[-1:] if len(points) % 2 else [])
    return points


def _unknown(status, now, error):
    status.measured_at, status.seconds, status.error = now, None, error
    status.facts = {}
    status.save(update_fields=["measured_at", "seconds", "error"])
    return status


def describe(status):
    """One or two sentences for the alert: how old the unarchived WAL is and what is failing."""
    server, facts = status.server, getattr(status, "facts", {})
    since = timezone.localtime(status.pending_since)
    text = (
        f"WAL of {server} written before {since:%Y-%m-%d %H:%M:%S} is still not archived: "
        f"achieved RPO {round(status.seconds / 60, 1)} min against an objective of {server.rpo_minutes} min "
        f"(writing {facts.get('current_wal') or '?'}, archived through {facts.get('archived_wal') or 'nothing yet'})."
    )
    if facts.get("spooled_wal"):
        text += (
            f" The spool holds WAL through {facts['spooled_wal']} that the ingest has not encrypted and catalogued:"
            " is the worker running (manage.py ingestwal, qcluster)?"
        )
    if facts.get("archive_mode") == "off":
        text += " archive_mode is off on the server."
    elif facts.get("failed"):
        at = timezone.localtime(facts["failed_at"])
        text += f" The archive command fails on {facts['failed_wal']} (last failure {at:%H:%M:%S})."
    return text
