"""What keeps a server's WAL from the archive: a gap, a failing archiver or archive_command,
an error marker in the spool, an idle replication slot; and what makes the server keep WAL in
pg_wal for nothing: a pull server's own archiver failing, the portal's slot left after pull.

The monitor (watching) turns health() into the wal_gap, archive_failing, receiver_down and
slot_left_over alerts.
"""

import json
from datetime import UTC, datetime, timedelta

import psycopg
from django.conf import settings
from django.utils import timezone

from backups import walnames
from backups.models import Server
from backups.receiver import SLOT_ROW, slot_invalidated, steady
from backups.timelines import chain_gaps
from backups.walspool import is_portal_command, pending_names, read_small_file, spool_dir


def error_markers(server):
    """The spool's error markers. postgres may write in errors/ (the archive program's markers):
    each is read never through a link, nor past a marker's size (a link to /dev/zero, or to a
    file of the portal's, is an unreadable marker, never its contents in an alert)."""
    folder = spool_dir(server) / "errors"
    markers = []
    if folder.is_dir() and not folder.is_symlink():
        for path in sorted(folder.glob("*.json")):
            text = read_small_file(path, most=MARKER_BYTES)
            try:
                markers.append(json.loads(text) if text is not None and len(text) <= MARKER_BYTES else None)
            except ValueError:
                markers.append(None)
            if not isinstance(markers[-1], dict):
                markers[-1] = {"segment": path.stem, "reason": "failed", "message": f"unreadable marker {path}"}
    return markers


MARKER_BYTES = 64 * 1024  # a marker is a line of JSON

# A segment in the spool longer than this was taken by no ingest (it runs every minute): the
# worker is down, and the WAL sits in plaintext in one place, on no tier.
SPOOL_STALE = timedelta(minutes=10)


def waiting_in_spool(server, now=None):
    """A sentence when the oldest WAL file ready to ingest has waited longer than SPOOL_STALE.
    A file the ingest left on purpose (a conflict, a refusal) has its error marker, which says why:
    not counted here, as the worker that left it is running."""
    spool = spool_dir(server)
    try:
        names = [n for n in pending_names(spool, server.archiving) if not (spool / "errors" / f"{n}.json").exists()]
        oldest = min(((spool / n).lstat().st_mtime, n) for n in names) if names else None
    except OSError:
        return ""  # no spool yet, or a file ingested meanwhile: the next pass looks again
    if oldest is None:
        return ""
    since = datetime.fromtimestamp(oldest[0], tz=UTC)
    if (now or timezone.now()) - since < SPOOL_STALE:
        return ""
    more = f" ({len(names) - 1} more after it)" if len(names) > 1 else ""
    return (
        f"WAL segment {oldest[1]} has waited in the spool since {timezone.localtime(since):%Y-%m-%d %H:%M}{more}:"
        " no ingest took it (is the worker, manage.py qcluster, running?); until then it is on no tier and no"
        " restore uses it"
    )


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
    try:
        with server.connect() as conn:
            # How long the walsender now holding the slot has been connected, by the server's clock.
            row = conn.execute(SLOT_ROW, [server.replication_slot]).fetchone()
    except psycopg.Error:
        return unknown
    if row is None:
        return f"replication slot {server.replication_slot} does not exist: start `manage.py receivewal {server.name}`"
    active, streaming_for, columns = row
    if invalidated := slot_invalidated(server, columns):
        return "; ".join(invalidated)
    if not active:
        return (
            f"nothing streams from slot {server.replication_slot}: `manage.py receivewal {server.name}` is not running"
        )
    # backend_start is hidden only from another role (the portal's own role runs pg_receivewal): then steady.
    if streaming_for is not None and not steady(streaming_for):
        return unknown
    return None


# A pull server's own archiver (archive_mode on, an archive_command left from push or the DBA's
# own) that fails keeps every segment in pg_wal until it succeeds: the disk fills. With nothing
# archived for PULL_ARCHIVER_GRACE_SECONDS (the server's clock) it is no passing failure.
# Quiet since the last success, the statistics' reset or PostgreSQL's start, whichever is latest:
# archive_mode takes a restart, so an archiver cannot have failed since before the server started
# (a server up for days, never archived, turned on with a failing command is no alert at once).
ARCHIVER_QUIET_SQL = (
    "SELECT last_failed_wal, last_failed_time, last_archived_time, "
    "now() - greatest(last_archived_time, stats_reset, pg_postmaster_start_time()) FROM pg_stat_archiver"
)
TURN_OFF = "turn archive_mode off (ALTER SYSTEM SET archive_mode = off, then restart PostgreSQL)"


