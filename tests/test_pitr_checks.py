"""A PITR restores production's past and touches nothing else (restores/pitr_checks.py).

Real clusters, push archiving: WAL that creates a tablespace is never handed to recovery (its
directory is production's); a timeline some copy archived into production's spool is not
followed, production's own timeline switch is; a restore point name used twice is refused,
listing each; a data directory inside another cluster, a tablespace or the portal's storage
is refused before anything is written.
"""

import os
import pwd
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from django.utils import timezone

from backupportal.lib.osuser import chown_to_db_user, free_port
from backupportal.models import JournalEntry
from backups import binaries, walchain, walingest, walnames, walspool
from backups.models import BackupCopy, Server, WalSegment
from restores import pitr, pitr_checks, sandbox
from restores.models import RestoreRun
from tests.helpers import (
    DB,
    a_second_later,
    archive_as_postgres,
    archive_some_wal,
    enable_push,
    flip_byte_in,
    pitr_to,
    postgres_running_in,
    pull,
    rows,
    run_command,
    slot_active,
    switch_wal,
    wait_archived,
    wait_for,
    write,
)
from tests.helpers import pitr as restore

pytest_plugins = ["tests.walfixtures"]

MB = 1 << 20


def archived(cluster, server):
    wait_archived(cluster, switch_wal(cluster))
    walingest.ingest(server)


def tables(port, *names):
    listed = ", ".join(f"'{n}'" for n in names)
    return {r[0] for r in rows(port, f"SELECT relname FROM pg_class WHERE relname IN ({listed})")}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def nothing_left(datadir):
    assert not datadir.exists()
    assert postgres_running_in(datadir.parent) == []
    assert not [t.name for t in threading.enumerate() if t.name.startswith("pitr-")]


# --- 1. CREATE TABLESPACE in the WAL -----------------------------------------------------------


