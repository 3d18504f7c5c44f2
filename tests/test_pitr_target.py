"""PITR reaches its target or fails: judged from the recovered cluster, never assumed.

Real clusters, push archiving. A target past the archived WAL makes the source commit one
transaction and switch WAL (or refuses, naming how far the archive reaches); recovery that ends
short of the target fails, saying where it ended and what was missing.
"""

import fcntl
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.lib.pgdatadir import pg_bin
from backupportal.models import JournalEntry
from backups import walchain, walingest, walnames, walspool
from backups.models import WalSegment
from restores import pitr, pitr_points
from restores.models import RestoreRun
from tests.helpers import a_second_later, enable_push, pitr_to, rows, run_command, switch_wal, wait_archived
from tests.helpers import pitr as pitr_into

pytest_plugins = ["tests.walfixtures"]

DB = "reliabilitymaldives"


def write(cluster, sql):
    cluster.execute(sql, dbname=DB)


def archived(cluster, server):
    """Switch WAL, wait for the archiver, ingest: everything so far is in the catalog."""
    name = switch_wal(cluster)
    wait_archived(cluster, name)
    walingest.ingest(server)
    return name


def with_a_base_and_row_a(cluster, server):
    enable_push(cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    return archived(cluster, server)


def leave_time_wait(port):
    """Close a connection from the listening side first, as a stopping postgres does: the port
    keeps a TIME_WAIT socket for a minute, with no listener."""
    listener = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()
    client.recv(1)  # the listener's FIN
    client.close()
    listener.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: it said "in use"


def test_a_port_left_in_time_wait_is_free_and_a_listened_one_is_not():
    port = free_port()
    leave_time_wait(port)
    assert pitr.check_port(port) == port
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(pitr.Refused, match=f"port {port} is in use"):
            pitr.check_port(port)


def test_a_target_between_two_commits_recovers_exactly_the_rows_before_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    with_a_base_and_row_a(sample_cluster, server)
    write(sample_cluster, "INSERT INTO probe VALUES ('A2')")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    archived(sample_cluster, server)

    port = free_port()
    leave_time_wait(port)  # a cluster stopped on it a moment ago: postgres can bind it, so may we
    result = pitr_to(restored(), port, target)
    assert result["status"] == "succeeded" and result["_exit"] == 0, result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("A2",)]
    assert result["reached"].startswith(f"recovery stopped at {target.isoformat(sep=' ')}: right before transaction")
    assert datetime.fromisoformat(result["recovered_to"]) <= target
    assert result["chain"] == [result["base_backup"]]
    assert "switched WAL" not in result["notes"]  # the archive held a commit after the target
    assert not JournalEntry.objects.filter(action="pitr_wal_switched").exists()


def test_a_target_after_the_archived_wal_has_the_source_switch_and_recovers_every_row_before_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    last_archived = with_a_base_and_row_a(sample_cluster, server)
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")  # committed, not archived
    target = a_second_later()
    assert walchain.last_segno(server) == walnames.segno_of(last_archived, server.wal_segment_size)

    port = free_port()
    result = pitr_to(restored(), port, target)
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
    assert datetime.fromisoformat(result["recovered_to"]) <= target
    assert f"{server}'s clock read" in result["notes"]
    switched = JournalEntry.objects.get(action="pitr_wal_switched")
    xid, segment = switched.details["xid"], switched.details["segment"]
    assert f"committed transaction {xid} on maldives and switched WAL" in result["notes"]
    assert f"segment {segment} archived and ingested" in result["notes"]
    # The portal's transaction wrote a commit record (a switch alone writes none) ...
    dump = subprocess.run(
        [str(pg_bin() / "pg_waldump"), "--path", str(sample_cluster.datadir / "pg_wal"), "--rmgr=Transaction", segment],
        capture_output=True,
        text=True,
    ).stdout
    assert re.search(rf"tx: +{xid}, .*desc: COMMIT", dump), dump
    # ... and recovery stopped at the first commit after the target: that one, or one before it.
    stopped = re.match(r"recovery stopped at .*: right before transaction (\d+)", result["reached"])
    assert stopped and int(stopped.group(1)) <= int(xid), result["reached"]
    run = RestoreRun.objects.get(pk=result["id"])
    assert run.status == "succeeded" and "switched WAL" in run.notes


