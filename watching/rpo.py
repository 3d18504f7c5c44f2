"""Achieved RPO: the age of the oldest WAL written but not yet archived (0 when all is archived).

Push (archive_command): the archive's end is the end of pg_stat_archiver.last_archived_wal;
PostgreSQL archives segments in order, so everything before it is archived too.
Pull (pg_receivewal): the archive's end is what the receiver has flushed (its walsender's
flush_lsn) or, while it is away, what its replication slot says it had confirmed.

PostgreSQL does not say when a WAL record was written, so the monitor dates unarchived WAL
itself (RpoStatus.pending_lsn / pending_since): see RpoStatus. An idle server whose last
segment was switched and archived has nothing unarchived, so it is never in breach.
"""

import re

import psycopg
from django.utils import timezone

from backupportal.lib.pgerrors import explain
from watching.models import RpoSample, RpoStatus

# pg_receivewal names itself so unless told otherwise; the portal's libpq clients say "backupportal".
RECEIVER_NAMES = ("pg_receivewal", "backupportal")

ARCHIVER_SQL = """
SELECT pg_is_in_recovery(), current_setting('archive_mode'),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       last_archived_wal, failed_count, last_failed_wal, last_failed_time
FROM pg_stat_archiver
"""
CURRENT_SQL = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, pg_walfile_name(pg_current_wal_lsn())"
RECEIVED_SQL = """
SELECT max(lsn) FROM (
    SELECT (flush_lsn - '0/0'::pg_lsn)::bigint AS lsn FROM pg_stat_replication WHERE application_name = ANY(%s)
    UNION ALL
    SELECT (restart_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_type = 'physical'
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
            archived_lsn = conn.execute(RECEIVED_SQL, [list(RECEIVER_NAMES)]).fetchone()[0]
            archived_wal = ""
        else:
            archived_lsn = segment_end_lsn(archived_wal, segment_size) if archive_mode != "off" else None
    facts = {
        "current_wal": current_wal,
        "archived_wal": archived_wal or "",
        "archive_mode": archive_mode,
        "failed": failed if failed_wal and failed_wal > (archived_wal or "") else 0,
        "failed_wal": failed_wal,
        "failed_at": failed_at,
    }
    return current_lsn, archived_lsn, facts


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
    status.measured_at, status.error = now, ""
    status.current_wal, status.archived_wal = facts["current_wal"], facts["archived_wal"]
    if archived_lsn is not None and current_lsn <= archived_lsn:
        status.pending_lsn, status.pending_since, status.seconds = None, None, 0.0
    elif status.pending_lsn is not None and (archived_lsn is None or archived_lsn < status.pending_lsn):
        # WAL that was already written when we first saw it is still not archived.
        status.seconds = (now - status.pending_since).total_seconds()
    else:
        status.pending_lsn, status.pending_since, status.seconds = current_lsn, now, 0.0
    status.facts = facts
    status.save()
    RpoSample.record(server, now, status.seconds)
    return status


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
    if facts.get("archive_mode") == "off":
        text += " archive_mode is off on the server."
    elif facts.get("failed"):
        at = timezone.localtime(facts["failed_at"])
        text += f" The archive command fails on {facts['failed_wal']} (last failure {at:%H:%M:%S})."
    return text