def pull_archiver_problems(server, unknown=None):
    """Pull: the server's own archiver, which the portal does not use, keeping WAL in pg_wal, as a list."""
    try:
        with server.connect() as conn:
            running = {name: value for name, value, _ in conn.execute(ARCHIVING_SETTINGS_SQL)}
            if running["archive_mode"] not in ("on", "always"):
                return []  # nothing kept for an archiver (also when stats still show old failures)
            quiet = conn.execute(ARCHIVER_QUIET_SQL).fetchone()
    except psycopg.Error:
        return unknown
    pulled = f"the portal pulls the WAL of {server} with pg_receivewal and needs no archiving there"
    if not running.get("archive_library") and not running["archive_command"]:
        # PostgreSQL records no failure then: it keeps the WAL "until a command is provided".
        return [
            f"archive_mode is {running['archive_mode']} on {server} with no archive_command: pg_wal keeps every "
            f"segment for it and grows until the disk is full; {pulled}: {TURN_OFF}"
        ]
    failed_wal, failed_at, archived_at, quiet_for = quiet
    grace = timedelta(seconds=settings.PULL_ARCHIVER_GRACE_SECONDS)
    if not failed_at or (archived_at is not None and archived_at >= failed_at) or quiet_for < grace:
        return []
    since = f"since {_at(archived_at)}" if archived_at else "since its statistics began"
    return [
        f"PostgreSQL's own archiver on {server} fails on {failed_wal} (last failure {_at(failed_at)}, nothing "
        f"archived {since}): pg_wal keeps every segment until archive_command succeeds and grows until the disk is "
        f"full; {pulled}: fix the archive_command, or {TURN_OFF}"
    ]


def _at(moment):
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S}"


# The portal's slot as the server sees it: who streams, and how much WAL it keeps from recycling.
LEFT_SLOT_SQL = (
    "SELECT active_pid, (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() "
    "END - restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = %s"
)


def slot_left_over(server, unknown=None):
    """Push or no archiving: the portal's replication slot, left from pull, still on the server.

    Nothing advances an idle slot: the server keeps every segment after its restart_lsn for ever
    (the classic disk-full outage). It is not dropped for the DBA: until push archives without a
    gap, it may hold the only copy of WAL the receiver had not yet taken.
    """
    slot = server.replication_slot
    try:
        with server.connect() as conn:
            row = conn.execute(LEFT_SLOT_SQL, [slot]).fetchone()
    except psycopg.Error:
        return unknown
    if row is None:
        return None
    pid, held = row
    doing = "pushes its WAL with archive_command" if server.archiving == Server.Archiving.PUSH else "archives no WAL"
    left = f"replication slot {slot} is left on {server} from pull archiving ({server} now {doing})"
    holds = f"holds back {held / 2**20:.1f} MB of WAL in pg_wal" if held is not None else "holds no WAL now"
    drop = f"SELECT pg_drop_replication_slot('{slot}')"
    if pid:
        return (
            f"{left} and pg_receivewal still streams from it (pid {pid}); it {holds}: "
            f"stop `manage.py receivewal {server.name}`, then drop the slot on the server ({drop})"
        )
    return (
        f"{left}: nothing streams from it and it {holds}, more with every write, until the disk is full; "
        f"once the archive has no gap, drop it on the server ({drop})"
    )


def missing_file(name):
    """A missing WAL file with its timeline: after a failover two timelines hold the same numbers."""
    if name.endswith(".history"):
        return f"history file {name} (timeline {walnames.timeline_of(name)})"
    return f"segment {name} (timeline {walnames.timeline_of(name)})"


def health(server):
    """What keeps the server's WAL from the archive: ({condition: message}, {conditions unknown}).

    The monitor (watching) calls it every minute and opens or resolves wal_gap,
    archive_failing, receiver_down and slot_left_over from it; a condition that cannot be told now (the server
    does not answer) is unknown, neither found nor cleared.
    """
    findings, unknown = {}, set()
    gaps = chain_gaps(server)
    if gaps:
        findings["wal_gap"] = (
            f"WAL gap in the archive of {server}: {missing_file(gaps[0])} is missing; PITR cannot cross it"
        )
    if server.archiving == Server.Archiving.PUSH:
        problems = push_problems(server, unknown=UNKNOWN)
    elif server.archiving == Server.Archiving.PULL:
        problems = pull_archiver_problems(server, unknown=UNKNOWN)
    else:
        problems = []
    if problems is UNKNOWN:
        unknown.add("archive_failing")
        problems = []
    problems += [m.get("message") or f"{m.get('segment')}: {m.get('reason')}" for m in error_markers(server)]
    if waiting := waiting_in_spool(server):
        problems.append(waiting)
    if problems:
        findings["archive_failing"] = "; ".join(problems)[:2000]
    if server.archiving == Server.Archiving.PULL:
        problem = receiver_problem(server, unknown=UNKNOWN)
        if problem is UNKNOWN:
            unknown.add("receiver_down")
        elif problem:
            findings["receiver_down"] = problem
    else:
        left = slot_left_over(server, unknown=UNKNOWN)
        if left is UNKNOWN:
            unknown.add("slot_left_over")
        elif left:
            findings["slot_left_over"] = left
    return findings, unknown