def test_a_target_past_the_archive_is_refused_when_the_source_cannot_help(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    with_a_base_and_row_a(sample_cluster, server)
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")  # committed, not archived
    datadir = restored()

    future = timezone.localtime() + timedelta(hours=1)
    result = pitr_to(datadir, free_port(), future)
    assert result["_exit"] == 1 and "is in the future" in result["_stderr"], result

    # A role that may not switch WAL is told the grant it needs.
    write(sample_cluster, "CREATE ROLE viewer LOGIN")
    hba = sample_cluster.datadir / "pg_hba.conf"
    hba.write_text("host all viewer 127.0.0.1/32 trust\n" + hba.read_text())
    sample_cluster.reload()
    superuser_dsn = server.dsn
    server.dsn = sample_cluster.dsn(DB, user="viewer")
    server.save()
    target = a_second_later()
    result = pitr_to(datadir, free_port(), target)
    assert result["_exit"] == 1, result
    assert "GRANT EXECUTE ON FUNCTION pg_switch_wal() TO viewer" in result["_stderr"]
    assert f"the archived WAL of maldives ends before {target.isoformat(sep=' ')}" in result["_stderr"]
    server.dsn = superuser_dsn
    server.save()

    # A source that cannot be reached: refused, naming the last moment the archive reaches.
    sample_cluster.stop()
    result = pitr_to(datadir, free_port(), target)
    assert result["_exit"] == 1 and "cannot be reached" in result["_stderr"], result
    reach = re.search(r"it reaches targets before (\S+ \S+), when its last archived transaction", result["_stderr"])
    assert reach, result["_stderr"]
    assert datetime.fromisoformat(reach.group(1)) < target

    assert not datadir.exists() and not RestoreRun.objects.exists()
    assert JournalEntry.objects.filter(action="pitr_refused").count() == 3
    assert not JournalEntry.objects.filter(action="pitr_wal_switched").exists()


def test_recovery_that_ends_short_of_the_target_fails_saying_where_it_ended(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    holds_a = with_a_base_and_row_a(sample_cluster, server)
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    holds_b = archived(sample_cluster, server)
    # The archive holds other WAL under B's segment name (say, an archive_command that copied
    # the wrong file): every checksum matches what was catalogued, replay stops there.
    good, bad = (WalSegment.objects.get(server=server, name=n) for n in (holds_a, holds_b))
    for copy in bad.copies.select_related("location"):
        source = good.copies.get(location=copy.location)
        shutil.copyfile(Path(copy.location.path) / source.key, Path(copy.location.path) / copy.key)
        copy.sha256, copy.size = source.sha256, source.size
        copy.save(update_fields=["sha256", "size"])
    bad.sha256, bad.size = good.sha256, good.size
    bad.save(update_fields=["sha256", "size"])

    datadir = restored()
    result = pitr_to(datadir, free_port(), target)
    assert result["status"] == "failed" and result["_exit"] == 1, result
    error = result["error"]
    assert error.startswith("recovery ended at LSN "), error
    assert f"short of the target {target.isoformat(sep=' ')}: no commit after" in error
    assert holds_b in error  # what was missing
    assert result["recovered_to"] and result["recovered_lsn"]
    assert not datadir.exists()  # nothing left that could be mistaken for a good restore
    assert RestoreRun.objects.get(pk=result["id"]).status == "failed"
    assert JournalEntry.objects.filter(action="pitr_failed").count() == 1


def test_a_segment_lost_from_the_end_of_the_catalog_fails_the_restore_naming_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    with_a_base_and_row_a(sample_cluster, server)
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    lost = archived(sample_cluster, server)
    WalSegment.objects.filter(server=server, name=lost).delete()  # the catalog now ends before B
    target = a_second_later()

    datadir = restored()
    result = pitr_to(datadir, free_port(), target)
    assert result["status"] == "failed" and f"WAL segment {lost} is missing" in result["error"], result
    assert JournalEntry.objects.filter(action="pitr_wal_switched").count() == 1  # it asked for the WAL after
    assert not datadir.exists()


def into(datadir, port):
    return ["--into-datadir", str(datadir), "--port", str(port)]


def hold_the_ingest_lock(server, seconds):
    """An ingest pass of the worker's, running: the spool's lock held for `seconds`, in a thread."""
    spool = walspool.spool_dir(server)
    fd = os.open(spool / ".ingest.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def release():
        time.sleep(seconds)
        os.close(fd)

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_latest_waits_for_an_ingest_pass_already_running_and_refuses_if_it_never_ends(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, monkeypatch
):
    """A restore plans on the catalog: WAL archived but still in the spool behind a running pass
    must be catalogued first, or 'latest' would stop before it and call that the end."""
    with_a_base_and_row_a(sample_cluster, server)
    before_b = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))  # B in the spool, not catalogued
    monkeypatch.setattr(walingest, "HANDOVER_WAIT", 2)
    holder = hold_the_ingest_lock(server, 12)  # a pass that does not end within the wait
    try:
        result = run_command("restore", "--server", "maldives", "--target", "latest", *into(restored(), free_port()))
        assert result["_exit"] != 0 and "still wait in its spool behind another ingest pass" in result["_stderr"]
        # An earlier target need not wait for them: it goes on, and says what it could not see.
        port = free_port()
        result = run_command("restore", "--server", "maldives", "--target-time", before_b.isoformat(sep=" "),
                             *into(restored(), port))  # fmt: skip
        assert result.get("status") == "succeeded", result
        assert any("still wait in its spool" in w for w in result["warnings"])
        assert rows(port, "SELECT tx FROM probe") == [("A",)]
    finally:
        holder.join()

    monkeypatch.setattr(walingest, "HANDOVER_WAIT", 30)
    holder = hold_the_ingest_lock(server, 3)  # one that ends: the restore waits for it, then ingests
    port = free_port()
    result = run_command("restore", "--server", "maldives", "--target", "latest", *into(restored(), port))
    holder.join()
    assert result.get("status") == "succeeded", result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]


