"""Logical backups end to end against a real cluster: pg_dump → gpg → the primary location."""

import json
import os
import subprocess
import time

import psycopg
import pytest
from django.core.management import call_command

from backupportal.lib import sampledata
from backups import tables
from backups.models import BackupCopy, BackupRun
from tests.helpers import backup_json, manage, register
from tests.pg18 import PG15_BIN


def gpg_decrypt(path, passphrase_file, out):
    """The plain gpg CLI, as a DBA would run it: no portal code involved."""
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(passphrase_file),
            "--homedir",
            str(out.parent / "gnupg"),
            "--decrypt",
            "--output",
            str(out),
            str(path),
        ],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_backup_decrypts_with_gpg_and_restores_with_pg_restore(
    server, sample_cluster, passphrase_file, backup_root, tmp_path
):
    result = backup_json()
    assert result["status"] == "succeeded", result
    run = BackupRun.objects.get(pk=result["id"])
    assert len(result["sha256"]) == 64 and result["size"] > 0
    assert result["copies"][0]["status"] == "ok" and result["copies"][0]["sha256"] == result["sha256"]
    artifact = backup_root / run.key
    assert artifact.stat().st_mode & 0o777 == 0o600
    assert not list(backup_root.rglob("*.partial"))
    # The catalogued sha256 is the file's.
    import hashlib

    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == run.sha256

    (tmp_path / "gnupg").mkdir(mode=0o700)
    dump = tmp_path / "backup_decrypted.dump"
    gpg_decrypt(artifact, passphrase_file, dump)
    sample_cluster.create_database("restored")
    subprocess.run(
        [
            str(server.bin_dir() / "pg_restore"),
            "-h",
            "127.0.0.1",
            "-p",
            str(sample_cluster.port),
            "-U",
            "postgres",
            "-d",
            "restored",
            str(dump),
        ],
        check=True,
        capture_output=True,
    )
    with sample_cluster.connect("reliabilitymaldives") as a, sample_cluster.connect("restored") as b:
        restored_counts = sampledata.counts(b)
        assert sampledata.counts(a) == restored_counts
        for table in ("users", "roles", "audit_logs", "financial_records"):
            q = f"SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"
            assert a.execute(q).fetchone() == b.execute(q).fetchone(), table
    # Row counts were recorded from the dump's own snapshot.
    assert run.details["row_counts"] == restored_counts

    # The globals sit beside it, encrypted the same way, and hold the roles.
    globals_copy = run.copies.get(artifact="globals")
    globals_sql = tmp_path / "globals.sql"
    gpg_decrypt(backup_root / globals_copy.key, passphrase_file, globals_sql)
    assert "CREATE ROLE postgres" in globals_sql.read_text()


@pytest.mark.parametrize("count", [65011712, 65536])  # production's default (the strategy's), the suite's
def test_the_dump_is_compressed_once_inside_pg_dump_not_by_gpg(server, passphrase_file, backup_root, settings, count):
    settings.GPG_S2K_COUNT = count
    result = backup_json()
    run = BackupRun.objects.get(pk=result["id"])
    packets = subprocess.run(
        [
            "gpg",
            "--batch",
            "--list-packets",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(passphrase_file),
            str(backup_root / run.key),
        ],
        capture_output=True,
        text=True,
    ).stdout
    # cipher 9 is AES-256, hash 10 SHA-512, s2k mode 3 (iterated and salted): the strategy's key derivation.
    assert "cipher 9" in packets and "s2k 3, hash 10" in packets
    assert f"count {count} " in packets, packets
    assert "compressed packet" not in packets


def test_a_second_manual_backup_while_one_runs_is_refused(server, passphrase_file, backup_root):
    from django.core.management.base import CommandError

    BackupRun.objects.create(server=server, kind="logical", status="running", pid=os.getpid())
    with pytest.raises(CommandError, match="already running"):
        call_command("backup", "maldives", "--kind", "logical")
    assert BackupRun.objects.filter(server=server).count() == 1


def test_a_failed_backup_leaves_nothing_and_says_why(server, sample_cluster, passphrase_file, backup_root):
    sample_cluster.stop()
    result = backup_json()
    assert result["status"] == "failed"
    assert "connection refused" in result["error"]
    assert not [p for p in backup_root.rglob("*") if p.is_file()]
    run = BackupRun.objects.get(pk=result["id"])
    assert run.status == "failed" and not run.copies.filter(status=BackupCopy.Status.OK).exists()