def test_wal_that_creates_a_tablespace_is_never_replayed_and_productions_directory_stays_untouched(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, postgres_dir
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    before_it = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")  # the commit a time target stops at
    archived(sample_cluster, server)
    location = postgres_dir / "ts"
    location.mkdir()
    chown_to_db_user(location)
    sample_cluster.execute(f"CREATE TABLESPACE elsewhere LOCATION '{location}'")
    write(sample_cluster, "CREATE TABLE in_ts(x text) TABLESPACE elsewhere; INSERT INTO in_ts VALUES ('production')")
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    sample_cluster.execute("CHECKPOINT")
    archived(sample_cluster, server)
    production = files_under(location)
    assert any(name.startswith("PG_15_") for name in production)

    # Everything needed before it is restored: the check refuses only what would be replayed.
    port = free_port()
    result = pitr_to(restored(), port, before_it)
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe") == [("A",)]

    datadir = restored()
    result = restore(datadir, free_port(), "--target", "latest")
    assert result["status"] == "failed" and result["_exit"] == 1, result
    error = result["error"]
    assert f"creates a tablespace in {location}" in error and "\n" not in error
    assert "the portal does not restore clusters with tablespaces physically" in error
    assert "--tablespace-map OLD=NEW" in error
    assert files_under(location) == production  # nothing written there
    assert sample_cluster.execute("SELECT x FROM in_ts", dbname=DB) == [("production",)]
    nothing_left(datadir)


def test_the_segment_pg_receivewal_is_still_receiving_is_checked_too(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, postgres_dir
):
    receiver = pull(server)
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
        write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('C')")
        flushed(sample_cluster)  # no WAL switch: only in the segment pg_receivewal is writing
        port = free_port()
        result = restore(restored(), port, "--target", "latest")
        assert result["status"] == "succeeded" and ".partial" in result["notes"], result
        assert rows(port, "SELECT tx FROM probe") == [("C",)]

        location = postgres_dir / "ts"
        location.mkdir()
        chown_to_db_user(location)
        sample_cluster.execute(f"CREATE TABLESPACE elsewhere LOCATION '{location}'")
        flushed(sample_cluster)
        datadir = restored()
        result = restore(datadir, free_port(), "--target", "latest")
        assert result["status"] == "failed" and f"creates a tablespace in {location}" in result["error"], result
        nothing_left(datadir)
    finally:
        receiver.stop_child()


def flushed(cluster):
    lsn = cluster.execute("SELECT pg_current_wal_lsn()")[0][0]
    wait_for(
        lambda: cluster.execute("SELECT flush_lsn >= %s FROM pg_stat_replication", [lsn])[0][0],
        what="pg_receivewal to flush",
    )


def long_location(root):
    """A tablespace location of about 900 characters: its CREATE record is about 1 kB long."""
    path = root
    for letter in "abcd":
        path = path / (letter * 220)
    path.mkdir(parents=True)
    for parent in [path, *path.parents][: len(path.relative_to(root).parts) + 1]:
        chown_to_db_user(parent)
    return path


def insert_lsn(conn):
    return int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def create_record_at(cluster, conn, location, start):
    """CREATE TABLESPACE (then DROP); the LSN of its record, read from pg_wal (a straddling one
    too: the segment after it is the current one)."""
    conn.execute(f"CREATE TABLESPACE edge LOCATION '{location}'")
    conn.execute("DROP TABLESPACE edge")
    dump = subprocess.run(
        [str(cluster.bin_dir / "pg_waldump"), "--path", str(cluster.datadir / "pg_wal"), "--rmgr=Tablespace",
         f"--start={start >> 32:X}/{start & 0xFFFFFFFF:X}"],
        capture_output=True, text=True,
    )  # fmt: skip
    lsn = re.search(r'lsn: ([0-9A-F]+)/([0-9A-F]+),.*desc: CREATE \d+ "', dump.stdout)
    return int(lsn.group(1), 16) << 32 | int(lsn.group(2), 16)


def pad_until(conn, end, left):
    """WAL written until `left` bytes before `end` (rows not compressed, nor toasted)."""
    while end - insert_lsn(conn) > left + 2200:
        conn.execute("INSERT INTO pad VALUES (repeat('x', 1900))")
    while end - insert_lsn(conn) > left + 150:
        conn.execute("INSERT INTO pad VALUES (repeat('x', %s))", (max(1, end - insert_lsn(conn) - left - 130),))


def test_a_tablespace_record_that_begins_in_the_segment_before_is_found(pg_cluster, postgres_dir):
    """pg_waldump over one segment misses a record that began in the one before it, and over
    that one misses one that ends in the next: the check reads the end of the segment before."""
    location = long_location(postgres_dir)
    with pg_cluster.connect() as conn:
        conn.execute("CREATE TABLE pad(x text); ALTER TABLE pad ALTER x SET STORAGE EXTERNAL")
        conn.execute("SELECT pg_switch_wal()")
        # Once, to learn how much WAL the statement writes before its CREATE record.
        before = insert_lsn(conn)
        overhead = create_record_at(pg_cluster, conn, location, before) - before
        left = overhead + 400  # its record then starts 400 bytes before the segment's end
        for _ in range(4):  # each try in the next segment, corrected by how far the last one missed
            end = (insert_lsn(conn) // MB + 1) * MB
            pad_until(conn, end, left)
            created = create_record_at(pg_cluster, conn, location, insert_lsn(conn) - 100)
            if end - 800 < created < end - 100:
                break
            left -= end - created - 400
        else:
            pytest.fail("could not make a CREATE TABLESPACE record cross a segment's end")
        name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    second = f"{name[:16]}{end // MB:08X}"
    first = f"{name[:16]}{end // MB - 1:08X}"
    wal = postgres_dir / "wal"
    wal.mkdir()
    for segment in (first, second):
        shutil.copyfile(pg_cluster.datadir / "pg_wal" / segment, wal / segment)
    waldump = pg_cluster.bin_dir / "pg_waldump"
    assert pitr_checks.tablespace_creations(waldump, wal, first, None, MB) == []
    assert pitr_checks.tablespace_creations(waldump, wal, second, None, MB) == []
    found = pitr_checks.tablespace_creations(waldump, wal, second, first, MB)
    assert [location for _, _, location in found] == [str(location)]
    assert sorted(p.name for p in wal.iterdir()) == [first, second]  # its scratch links are gone


def test_a_tablespace_location_holding_line_breaks_or_quotes_is_found_whole(pg_cluster, postgres_dir):
    """pg_waldump prints a location as it is: one holding a line break (or \\r, \\x1c, a quote,
    what looks like another record) was read line by line, matched nothing, and the copy then
    wrote into production's tablespace."""
    odd = ["a\nb", "c\rd", "e\x1cf", 'g"\nrmgr: Tablespace h', "plain"]
    locations = []
    for i, part in enumerate(odd):
        location = postgres_dir / f"ts{i}-{part}"
        location.mkdir()
        chown_to_db_user(location)
        locations.append(str(location))
    with pg_cluster.connect() as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        for i, location in enumerate(locations):
            conn.execute(f"CREATE TABLESPACE odd{i} LOCATION {psycopg.sql.quote(location)}")
            conn.execute(f"DROP TABLESPACE odd{i}")
        assert conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0] == name
    wal = postgres_dir / "wal"
    wal.mkdir()
    shutil.copyfile(pg_cluster.datadir / "pg_wal" / name, wal / name)
    found = pitr_checks.tablespace_creations(pg_cluster.bin_dir / "pg_waldump", wal, name, None, MB)
    # Each found; a location that fakes the start of another record is cut where the fake begins.
    assert [location for _, _, location in found] == [*locations[:3], locations[3].split('"')[0], locations[4]]
    error = str(pitr_checks.refusal(name, found))
    assert "\n" not in error and "\r" not in error and repr(locations[0]) in error


# --- 2. Timelines ------------------------------------------------------------------------------


def catalogued(server, timeline):
    walingest.ingest(server)
    return WalSegment.objects.filter(server=server, timeline=timeline, segno__isnull=False).count()


def on(port, sql):
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=DB, autocommit=True) as conn:
        conn.execute(sql)