def test_latest_is_refused_while_archived_wal_cannot_be_ingested(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Found by a probe: B's segment, archived and then damaged in the spool, could not be
    ingested; --target latest succeeded as "the end of the archived WAL" with A alone, B and C (both
    archived by the server) left out but for a warning. It is refused, naming the segment."""
    with_a_base_and_row_a(sample_cluster, server)
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    damaged = switch_wal(sample_cluster)
    wait_archived(sample_cluster, damaged)
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    os.truncate(walspool.spool_dir(server) / damaged, server.wal_segment_size // 2)

    datadir = restored()
    result = run_command("restore", "--server", "maldives", "--target", "latest", *into(datadir, free_port()))
    assert result["_exit"] != 0 and "--target latest would stop before it" in result["_stderr"], result
    assert damaged in result["_stderr"] and not datadir.exists()


def test_a_switch_for_a_time_target_waits_for_productions_segment_not_another_timelines(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Found by a probe: with timeline 2's segments of the next numbers catalogued (a copy's own
    WAL archived into production's spool), the wait for the segment the source switched ended at
    once on timeline 2's, and the restore failed on a gap one ingest pass later filled."""
    with_a_base_and_row_a(sample_cluster, server)
    server.refresh_from_db()
    size = server.wal_segment_size
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")  # committed, not archived
    current = sample_cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    spool = walspool.spool_dir(server)
    for segno in range(walnames.segno_of(current, size), walnames.segno_of(current, size) + 4):
        foreign = spool / walnames.segment_name(2, segno, size)
        foreign.write_bytes(b"\1" * size)  # not a header of this server's (nor zeros, refused as damaged)
        foreign.chmod(0o640)
    walingest.ingest(server)
    assert WalSegment.objects.filter(server=server, timeline=2).count() == 4
    target = a_second_later()
    port = free_port()
    result = pitr_to(restored(), port, target)
    assert result.get("status") == "succeeded", result.get("error") or result.get("_stderr")
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]


def test_a_gap_after_the_target_refuses_neither_a_time_nor_a_restore_point(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, monkeypatch
):
    """Restore to just before the incident, while a later segment is lost: recovery never needs it.
    And a restore point's search reads the WAL a window at a time, never all of it at once."""
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    sample_cluster.execute("SELECT pg_create_restore_point('rp1')")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    archived(sample_cluster, server)
    for _ in range(6):
        write(sample_cluster, "INSERT INTO probe VALUES ('C')")
        lost = switch_wal(sample_cluster)
        wait_archived(sample_cluster, lost)
    write(sample_cluster, "INSERT INTO probe VALUES ('D')")
    archived(sample_cluster, server)
    WalSegment.objects.filter(server=server, name=lost).delete()  # lost from the archive, long after

    port = free_port()
    result = pitr_to(restored(), port, target)
    assert result["status"] == "succeeded", result.get("error")
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]

    monkeypatch.setattr(pitr_points, "SEARCH_WINDOW", 2)
    staged_at_once, stage_wal = [], pitr_points.stage_wal

    def counting(plan, first, last):
        stage_wal(plan, first, last)
        staged_at_once.append(len(list(plan.unchecked.iterdir())))

    monkeypatch.setattr(pitr_points, "stage_wal", counting)
    port = free_port()
    result = run_command("restore", "--server", "maldives", "--target-name", "rp1", *into(restored(), port))
    assert result["status"] == "succeeded", result.get("error")
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]
    assert f"the archive has a gap at segment {lost}" in result["notes"]
    assert len(staged_at_once) >= 3 and max(staged_at_once) <= 3  # a window, and the segment before it
    result = run_command("restore", "--server", "maldives", "--target-name", "never", *into(restored(), free_port()))
    assert result["status"] == "failed" and f"up to segment {lost}, missing from the archive" in result["error"]


