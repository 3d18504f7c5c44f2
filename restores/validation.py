"""Checks run on a restored database: the strategy's validate_backup.sh, done right.

Its script printed COUNT(*) and compared nothing, so a backup of empty tables passed. Here
each critical table's count must equal the count recorded from the dump's own snapshot, must
not be zero, and must not have shrunk past the server's threshold against the previous good
backup; and each of the server's own SQL checks must return its expected value.
"""

import psycopg
from psycopg import sql

from backups.models import BackupRun


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


def run_checks(run, target, dbname):
    """[{"name", "ok", "detail"}] for the restored copy of `run` in database `dbname` on `target`."""
    server = run.server
    recorded = run.details.get("row_counts", {})
    prev_id, prev_counts = previous_counts(run)
    results = []
    with target.connect(dbname) as conn:
        for table in server.critical_tables:
            results.append(
                _table_check(
                    conn, table, recorded.get(table), prev_id, prev_counts.get(table), server.shrink_threshold_pct
                )
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
    if expected is None:
        return check(name, False, f"{table} was not in the database when the backup was taken")
    if actual != expected:
        return check(name, False, f"{actual} rows restored, {expected} recorded at backup time")
    if actual == 0:
        return check(name, False, f"{table} is empty: a critical table must hold rows")
    if prev and actual < prev * (100 - threshold_pct) / 100:
        shrink = 100 - actual * 100 // prev
        return check(
            name, False, f"{actual} rows, down {shrink}% from {prev} in backup #{prev_id} (threshold {threshold_pct}%)"
        )
    return check(name, True, f"{actual} rows, as recorded at backup time")


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