def test_a_copy_archiving_its_own_timeline_into_productions_spool_is_not_followed(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    archive_some_wal(sample_cluster, tables=1)
    walingest.ingest(server)
    # A copy restored by hand, then given production's archive_command (as a DBA might).
    copy, copy_port = restored(), free_port()
    assert restore(copy, copy_port, "--target", "latest")["status"] == "succeeded"
    command = walspool.archive_command(server).replace("'", "''")
    on(copy_port, "ALTER SYSTEM SET archive_mode = 'on'")
    on(copy_port, f"ALTER SYSTEM SET archive_command = '{command}'")
    proc = binaries.pg_ctl(copy, "restart", "-w", "-m", "fast", "-l", str(copy / "log" / "restart.log"), major=15)
    assert proc.returncode == 0, proc.stderr
    history = archive_as_postgres(server, copy / "pg_wal" / "00000002.history", "00000002.history")
    assert history.returncode == 0, history.stderr
    on(copy_port, "CREATE TABLE on_copy(x int); INSERT INTO on_copy VALUES (1)")
    on(copy_port, "SELECT pg_switch_wal()")
    write(sample_cluster, "CREATE TABLE prod_a(x int); INSERT INTO prod_a VALUES (1)")
    target = a_second_later()
    write(sample_cluster, "CREATE TABLE prod_b(x int)")
    on(copy_port, "INSERT INTO on_copy VALUES (2)")
    on(copy_port, "SELECT pg_switch_wal()")
    wait_for(lambda: catalogued(server, timeline=2) >= 2, timeout=30, what="the copy's segments in the catalog")
    archived(sample_cluster, server)

    plan = pitr.make_plan(server, pitr.Target("latest", None, "latest"), str(restored()), free_port())
    assert plan.timeline == 1 and str(plan.lineage) == "1"
    chain = walchain.chain_segments(server, plan.segno(plan.base.start_wal), plan.last, plan.lineage)
    assert {s.timeline for s in chain} == {1}
    assert any("WAL of timeline 2 in the archive is not on production's history" in n for n in plan.notes)

    port = free_port()
    result = pitr_to(restored(), port, target)
    assert result["status"] == "succeeded", result
    assert tables(port, "prod_a", "prod_b", "on_copy") == {"prod_a"}
    assert "WAL of timeline 2 in the archive is not on production's history (1): ignored" in result["notes"]

    port = free_port()
    result = restore(restored(), port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert tables(port, "prod_a", "prod_b", "on_copy") == {"prod_a", "prod_b"}


def test_production_promoted_onto_a_new_timeline_is_followed_across_the_switch(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE before_switch(x int); INSERT INTO before_switch VALUES (1)")
    archived(sample_cluster, server)
    # A failover: production restarts as a standby and is promoted onto timeline 2.
    sample_cluster.stop()
    (sample_cluster.datadir / "standby.signal").touch()
    chown_to_db_user(sample_cluster.datadir / "standby.signal")
    sample_cluster.start()
    sample_cluster.execute("SELECT pg_promote()")
    write(sample_cluster, "CREATE TABLE after_switch(x int); INSERT INTO after_switch VALUES (2)")
    sample_cluster.execute("SELECT pg_create_restore_point('after_promote')")  # in timeline 2's first segment
    write(sample_cluster, "CREATE TABLE later(x int)")
    archived(sample_cluster, server)
    assert WalSegment.objects.filter(server=server, name="00000002.history").exists()

    port = free_port()
    result = restore(restored(), port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert tables(port, "before_switch", "after_switch", "later") == {"before_switch", "after_switch", "later"}
    assert "timeline" not in result["notes"]  # nothing foreign, nothing to say
    # pg_waldump reads timeline 2's first segment alone: with timeline 1's before it, it found none.
    port = free_port()
    result = restore(restored(), port, "--target-name", "after_promote")
    assert result["status"] == "succeeded", result.get("error")
    assert tables(port, "before_switch", "after_switch", "later") == {"before_switch", "after_switch"}


def test_a_lineage_takes_each_segment_from_its_own_timeline_and_none_from_a_foreign_one(db):
    server = Server.objects.create(
        name="lineage", dsn="postgresql://postgres@127.0.0.1:1/postgres", pg_version=150000, wal_segment_size=MB
    )

    def catalogue(timeline, segnos):
        for segno in segnos:
            WalSegment.objects.create(
                server=server, timeline=timeline, segno=segno, name=f"{timeline:08X}00000000{segno:08X}", size=MB,
                sha256="0" * 64, archived_at=timezone.now(),
            )  # fmt: skip

    catalogue(1, range(1, 6))  # production: 1..5 on timeline 1, promoted at 0/500010 ...
    catalogue(3, range(5, 10))  # ... onto timeline 3, which ends at 9
    catalogue(4, range(4, 12))  # a copy that branched off timeline 1 at segment 4
    lineage = walchain.Lineage.of(3, "1\t0/500010\tno recovery target specified\n", MB)
    assert [lineage.timeline_of(s) for s in (1, 4, 5, 9)] == [1, 1, 3, 3]
    chain = walchain.chain_segments(server, 1, 9, lineage)
    assert [(s.timeline, s.segno) for s in chain] == [(1, n) for n in range(1, 5)] + [(3, n) for n in range(5, 10)]
    assert walchain.last_segno(server, lineage) == 9
    assert walchain.last_segno(server) == 11  # without a lineage, the newest timeline wins
    assert [(s.timeline, s.segno) for s in walchain.chain_segments(server, 4, 5)] == [(4, 4), (4, 5)]
    WalSegment.objects.filter(server=server, timeline=3, segno=7).delete()
    assert walchain.missing_segments(server, 1, 9, lineage) == ["000000030000000000000007"]
    assert walchain.missing_segments(server, 1, 9) == []  # the copy's segment 7 filled the gap
    assert lineage.holds(1, "0/100028", "0/200000") and not lineage.holds(1, "0/500028", "0/600000")
    # A backup spanning the promotion (a standby following it) ends on 3 and began on 1: on it.
    assert lineage.holds(3, "0/480028", "0/520000")
    assert not lineage.holds(4, "0/400028", "0/420000")  # the copy's timeline is not production's


# --- 3. A restore point name used twice --------------------------------------------------------


def test_a_restore_point_name_used_twice_is_refused_listing_each_and_an_lsn_restores_either(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    made = []
    for table in ("first_", "second_"):
        write(sample_cluster, f"CREATE TABLE {table}(x int)")
        lsn, at = sample_cluster.execute("SELECT pg_create_restore_point('before_deploy'), now()")[0]
        made.append((str(lsn), at))
    write(sample_cluster, "CREATE TABLE third_(x int)")
    archived(sample_cluster, server)

    datadir = restored()
    result = restore(datadir, free_port(), "--target-name", "before_deploy")
    assert result["status"] == "failed" and result["_exit"] == 1, result
    error = result["error"]
    assert "restore point 'before_deploy' was created 2 times" in error and "--target-lsn" in error, error
    listed = re.findall(r"at ([0-9A-F]+/[0-9A-F]+) \(([^)]*)\)|, ([0-9A-F]+/[0-9A-F]+) \(([^)]*)\)", error)
    listed = [(a or c, datetime.fromisoformat(b or d)) for a, b, c, d in listed]
    assert len(listed) == 2, error
    for (lsn, at), (start, when) in zip(made, listed, strict=True):
        # pg_create_restore_point() returns where its record ends; the refusal, where it begins.
        assert 0 < walnames.lsn_to_int(lsn) - walnames.lsn_to_int(start) < 200, (lsn, error)
        assert abs(when - at) < timedelta(seconds=1), (at, error)
    nothing_left(datadir)
    assert RestoreRun.objects.get(pk=result["id"]).status == "failed"

    port = free_port()
    result = restore(restored(), port, "--target-lsn", listed[1][0])
    assert result["status"] == "succeeded", result
    assert tables(port, "first_", "second_", "third_") == {"first_", "second_"}


def test_a_restore_point_made_while_the_only_base_backup_ran_is_named_so(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, monkeypatch
):
    """Found by a probe: the restore point is in the archived WAL, but before the base backup is
    consistent; the refusal said it was "not in the WAL archived since the oldest base backup"."""
    from backups import basestream
    from backups.models import BackupRun

    enable_push(sample_cluster)
    start, made = basestream.ServerCompressed.start, []

    def start_then_make_a_restore_point(self, *args, **kwargs):
        started = start(self, *args, **kwargs)
        made.append(str(sample_cluster.execute("SELECT pg_create_restore_point('during_base')")[0][0]))
        return started

    monkeypatch.setattr(basestream.ServerCompressed, "start", start_then_make_a_restore_point)
    base = run_command("backup", "maldives", "--kind", "base")
    monkeypatch.undo()
    assert base["status"] == "succeeded", base
    run = BackupRun.objects.get(pk=base["id"])
    assert walnames.lsn_to_int(run.start_lsn) < walnames.lsn_to_int(made[0]) < walnames.lsn_to_int(run.end_lsn)
    write(sample_cluster, "CREATE TABLE after_(x int)")
    archived(sample_cluster, server)

    datadir = restored()
    result = restore(datadir, free_port(), "--target-name", "during_base")
    assert result["status"] == "failed", result
    assert result["error"].startswith("restore point 'during_base' (LSN "), result["error"]
    assert (
        f"was made while the oldest kept base backup (#{run.pk}, consistent from LSN {run.end_lsn}) ran"
        in result["error"]
    )
    nothing_left(datadir)


# --- 4. Where a restored cluster may be put ----------------------------------------------------


@pytest.fixture
def places(settings, db):
    """Directories the postgres OS user can reach (so that only the new checks refuse them)."""
    made = []

    def make():
        made.append(Path(tempfile.mkdtemp(prefix="bp-place-")))
        made[-1].chmod(0o755)
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def refused(path, message):
    with pytest.raises(pitr.Refused, match=message):
        pitr.check_datadir(str(path))


def test_a_data_directory_inside_another_cluster_or_a_tablespace_is_refused(places):
    cluster = places()
    (cluster / "PG_VERSION").write_text("15\n")
    (cluster / "base").mkdir()
    refused(cluster / "x", rf"inside the data directory of another cluster \({cluster} holds PG_VERSION\)")
    refused(cluster / "base" / "x", "inside the data directory of another cluster")
    running = places()
    (running / "postmaster.pid").write_text("1\n")
    refused(running / "x", "holds postmaster.pid")
    tablespace = places()
    (tablespace / "PG_15_202209061" / "16384").mkdir(parents=True)
    refused(tablespace / "x", "inside a tablespace's directory")
    refused(tablespace / "PG_15_202209061" / "16384" / "x", "inside a tablespace's directory")
    link = places() / "link"
    link.symlink_to(cluster / "base")
    refused(link / "x", "inside the data directory of another cluster")
    assert pitr.check_datadir(str(places() / "data")).name == "data"


def test_a_data_directory_in_another_clusters_wal_directory_or_behind_a_link_is_refused(places):
    """initdb --waldir puts pg_wal elsewhere, behind a link: x/data/pg_wal/archive_status resolves
    out of the data directory, into a WAL directory whose archive_status was empty."""
    other = places()
    (other / "data").mkdir()
    (other / "data" / "PG_VERSION").write_text("15\n")
    (other / "wal" / "archive_status").mkdir(parents=True)
    (other / "data" / "pg_wal").symlink_to(other / "wal")
    refused(other / "data" / "pg_wal" / "archive_status", r"inside a cluster.s WAL directory \(.*/data/pg_wal\)")
    refused(other / "wal" / "archive_status", rf"inside a cluster's WAL directory \({other / 'wal'}\)")
    refused(other / "wal" / "archive_status" / "new", "inside a cluster's WAL directory")
    kept = places()
    (kept / "000000010000000000000003").write_bytes(b"")
    refused(kept / "x", "inside a cluster's WAL directory")
    empty_dir = places() / "empty"
    empty_dir.mkdir()
    (empty_dir.parent / "link").symlink_to(empty_dir)
    refused(empty_dir.parent / "link", "is a symbolic link: give the directory it points to")


def test_a_failed_restore_gives_an_existing_directory_back_its_owner_and_mode(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, places
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    for copy in BackupCopy.objects.filter(run__kind="base", artifact="main"):
        flip_byte_in(Path(copy.location.path) / copy.key)  # fails after the directory is prepared
    target = places() / "srv"
    target.mkdir(mode=0o751)  # a DBA's empty directory: root's, not the database user's
    target.chmod(0o751)
    before = target.stat()
    result = run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(target), "--port",
        str(free_port()),
    )  # fmt: skip
    assert result["status"] == "failed" and "cannot be read intact" in result["error"], result
    after = target.stat()
    assert list(target.iterdir()) == []
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)


def test_a_data_directory_in_the_portals_storage_is_refused_and_one_under_sandbox_root_is_not(settings, places):
    settings.BACKUP_ROOT, settings.WAL_ROOT, settings.WAL_SPOOL = places(), places(), places()
    settings.NAS_ROOT = str(places())
    var = places()
    settings.VAR_DIR, settings.SANDBOX_ROOT = var, var / "sandboxes"
    refused(settings.BACKUP_ROOT / "x", "inside BACKUP_ROOT")
    refused(settings.WAL_ROOT / "x", "inside WAL_ROOT")
    refused(settings.WAL_SPOOL / "maldives", r"inside the WAL spool \(WAL_SPOOL\)")
    refused(Path(settings.NAS_ROOT) / "x", "inside NAS_ROOT")
    refused(var / "x", "inside the portal's var directory")
    sandboxes = sandbox.sandbox_root()
    refused(sandboxes, "inside the portal's var directory")
    assert pitr.check_datadir(str(sandboxes / "request-1")) == sandboxes / "request-1"


def test_a_refused_data_directory_is_journaled_and_nothing_is_written(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    inside = Path(sample_cluster.datadir) / "restored_here"
    result = run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(inside), "--port",
        str(free_port()),
    )  # fmt: skip
    assert result["_exit"] == 1 and "inside the data directory of another cluster" in result["_stderr"], result
    assert not inside.exists() and not RestoreRun.objects.exists()
    refusal = JournalEntry.objects.get(action="pitr_refused")
    assert "inside the data directory of another cluster" in refusal.details["reason"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root portal has the database OS user to keep out")
def test_a_data_directory_whose_parent_the_database_os_user_could_change_is_refused(places):
    """The new cluster's directory is the database OS user's; where that user (or any other) could
    also change a parent (its own, say /var/lib/postgresql/15; one it may write, by mode or ACL;
    a sticky one that holds the data directory itself; a link it could point elsewhere), it could
    rename the directory and put a link in its place while the portal, as root, writes into it."""
    theirs = places() / "theirs"
    theirs.mkdir()
    chown_to_db_user(theirs)
    refused(theirs / "data", rf"{theirs} belongs to postgres, and {theirs / 'data'} will be the postgres OS user's")
    open_to_all = places() / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    refused(open_to_all / "data", "can be written by a user other than root")
    sticky = places() / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: its entries are renamed only by their owners, and data will be postgres's
    refused(sticky / "data", f"{sticky} can be written by a user other than root")
    (sticky / "root's").mkdir(mode=0o755)  # below a sticky directory, in one of root's: no one else renames it
    assert pitr.check_datadir(str(sticky / "root's" / "data")) == sticky / "root's" / "data"
    by_acl = places() / "acl"
    by_acl.mkdir()
    uid = pwd.getpwnam("postgres").pw_uid
    entries = [
        (0x01, 7, 0xFFFFFFFF),
        (0x02, 7, uid),
        (0x04, 5, 0xFFFFFFFF),
        (0x10, 7, 0xFFFFFFFF),
        (0x20, 5, 0xFFFFFFFF),
    ]
    os.setxattr(
        by_acl, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    )
    assert subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", by_acl]).returncode == 0  # the ACL works
    refused(by_acl / "data", f"{by_acl} can be written by a user other than root")
    middle, real = places(), places()
    (middle / "theirs").mkdir()
    chown_to_db_user(middle / "theirs")
    subprocess.run(["runuser", "-u", "postgres", "--", "ln", "-s", real, middle / "theirs" / "l"], check=True)
    (middle / "a").symlink_to(middle / "theirs" / "l")  # root's link, through one postgres may repoint
    refused(middle / "a" / "data", f"{middle / 'a'} is a symbolic link")
    given = places() / "data"
    given.mkdir()
    chown_to_db_user(given)  # the directory itself may be theirs already: only its parents count
    assert pitr.check_datadir(str(given)) == given


@pytest.mark.skipif(os.geteuid() != 0, reason="only root writes as the database OS user")
def test_the_copys_settings_are_written_as_the_database_os_user_never_through_a_link(places):
    """After the extraction the copy's directory is the database OS user's: a link it put at
    postgresql.auto.conf (never checked by pg_verifybackup) would have had root append the
    portal's settings to any file, and a dangling one create any file."""
    from backupportal.lib.osuser import read_as_db_user, write_as_db_user

    victim = places() / "victim"
    victim.write_text("root's only\n")
    victim.chmod(0o600)
    home = places() / "copy"
    home.mkdir()
    chown_to_db_user(home)
    subprocess.run(["runuser", "-u", "postgres", "--", "ln", "-s", victim, home / "postgresql.auto.conf"], check=True)
    subprocess.run(["runuser", "-u", "postgres", "--", "ln", "-s", home.parent / "made", home / "recovery.signal"])
    with pytest.raises(OSError, match=r"could not write .*postgresql.auto.conf as the postgres OS user: .*denied"):
        write_as_db_user(home / "postgresql.auto.conf", b"port = 1\n", append=True)
    assert victim.read_text() == "root's only\n"
    with pytest.raises(OSError, match="recovery.signal"):
        write_as_db_user(home / "recovery.signal", b"")
    assert not (home.parent / "made").exists()
    write_as_db_user(home / "pg_hba.conf", b"local all all peer\n")
    assert (home / "pg_hba.conf").stat().st_uid == pwd.getpwnam("postgres").pw_uid
    conf = home / "postgresql.conf"  # production's, read-only under configuration management
    write_as_db_user(conf, b"include '/etc/x.conf'\n")
    conf.chmod(0o440)
    write_as_db_user(conf, b"#include '/etc/x.conf'\n")
    assert conf.read_bytes() == b"#include '/etc/x.conf'\n"
    assert read_as_db_user(conf) == conf.read_bytes()
    with pytest.raises(OSError, match="could not read .*victim as the postgres OS user"):
        read_as_db_user(victim)  # root's only: what a link there leads to stays unread


def test_the_copys_log_and_files_are_read_without_following_a_link_waiting_on_a_fifo_or_reading_without_end(
    tmp_path,
):
    """The restored copy's log, postmaster.pid, manifest and history files are in its directory,
    the database OS user's: a FIFO put there would have hung the restoring worker, /dev/zero
    behind a link (or a huge sparse file) would have run it out of memory."""
    from backupportal.lib.osuser import read_regular
    from restores import pitr_verdict

    log = tmp_path / "pitr-restore.log"
    os.mkfifo(log)
    assert pitr_verdict.log_text(log) == ""  # at once
    log.unlink()
    log.symlink_to("/dev/zero")
    assert pitr_verdict.log_text(log) == ""
    log.unlink()
    with open(log, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of nothing, no disk
        f.seek(0, os.SEEK_END)
        f.write(b"LOG:  last completed transaction was at log time 2026-12-06 17:00:00+00\n")
    text = pitr_verdict.log_text(log)
    assert len(text) == pitr_verdict.LOG_READ and text.endswith("17:00:00+00\n")
    assert read_regular(log, 10) == b"\0" * 10


def test_a_tree_the_database_user_can_change_is_removed_without_following_a_link_or_waiting_on_a_fifo(
    tmp_path, monkeypatch
):
    """shutil.rmtree (Python 3.11) opened a listed subdirectory with a plain open(): one swapped
    for a FIFO after the listing hung the restoring worker, the orphan sweep and the sandbox
    removal (second review of 2026-12-06). osuser.remove_tree unlinks what it finds instead."""
    from backupportal.lib.osuser import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the copy's")
    copy = tmp_path / "copy"
    (copy / "base" / "1").mkdir(parents=True)
    (copy / "base" / "1" / "16384").write_bytes(b"\0" * 8192)
    os.mkfifo(copy / "fifo")
    (copy / "link").symlink_to(outside)
    (copy / "base" / "link").symlink_to(outside / "keep")
    remove_tree(copy)
    assert not copy.exists() and (outside / "keep").read_text() == "not the copy's"
    remove_tree(copy)  # gone: nothing to do

    # pg_wal, listed and looked at as a directory, is a FIFO by the time root opens it: what
    # that user's renameat2(RENAME_EXCHANGE) loop made shutil.rmtree wait on once in 200 tries.
    (copy / "pg_wal").mkdir(parents=True)
    opening, swapped = os.open, []

    def swapped_first(path, flags, *args, **kwargs):
        if path == "pg_wal" and not swapped:
            swapped.append(True)
            (copy / "pg_wal").rmdir()
            os.mkfifo(copy / "pg_wal")
        return opening(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swapped_first)
    removing = threading.Thread(target=remove_tree, args=(copy,), daemon=True)
    removing.start()
    removing.join(10)
    assert swapped and not removing.is_alive() and not copy.exists()


@pytest.fixture
def immutable():
    """chattr +i on the files given (root alone may, on ext4): what no one can remove."""
    made = []

    def make(path):
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("this file system has no immutable flag (chattr +i)")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_what_can_be_removed_is_removed_at_any_depth_and_what_cannot_is_said(tmp_path, immutable):
    """Found by review: the first version stopped at its first error (the rest of the tree left,
    ignore_errors hiding it) and refused a tree more than 100 levels deep, which the database OS
    user could make to keep any of its directories for ever."""
    from backupportal.lib.osuser import DEEPEST, remove_tree

    tree = tmp_path / "copy"
    deep = tree.joinpath(*["d"] * (3 * DEEPEST + 5))
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    remove_tree(tree)
    assert not tree.exists()

    for name in ("a", "held", "z"):
        (tree / name / "sub").mkdir(parents=True)
        (tree / name / "sub" / "f").write_bytes(b"x")
    immutable(tree / "held" / "sub" / "f")
    with pytest.raises(PermissionError):
        remove_tree(tree)
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == ["held", "held/sub", "held/sub/f"]
    remove_tree(tree, ignore_errors=True)  # the same, unsaid


def test_the_orphan_sweep_removes_the_data_directory_and_tries_again_for_a_chain_scratch_it_could_not_remove(
    server, tmp_path, immutable
):
    """Found by review: a scratch that stayed (pg_combinebackup still writing into it, say) was
    forgotten, its `left` emptied all the same; and one that cannot be removed must not keep the
    dead PITR's data directory, a copy of production's data, for ever."""
    from restores import orphans

    datadir, chain = tmp_path / "copy", tmp_path / ".copy.chain-0a1b2c"
    (datadir / "base").mkdir(parents=True)
    (chain / "run-7").mkdir(parents=True)
    held = immutable(chain / "run-7")
    left = {"datadir": str(datadir), "created": True, "inode": datadir.stat().st_ino, "chain": str(chain)}
    dead = RestoreRun.begin(RestoreRun.Kind.PITR, "alice", server=server, into_datadir=left["datadir"])
    RestoreRun.objects.filter(pk=dead.pk).update(status="failed", host=orphans.HOST, left=left)
    orphans.remove_leftovers()
    dead.refresh_from_db()
    assert not datadir.exists() and chain.exists()
    assert dead.left == {"chain": str(chain)}  # the data directory done: never looked at again
    subprocess.run(["chattr", "-i", str(held)], check=True)
    orphans.remove_leftovers()
    dead.refresh_from_db()
    assert dead.left == {} and not chain.exists()