def test_a_base_backups_end_is_read_on_the_servers_clock_not_the_portals(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    """Found by review: stop_time was the portal's clock, and a PITR compares its target with the
    server's commit times; with the clocks minutes apart it chose a base consistent only after the
    target (or refused good targets)."""
    import time_machine

    from backups.models import BackupRun

    enable_push(sample_cluster)
    with time_machine.travel(timezone.now() - timedelta(hours=2), tick=True):  # the portal's clock is behind
        result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "succeeded", result
    stop_time = BackupRun.objects.get(pk=result["id"]).stop_time
    server_now = sample_cluster.execute("SELECT now()")[0][0]
    assert timedelta(0) <= server_now - stop_time < timedelta(minutes=5)


def test_a_base_tests_reference_logical_backup_is_chosen_on_the_portals_clock(server, db):
    """Found by review of the fix above: with stop_time on the server's clock, a server 2 h ahead
    made a logical backup taken after the base its reference (a table doubled since: "shrank 50%")."""
    from backups.models import BackupRun, Database
    from restores.validation import logical_counts_before

    database = Database.of_dsn(server)
    now = timezone.now()

    def logical(minutes, rows):
        return BackupRun.objects.create(
            server=server, database=database, kind="logical", status="succeeded", size=1,
            finished_at=now + timedelta(minutes=minutes), details={"row_counts": {"public.users": rows}},
        )  # fmt: skip

    before = logical(-10, 200)
    logical(+10, 400)  # after the base, on the portal's clock
    base = BackupRun.objects.create(
        server=server, kind="base", status="succeeded", size=1, finished_at=now,
        details={"stop_time": (now + timedelta(hours=2)).isoformat(), "stop_time_portal": now.isoformat()},
    )  # fmt: skip
    assert logical_counts_before(base) == (before.pk, {"public.users": 200})


def lsn_text(position):
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def test_an_lsn_target_holds_what_began_before_it_and_no_commit_after_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Found by a probe: with recovery_target_inclusive on, recovery stopped after the first record
    beginning at or past the LSN. An LSN inside C's insert record let C's commit, after it, in, and
    the restore said it had stopped "at or past the target". Every record that begins before the
    LSN, nothing after: the LSN of C's insert itself, or one inside it, leaves C out."""
    import psycopg

    with_a_base_and_row_a(sample_cluster, server)
    dsn = {"host": "127.0.0.1", "port": sample_cluster.port, "user": "postgres", "dbname": DB, "autocommit": True}
    with psycopg.connect(**dsn) as conn:
        conn.execute("INSERT INTO probe VALUES ('B')")
        before_c = walnames.lsn_to_int(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        conn.execute("INSERT INTO probe VALUES ('C')")
    archived(sample_cluster, server)

    for target in (before_c, before_c + 1, before_c + 8):
        port = free_port()
        result = pitr_into(restored(), port, "--target-lsn", lsn_text(target))
        assert result["status"] == "succeeded", result
        assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)], lsn_text(target)
        assert result["reached"].startswith(f"recovery stopped at LSN {lsn_text(target)}: right before the record")


def test_an_lsn_read_while_a_transaction_was_open_leaves_its_later_commit_out(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    import psycopg

    with_a_base_and_row_a(sample_cluster, server)
    dsn = {"host": "127.0.0.1", "port": sample_cluster.port, "user": "postgres", "dbname": DB}
    with psycopg.connect(**dsn) as late:
        late.execute("INSERT INTO probe VALUES ('L')")
        target = sample_cluster.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0]
        late.commit()
    after_l = sample_cluster.execute("SELECT pg_current_wal_lsn()::text")[0][0]  # read after L's commit
    write(sample_cluster, "INSERT INTO probe VALUES ('M')")
    archived(sample_cluster, server)

    port = free_port()
    assert pitr_into(restored(), port, "--target-lsn", target)["status"] == "succeeded"
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]
    port = free_port()
    assert pitr_into(restored(), port, "--target-lsn", after_l)["status"] == "succeeded"
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("L",)]