def test_a_server_that_is_down_after_good_backups_is_said_to_be_down_and_nothing_else(
    server, sample_cluster, passphrase_file, backup_root
):
    """Its good backups recorded its system identifier: a cluster that cannot be reached is down
    (start it), not one that hides its identifier (grant a right, point the DSN back)."""
    assert backup_json()["status"] == "succeeded"
    sample_cluster.stop()
    try:
        error = backup_json()["error"]
    finally:
        sample_cluster.start()
    assert "connection refused" in error and "pg_control_system" not in error and "point the DSN" not in error
    assert "\n" not in error


def test_unknown_server_is_refused(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="unknown server 'nope'"):
        call_command("backup", "nope")


def test_a_refusal_with_json_ends_stdout_with_its_json_object_too(db, settings):
    """Found by review: stdout was empty on a refused input, so `| tail -1 | jq` broke exactly there."""
    proc = manage(settings, "backup", "nope", "--kind", "logical", "--json")
    out, err = proc.communicate(timeout=120)
    said = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 1 and err.strip().endswith(said["error"])
    assert said["status"] == "refused" and said["exit_code"] == 1 and "unknown server 'nope'" in said["error"]
    proc = manage(settings, "backup", "maldives", "--kind", "bogus", "--js")  # argparse's refusal, --json abbreviated
    out, err = proc.communicate(timeout=120)
    said = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 2 == said["exit_code"] and "invalid choice: 'bogus'" in said["error"] in err


@pytest.mark.parametrize(
    "named",
    [
        "dbname=postgres port={port} application_name=it\\'s",  # the quote and backslash test the quoting
        "postgresql://postgres@127.0.0.1:{port}/postgres",
    ],
)
def test_a_database_named_like_a_connection_string_is_backed_up_from_its_own_cluster(
    pg_cluster_of, db, passphrase_file, backup_root, tmp_path, named
):
    # Read as a connection string, such a name takes a libpq tool to the other cluster, with PGPASSWORD.
    ours, elsewhere = pg_cluster_of(15), pg_cluster_of(15)
    name = named.format(port=elsewhere.port)
    ours.create_database(name)
    ours.execute("CREATE TABLE only_ours_rows (id int)", dbname=name)
    ours.create_role("only_ours")
    elsewhere.create_role("only_elsewhere")
    elsewhere.configure(log_connections=True)
    elsewhere.reload()
    register(ours, dbname=name)
    seen_before = elsewhere.logfile.stat().st_size

    result = backup_json()

    assert result["status"] == "succeeded", result
    run = BackupRun.objects.get(pk=result["id"])
    assert run.details["database"] == name
    (tmp_path / "gnupg").mkdir(mode=0o700)
    globals_sql = tmp_path / "globals.sql"
    gpg_decrypt(backup_root / run.copies.get(artifact="globals").key, passphrase_file, globals_sql)
    assert "CREATE ROLE only_ours" in globals_sql.read_text()
    assert "only_elsewhere" not in globals_sql.read_text()
    # pg_dump, given the name as PGDATABASE (never read as a connection string), dumped ours too.
    dump = tmp_path / "backup.dump"
    gpg_decrypt(backup_root / run.key, passphrase_file, dump)
    listing = subprocess.run([str(PG15_BIN / "pg_restore"), "--list", str(dump)], capture_output=True, text=True)
    assert "TABLE public only_ours_rows" in listing.stdout
    assert "connection received" not in elsewhere._log_since(seen_before)


def test_a_truncate_after_a_table_is_counted_waits_for_the_dump(
    server, sample_cluster, passphrase_file, backup_root, monkeypatch
):
    """The counts and the dump are of one snapshot, and TRUNCATE is not MVCC-safe: one landing
    between a table's count and pg_dump's own lock would give a dump of no rows against a count
    of 100, and a restore test that fails for nothing. The exporting transaction locks every table."""
    from restores.models import RestoreTest
    from restores.restoretest import run_restore_test

    sample_cluster.execute("CREATE TABLE staging AS SELECT g FROM generate_series(1, 100) g", dbname=server.dbname)
    counted, outcome = tables.count_all, {}

    def count_then_truncate(conn, *args, **kwargs):
        counts = counted(conn, *args, **kwargs)
        with sample_cluster.connect(server.dbname) as other:  # an ETL job empties its staging table
            other.execute("SET lock_timeout = '1s'")
            try:
                other.execute("TRUNCATE staging")
                outcome["truncate"] = "committed"
            except psycopg.errors.LockNotAvailable:
                outcome["truncate"] = "waited"
        return counts

    monkeypatch.setattr(tables, "count_all", count_then_truncate)
    assert backup_json()["status"] == "succeeded" and outcome == {"truncate": "waited"}
    monkeypatch.setattr(tables, "count_all", counted)
    test = run_restore_test(server)
    assert test.status == RestoreTest.Status.PASSED, test.error


