"""Checks run on a restored database: the strategy's validate_backup.sh, done right.

Its script printed COUNT(*) and compared nothing, so a backup of empty tables passed. Here
each critical table's count must equal the count recorded from the dump's own snapshot, must
not be zero, and must not have shrunk past the server's threshold against the previous good
backup; and each of the server's own SQL checks must return its expected value.
"""

from datetime import datetime

import psycopg
from psycopg import sql

from backups.models import BackupRun

MISSING = object()  # a critical table the backup's recorded counts do not name


def check(name, ok, detail):
    return {"name": name, "ok": bool(ok), "detail": detail}


def previous_counts(run):
    previous = (
        BackupRun.objects.good()
        .filter(server=run.server_id, kind=run.kind, finished_at__lt=run.finished_at)
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
    stop = run.details.get("stop_time")
    logical = BackupRun.objects.good().filter(server=run.server_id, kind=BackupRun.Kind.LOGICAL)
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
    else:
        recorded = run.details.get("row_counts", {})
        prev_id, prev_counts = previous_counts(run)
    results = []
    with target.connect(dbname) as conn:
        for table in server.critical_tables:
            expected = None if recorded is None else recorded.get(table, MISSING)
            results.append(
                _table_check(conn, table, expected, prev_id, prev_counts.get(table), server.shrink_threshold_pct)
            )
        for custom in server.validation_checks.filter(enabled=True).order_by("name"):
            results.append(_custom_check(conn, custom))
    return results


def _table_check(conn, table, expected, prev_id, prev, threshold_pct):
    name = f"rows in {table}"
    schema, _, bare = table.rpartition(".")
    ident = sql.Identifier(schema, bare) if schema else sql.Identifier(bare)
    try:
        actual = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
    except psycopg.Error as e:
        conn.rollback() if not conn.autocommit else None
        return check(name, False, f"cannot count {table} in the restored copy: {str(e).splitlines()[0]}")
    if expected is MISSING:
        return check(name, False, f"{table} was not in the database when the backup was taken")
    if expected is not None and actual != expected:
        return check(name, False, f"{actual} rows restored, {expected} recorded at backup time")
    if actual == 0:
        return check(name, False, f"{table} is empty: a critical table must hold rows")
    if prev and actual < prev * (100 - threshold_pct) / 100:
        shrink = 100 - actual * 100 // prev
        return check(
            name, False, f"{actual} rows, down {shrink}% from {prev} in backup #{prev_id} (threshold {threshold_pct}%)"
        )
    if expected is not None:
        return check(name, True, f"{actual} rows, as recorded at backup time")
    against = f"logical backup #{prev_id} recorded {prev}" if prev else "no logical backup before it to compare with"
    return check(name, True, f"{actual} rows ({against})")


def _custom_check(conn, custom):
    name = f"check: {custom.name}"
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            row = conn.execute(custom.sql).fetchone()
    except psycopg.Error as e:
        return check(name, False, f"query failed: {str(e).splitlines()[0]}")
    value = "" if row is None or row[0] is None else str(row[0])
    if isinstance(row[0] if row else None, bool):
        value = "t" if row[0] else "f"
    return check(name, value == custom.expected, f"returned {value!r}, expected {custom.expected!r}")
