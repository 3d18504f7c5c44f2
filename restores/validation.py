"""Checks run on a restored database: the strategy's validate_backup.sh, done right.

Its script printed COUNT(*) and compared nothing, so a backup of empty tables passed. Here
every table's count must equal the count recorded from the dump's own snapshot (a restore
test that compared no table fails); each critical table the DBAs chose must also not be
empty and not have shrunk past the server's threshold against the previous good backup; and
each of the server's own SQL checks must return its expected value.
"""

from datetime import datetime

import psycopg

from backups import tables
from backups.models import BackupRun, Database
from restores import targetdb

SHOWN_AT_MOST = 10  # problems named in one check's detail; the rest are counted


def check(name, ok, detail):
    return {"name": name, "ok": bool(ok), "detail": detail}


def previous_counts(run):
    previous = (
        BackupRun.objects.good()
        .filter(server=run.server_id, kind=run.kind, database=run.database_id, finished_at__lt=run.finished_at)
        .order_by("-finished_at")
        .first()
    )
    return (previous.pk, previous.details.get("row_counts", {})) if previous else (None, {})


def logical_counts_before(run):
    """For a base backup: the row counts of the newest good logical backup finished before it ended.

    A base backup records no row counts, and counting on the live server while it runs would
    not be honest either: the copy is consistent at the backup's end LSN, not at the moment
    of any count, so an exact comparison would fail on a busy server and prove nothing on an
    idle one. The logical backup's counts are exact for their own snapshot; against them a
    restored base backup is held to what the strategy cares about: no critical table empty,
    none shrunk past the server's threshold.
    """
    # Compared with the logical backups' finish, on the portal's clock (stop_time is the server's).
    stop = run.details.get("stop_time_portal") or run.details.get("stop_time")
    # Of the database the restored cluster is checked in: the DSN's.
    logical = BackupRun.objects.good().filter(
        server=run.server_id, kind=BackupRun.Kind.LOGICAL, database__name=run.server.dbname
    )
    if stop:
        logical = logical.filter(finished_at__lte=datetime.fromisoformat(stop))
    newest = logical.filter(details__has_key="row_counts").order_by("-finished_at").first()
    return (newest.pk, newest.details.get("row_counts", {})) if newest else (None, {})


def run_checks(run, target, dbname):
    """[{"name", "ok", "detail"}] for the restored copy of `run` in database `dbname` on `target`."""
    server = run.server
    if run.kind == BackupRun.Kind.BASE:
        recorded = None  # nothing exact to compare with: see logical_counts_before()
        prev_id, prev_counts = logical_counts_before(run)
    elif "row_counts" not in run.details:
        recorded = None  # made elsewhere (importbackup): every table is read, none compared
        prev_id, prev_counts = previous_counts(run)
    else:
        recorded = tables.normalized(run.details.get("row_counts", {}))
        prev_id, prev_counts = previous_counts(run)
    previous = Previous(prev_id, tables.normalized(prev_counts), server.shrink_threshold_pct)
    results = []
    with targetdb.connect_to_copy(target, dbname) as conn:
        errors = {}
        restored = tables.normalized(tables.count_all(conn, errors))
        unreadable = tables.normalized(errors)
        # Critical tables are the database's own; custom checks were written for the DSN's.
        own = dbname_of(run) == server.dbname
        digests = (run.details.get("content_digests") or {}) if run.kind == BackupRun.Kind.LOGICAL else {}
        for name in critical_tables_of(run):
            results.append(_critical_check(conn, name, recorded, restored, unreadable, previous))
            if name in digests:
                results.append(_content_check(conn, name, digests[name]))
        if recorded is None:
            results.append(_every_table_read(conn, restored, unreadable))
        else:
            results.append(_every_table_compared(conn, recorded, restored, unreadable))
        for custom in server.validation_checks.filter(enabled=True).order_by("name") if own else []:
            results.append(_custom_check(conn, custom))
    return results


def _content_check(conn, name, recorded):
    """The critical table's rows as digested in the backup's snapshot, the same in the copy: a
    copy whose rows differ (a column recomputed on the way, a value changed) with the same count
    restores no better than one with rows missing."""
    shown = tables.qualified(conn, name)
    if recorded is None:  # said, not silently skipped: the counts were still compared
        return check(f"content of {shown}", True, "not compared: the backup could not read its rows to digest them")
    restored = tables.content_digest(conn, name, recorded=recorded)  # by the backup's own method
    if restored == recorded:
        return check(f"content of {shown}", True, "its rows, digested, are the ones the backup read")
    if restored is None:
        return check(f"content of {shown}", False, f"cannot read {shown} in the restored copy to compare its rows")
    return check(
        f"content of {shown}",
        False,
        f"the rows of {shown} in the restored copy differ from those the backup read (row count and digest "
        f"{restored}, the backup's {recorded}): a value changed on the way (a generated column recomputed, say)",
    )


def critical_tables_of(run):
    """The critical tables of the database a run's copy is checked as (see dbname_of)."""
    database = run.database if run.kind == BackupRun.Kind.LOGICAL and run.database_id else None
    database = database or Database.objects.filter(server=run.server_id, name=run.server.dbname).first()
    return database.critical_tables if database else []


def dbname_of(run):
    """The database a run's copy is checked as: a logical run's own, the DSN's for a base backup."""
    return run.database_name if run.kind == BackupRun.Kind.LOGICAL else run.server.dbname