def test_a_backup_meeting_an_exclusive_lock_queued_behind_its_own_fails_within_its_wait(
    server, sample_cluster, passphrase_file, backup_root, monkeypatch, settings
):
    """Production's TRUNCATE, queued behind the exporting transaction's lock, queues the counting's
    and pg_dump's own locks behind itself: a wait no deadlock detector sees. The backup gives way
    within BACKUP_LOCK_WAIT, saying why, and the TRUNCATE then goes through."""
    import threading

    settings.BACKUP_LOCK_WAIT = 2
    sample_cluster.execute("CREATE TABLE staging AS SELECT g FROM generate_series(1, 100) g", dbname=server.dbname)
    locked, truncated = tables.lock_all, {}

    def lock_then_truncate_elsewhere(conn, *args):
        locked(conn, *args)
        etl = threading.Thread(
            target=lambda: truncated.setdefault(
                "rows", sample_cluster.execute("TRUNCATE staging", dbname=server.dbname)
            )
        )
        etl.start()  # an ETL job without a lock_timeout: it waits behind the backup's lock
        truncated["thread"] = etl
        time.sleep(0.5)

    monkeypatch.setattr(tables, "lock_all", lock_then_truncate_elsewhere)
    started = time.monotonic()
    result = backup_json()
    truncated["thread"].join(timeout=30)
    assert result["status"] == "failed" and "was not granted within 2 s (BACKUP_LOCK_WAIT)" in result["error"]
    assert time.monotonic() - started < 30 and truncated["rows"] == []  # the backup let go, the TRUNCATE ran


def dump_started(monkeypatch):
    """An event set once pg_dump has been started (the backup's own, by Tool.start)."""
    import threading

    from backups.pipeline import Tool

    started, start = threading.Event(), Tool.start

    def start_and_say(tool):
        running = start(tool)
        if "pg_dump" in tool.argv[0]:
            started.set()
        return running

    monkeypatch.setattr(Tool, "start", start_and_say)
    return started


def test_the_rows_are_counted_while_pg_dump_dumps_the_same_snapshot(
    server, sample_cluster, passphrase_file, backup_root, monkeypatch
):
    """Counted before pg_dump started, the rows (and a critical table's, hashed) lengthened the
    time production's DDL waits behind the backup's locks by a whole read of every table: now the
    counting runs beside the dump, in its snapshot, and still counts what the dump holds."""
    pg_dump_running, count_all, seen = dump_started(monkeypatch), tables.count_all, {}

    def count_once_pg_dump_runs(conn, *args, **kwargs):
        seen["pg_dump"] = pg_dump_running.wait(timeout=20)
        sample_cluster.execute("INSERT INTO roles (name, description) VALUES ('late', 'after')", dbname=server.dbname)
        return count_all(conn, *args, **kwargs)

    monkeypatch.setattr(tables, "count_all", count_once_pg_dump_runs)
    result = backup_json()
    assert seen["pg_dump"], "the counting waited for pg_dump, which had not started"
    assert result["status"] == "succeeded", result
    run = BackupRun.objects.get(pk=result["id"])
    roles = sample_cluster.execute("SELECT count(*) FROM roles", dbname=server.dbname)[0][0]
    assert run.details["row_counts"]["public.roles"] == roles - 1  # the snapshot's, as dumped