class Previous:
    """The counts of the backup a critical table is held against, and how much it may shrink."""

    def __init__(self, run_id, counts, threshold_pct):
        self.run_id, self.counts, self.threshold_pct = run_id, counts, threshold_pct

    def shrank(self, conn, name, actual):
        """A one-line complaint when `actual` is down past the threshold, else ''."""
        return tables.shrank(conn, name, actual, self.counts, self.run_id, self.threshold_pct)

    def against(self, conn, name):
        prev = tables.total(conn, name, self.counts)
        return (
            f"logical backup #{self.run_id} recorded {prev}" if prev else "no logical backup before it to compare with"
        )


def _critical_check(conn, name, recorded, restored, unreadable, previous):
    shown = tables.qualified(conn, name)
    label = f"rows in {shown}"
    if tables.key_of(name) in unreadable:
        return check(label, False, f"cannot count {shown} in the restored copy: {unreadable[tables.key_of(name)]}")
    actual = tables.total(conn, name, restored)
    expected = None if recorded is None else tables.total(conn, name, recorded)
    if recorded is not None and expected is None:
        return check(
            label,
            False,
            f"{shown} was not in the database when the backup was taken: "
            "if it is gone for good, take it off the database's critical tables on the server page",
        )
    if actual is None:
        return check(label, False, f"{shown} is not in the restored copy")
    if recorded is None and actual == 0 and _unlogged(conn, name):
        # A physical copy's UNLOGGED tables are emptied by recovery, as production's would be by
        # a crash: empty is what a good restore gives, so neither emptiness nor shrink is judged.
        return check(label, True, f"{shown} is UNLOGGED: recovery empties it by design, its rows are not checked")
    if expected is not None and actual != expected:
        return check(label, False, f"{actual} rows restored, {expected} recorded at backup time")
    if actual == 0:
        return check(label, False, f"{shown} is empty: a critical table must hold rows")
    shrank = previous.shrank(conn, name, actual)
    if shrank:
        return check(label, False, shrank)
    if expected is not None:
        return check(label, True, f"{actual} rows, as recorded at backup time")
    return check(label, True, f"{actual} rows ({previous.against(conn, name)})")


def _unlogged(conn, name):
    found = conn.execute(
        "SELECT relpersistence = 'u' FROM pg_catalog.pg_class WHERE oid = pg_catalog.to_regclass(%s)",
        [tables.qualified(conn, name)],
    ).fetchone()
    return bool(found and found[0])


def _every_table_compared(conn, recorded, restored, unreadable):
    """Each table the backup counted holds, restored, exactly the rows counted in its snapshot."""
    label = "row counts of every table"
    compared = {key: n for key, n in recorded.items() if n is not None}
    if not compared:
        return check(label, False, "no tables checked: the backup recorded no row counts to compare with")
    problems = []
    for key, expected in sorted(compared.items()):
        if key in unreadable:
            problems.append(f"{_name(conn, key)} cannot be counted ({unreadable[key]})")
            continue
        actual = restored[key] if key in restored else tables.total(conn, _quoted(key), restored)
        if actual is None:
            problems.append(f"{_name(conn, key)} is not in the restored copy ({expected} rows recorded)")
        elif actual != expected:
            problems.append(f"{_name(conn, key)}: {actual} rows restored, {expected} recorded")
    if problems:
        return check(
            label, False, f"{len(problems)} of {len(compared)} tables differ from the backup: " + _some(problems)
        )
    return check(label, True, f"{len(compared)} tables, each with the rows recorded at backup time")


def _every_table_read(conn, restored, unreadable):
    """A base backup records no counts: every table of the recovered copy must at least read."""
    label = "every table readable"
    if unreadable:
        problems = [f"{_name(conn, key)}: {error}" for key, error in sorted(unreadable.items())]
        return check(label, False, f"{len(problems)} tables cannot be read: " + _some(problems))
    if not restored:
        return check(label, False, "no tables checked: the recovered database holds no table")
    rows = sum(restored.values())
    return check(label, True, f"{len(restored)} tables read to the end, {rows} rows in all")


def _some(problems):
    more = len(problems) - SHOWN_AT_MOST
    return "; ".join(problems[:SHOWN_AT_MOST]) + (f"; and {more} more" if more > 0 else "")


def _quoted(key):
    return ".".join('"' + part.replace('"', '""') + '"' for part in key)


def _name(conn, key):
    return tables.qualified(conn, _quoted(key))


# A DBA's check runs, as every session of the portal's, with pg_catalog alone on its search_path
# (backups.connection.SESSION_GUARD): a database owner's operator or function in public, matching
# the check's types better than the built-in one, would otherwise run as the portal's role.
UNQUALIFIED = " (checks see pg_catalog only: name tables and functions with their schema, as public.users)"


def _custom_check(conn, custom):
    name = f"check: {custom.name}"
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            row = conn.execute(custom.sql).fetchone()
    except psycopg.Error as e:
        hint = UNQUALIFIED if isinstance(e, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction)) else ""
        return check(name, False, f"query failed: {str(e).splitlines()[0]}{hint}")
    value = "" if row is None or row[0] is None else str(row[0])
    if isinstance(row[0] if row else None, bool):
        value = "t" if row[0] else "f"
    return check(name, value == custom.expected, f"returned {value!r}, expected {custom.expected!r}")