def test_a_dump_that_fails_stops_the_counting_beside_it(
    server, sample_cluster, passphrase_file, backup_root, monkeypatch
):
    """pg_dump dies while the counting is still reading: the backup fails at once with pg_dump's
    reason, and the counting's query is cancelled, not left reading production."""
    pg_dump_running, count_all = dump_started(monkeypatch), tables.count_all

    def slow_count(conn, *args, **kwargs):
        pg_dump_running.wait(timeout=20)
        conn.execute("SELECT pg_sleep(60) /* slow count */")
        return count_all(conn, *args, **kwargs)

    from backups.pipeline import Tool

    start = Tool.start

    def start_then_kill(tool):
        running = start(tool)
        if "pg_dump" in tool.argv[0]:
            time.sleep(0.2)
            tool.proc.kill()
        return running

    monkeypatch.setattr(tables, "count_all", slow_count)
    monkeypatch.setattr(Tool, "start", start_then_kill)
    started = time.monotonic()
    result = backup_json()
    assert result["status"] == "failed" and "pg_dump" in result["error"], result
    assert time.monotonic() - started < 30
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%slow count%%' AND pid <> pg_backend_pid()"
    assert sample_cluster.execute(sleeping)[0][0] == 0


def test_counting_that_fails_beside_the_dump_fails_the_backup_and_keeps_nothing(
    server, sample_cluster, passphrase_file, backup_root, monkeypatch
):
    """A backup is good only with its counts: the counting's failure, met while pg_dump runs,
    fails the run with the counting's reason and leaves no copy behind."""

    def count_fails(conn, *args, **kwargs):
        conn.execute("SELECT 1 / 0")

    monkeypatch.setattr(tables, "count_all", count_fails)
    result = backup_json()
    assert result["status"] == "failed", result
    assert (
        result["error"].startswith("counting the rows of every table failed: ")
        and "division by zero" in result["error"]
    )
    run = BackupRun.objects.get(pk=result["id"])
    assert not BackupCopy.objects.filter(run=run).exists()
    assert not [p for p in backup_root.rglob("*") if p.is_file() and run.key and p.name in run.key]


# An owner's SQL function calling its own helper unqualified, in an expression index, a partial
# index's WHERE and expression statistics: the planner inlines it, parsing its body with the
# session's search_path, for any query on the table (pg_dump's COPY plans nothing). The database
# puts public before pg_catalog, and a count(*) of the owner's there would say 5000.
INLINED = r"""
CREATE FUNCTION public.helper(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'select $1 + 1';
CREATE FUNCTION public.f(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'select helper($1)';
CREATE FUNCTION public.positive(int) RETURNS bool LANGUAGE sql IMMUTABLE AS 'select helper($1) > 0';
CREATE TABLE public.readings AS SELECT g AS a FROM generate_series(1, 10) g;
CREATE INDEX ON public.readings (public.f(a));
CREATE INDEX ON public.readings (a) WHERE public.positive(a);
CREATE STATISTICS readings_f ON (public.f(a)) FROM public.readings;
CREATE FUNCTION public.fake_count(bigint) RETURNS bigint LANGUAGE sql AS 'select 5000::bigint';
CREATE AGGREGATE public.count(*) (sfunc = public.fake_count, stype = bigint, initcond = '0');
ALTER DATABASE reliabilitymaldives SET search_path = public, pg_catalog;
"""


def test_a_table_whose_index_calls_an_owners_function_unqualified_is_counted_and_digested(
    server, sample_cluster, passphrase_file, backup_root
):
    """Found by a probe: every count of such a table failed ("function helper(integer) does not
    exist"), and the backup with it, where pg_dump dumps the database."""
    from backups.models import Database

    sample_cluster.execute(INLINED, dbname=server.dbname)
    Database.of_dsn(server)
    Database.objects.filter(server=server, name=server.dbname).update(critical_tables=["public.readings"])
    result = backup_json()
    assert result["status"] == "succeeded", result
    run = BackupRun.objects.get(pk=result["id"])
    assert run.details["row_counts"]["public.readings"] == 10  # pg_catalog's count(*), not the owner's
    # The owner's functions in its indexes: digested by COPY, which plans nothing (backups.unplanned).
    assert run.details["content_digests"]["public.readings"].startswith("v2:10:")
    # As a restore test reads a copy (a base backup's keeps the indexes): on one session, whose
    # DBA's checks then still see pg_catalog only.
    with server.connect() as conn:
        errors = {}
        assert tables.count_all(conn, errors)["public.readings"] == 10 and errors == {}
        assert tables.content_digest(conn, "public.readings") == run.details["content_digests"]["public.readings"]
        assert conn.execute("SHOW search_path").fetchone()[0] == "pg_catalog,pg_temp"
