"""Point-in-time recovery against real clusters: push archiving, a base backup, PITR into a new cluster."""

import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups import walingest, walnames, walspool
from backups.models import BackupRun, WalSegment
from restores.models import RestoreRun
from tests.helpers import (
    DB,
    archive_some_wal,
    enable_push,
    pitr,
    push_with_base,
    rows,
    run_command,
    switch_wal,
    wait_archived,
    write,
)
from watching.models import Alert

pytest_plugins = ["tests.walfixtures"]


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_pitr_to_a_time_has_a_and_not_b_and_latest_has_both(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    run = BackupRun.objects.get(pk=base["id"])
    assert run.start_wal and run.end_wal and run.timeline == 1 and run.start_lsn and run.end_lsn

    write(sample_cluster, "CREATE TABLE probe(tx text, at timestamptz DEFAULT now())")
    write(sample_cluster, "INSERT INTO probe(tx) VALUES ('A')")
    write(sample_cluster, 'CREATE UNLOGGED TABLE "scratch ""x"""(n int); INSERT INTO "scratch ""x""" VALUES (1)')
    time.sleep(1.05)
    target = timezone.localtime().replace(microsecond=0)
    time.sleep(0.05)
    write(sample_cluster, "INSERT INTO probe(tx) VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))

    at_t = restored()
    port = free_port()
    result = run_command(
        "restore",
        "--server",
        "maldives",
        "--target-time",
        target.strftime("%Y-%m-%d %H:%M:%S%z")[:-2] + ":" + target.strftime("%z")[-2:],
        "--into-datadir",
        str(at_t),
        "--port",
        str(port),
    )
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]
    # Every file was checked: by its CRC-32C as extracted, the rest by pg_verifybackup.
    assert "pg_verifybackup: backup successfully verified; the " in result["notes"]
    assert "files' CRC-32C compared with it as they were extracted" in result["notes"]
    assert result["recovered_to"] and result["recovered_to"] <= target.isoformat(sep=" ")
    restore = RestoreRun.objects.get(pk=result["id"])
    assert restore.kind == "pitr"
    # What it read (found by review: "0 bytes"): the base backup and at least one WAL segment.
    assert restore.bytes_done >= restore.backup_run.size + restore.server.wal_segment_size
    assert not (at_t / "recovery.signal").exists() and not (at_t / "recovery.conf").exists()
    auto_conf = (at_t / "postgresql.auto.conf").read_text()
    assert "recovery_target_time" in auto_conf and "archive_mode = 'off'" in auto_conf
    assert "cron.launch_active_jobs = 'off'" in auto_conf  # started with it: a name without pg_cron

    latest = restored()
    port2 = free_port()
    result = run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(latest), "--port", str(port2)
    )
    assert result["status"] == "succeeded", result
    assert rows(port2, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
    # latest keeps its meaning (all the archived WAL) and says which moment that was.
    assert result["reached"].startswith("--target latest: recovered to the end of the archived WAL (0000")
    assert f"its last transaction committed at {result['recovered_to']}" in result["reached"]
    # An unlogged table comes back empty, as PostgreSQL recovery leaves it: said, not hidden.
    assert rows(port2, 'SELECT count(*) FROM "scratch ""x"""') == [(0,)]
    assert "unlogged tables in reliabilitymaldives are empty in the copy" in result["notes"]
    assert 'public."scratch ""x"""' in result["notes"]


def test_a_restore_is_refused_before_anything_is_written(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    push_with_base(sample_cluster, server)
    datadir, port = restored(), free_port()
    now = timezone.localtime()
    cases = [
        (["--target-time", now.strftime("%Y-%m-%d %H:%M:%S")], "has no timezone"),
        (["--target-time", "yesterday at noon"], "cannot read the target time"),
        (["--target-time", (now + timedelta(hours=1)).isoformat(sep=" ")], "is in the future"),
        (["--target-time", (now - timedelta(days=1)).isoformat(sep=" ")], "before the oldest moment"),
        (["--target-lsn", "not-an-lsn"], "is not an LSN"),
        (["--target-lsn", "0/1"], "before the end of the oldest kept base backup"),
        (["--target-lsn", "FF/0"], "beyond the archived WAL"),
        (["--target", "latest", "--target-name", "x"], "exactly one target"),
        (["--target-time", (now - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S+16:00")], "16 hours or more"),
        (["--target-name", "é" * 32], "at most 63 bytes"),
    ]
    for target, message in cases:
        result = pitr(datadir, port, *target)
        assert result["_exit"] == 1 and message in result["_stderr"], (target, result)
    result = pitr(datadir, sample_cluster.port, "--target", "latest")
    assert f"port {sample_cluster.port} is in use" in result["_stderr"]
    result = pitr(datadir, 80, "--target", "latest")  # root binds it; postgres would fail after the extraction
    assert "port 80 is not a port the new cluster can listen on" in result["_stderr"]
    datadir.mkdir()
    (datadir / "precious").write_text("do not touch")
    result = pitr(datadir, port, "--target", "latest")
    assert "is not empty" in result["_stderr"]
    assert [p.name for p in datadir.iterdir()] == ["precious"]
    assert not RestoreRun.objects.exists()
    assert JournalEntry.objects.filter(action="pitr_refused").count() == len(cases) + 3


def test_a_gap_in_the_wal_catalog_refuses_the_restore_naming_the_segment(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    push_with_base(sample_cluster, server)
    lost = WalSegment.objects.filter(server=server, segno__isnull=False).order_by("-segno")[1]
    lost.delete()
    datadir = restored()
    result = pitr(datadir, free_port(), "--target", "latest")
    assert result["_exit"] == 1 and f"WAL segment {lost.name} is missing" in result["_stderr"], result
    assert not datadir.exists()
    # The incremental run finds the same gap, and the alert says which segment.
    chain = run_command("backup", "maldives", "--kind", "incremental")
    assert chain["status"] == "failed" and lost.name in chain["error"]
    assert lost.name in Alert.objects.get(condition="wal_gap").message


def test_a_deleted_or_corrupted_wal_file_makes_the_restore_refuse_naming_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    push_with_base(sample_cluster, server)
    segments = list(WalSegment.objects.filter(server=server, segno__isnull=False).order_by("-segno"))
    victim = segments[1]
    copy = victim.copies.get(location__name="wal")
    path = Path(copy.location.path) / copy.key
    original = path.read_bytes()

    path.unlink()
    datadir = restored()
    result = pitr(datadir, free_port(), "--target", "latest")
    assert result["_exit"] == 1, result
    assert f"WAL segment {victim.name} is missing from every location" in result["_stderr"]
    assert not datadir.exists()

    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    result = pitr(datadir, free_port(), "--target", "latest")
    assert result["_exit"] == 1 and result["status"] == "failed", result
    assert f"WAL segment {victim.name} cannot be read intact" in result["error"]
    assert "corrupt: " in result["error"] and "sha256" in result["error"]
    assert not datadir.exists()  # what the failed restore wrote is gone


def test_pitr_to_a_restore_point_an_lsn_or_past_the_last_commit(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    sample_cluster.execute("SELECT pg_create_restore_point('before_b')")
    lsn = sample_cluster.execute("SELECT pg_current_wal_lsn()")[0][0]
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))

    port = free_port()
    result = pitr(restored(), port, "--target-name", "before_b")
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe") == [("A",)]

    port = free_port()
    result = pitr(restored(), port, "--target-lsn", str(lsn))
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe") == [("A",)]
    assert result["recovered_lsn"] and walnames.lsn_to_int(result["recovered_lsn"]) >= walnames.lsn_to_int(str(lsn))

    # A moment after the last archived commit: recovery replays everything there is.
    time.sleep(1)
    port = free_port()
    result = pitr(restored(), port, "--target-time", timezone.localtime().isoformat(sep=" "))
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]

    result = pitr(restored(), free_port(), "--target-name", "never_created")
    assert result["status"] == "failed" and "restore point 'never_created' is not in the WAL" in result["error"]


def test_an_lsn_at_a_segments_end_recovers_through_the_next_segments_first_record(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """pg_switch_wal() returns the switch's end: the next record, where recovery stops, starts
    the next segment."""
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    lsn = sample_cluster.execute("SELECT pg_switch_wal()")[0][0]
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    port = free_port()
    result = pitr(restored(), port, "--target-lsn", str(lsn))
    assert result["status"] == "succeeded", result.get("error")
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]


def test_restore_point_names_are_matched_and_passed_to_recovery_byte_for_byte(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Recovery compares names with strcmp: a backslash, a trailing blank or a line break is
    part of the name, in the WAL and in postgresql.auto.conf (which reads backslash escapes)."""
    enable_push(sample_cluster)
    sample_cluster.execute("ALTER SYSTEM SET log_min_messages = 'fatal'")  # production's logging is not ours
    sample_cluster.execute("SELECT pg_reload_conf()")
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    sample_cluster.execute("SELECT pg_create_restore_point(%s)", ("before\\new",))
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    sample_cluster.execute("SELECT pg_create_restore_point(%s)", ("rp \nnext",))
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    for name, expected in (("before\\new", [("A",)]), ("rp \nnext", [("A",), ("B",)])):
        port = free_port()
        result = pitr(restored(), port, "--target-name", name)
        assert result["status"] == "succeeded", (name, result.get("error"))
        assert rows(port, "SELECT tx FROM probe ORDER BY tx") == expected
    result = pitr(restored(), free_port(), "--target-name", "rp ")  # a prefix of one: no restore point
    assert result["status"] == "failed" and "restore point 'rp ' is not in the WAL" in result["error"]


def test_a_restored_cluster_adds_nothing_to_the_production_archive(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    archive_some_wal(sample_cluster, tables=1)
    port = free_port()
    assert pitr(restored(), port, "--target", "latest")["status"] == "succeeded"
    before = {s.name for s in WalSegment.objects.filter(server=server)}
    spool = walspool.spool_dir(server)
    spooled = sorted(p.name for p in spool.iterdir())

    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=DB, autocommit=True) as copy:
        assert copy.execute("SHOW archive_mode").fetchone()[0] == "off"
        for i in range(3):  # the copy's new timeline writes and switches WAL...
            copy.execute(f"CREATE TABLE on_the_copy_{i}(x int)")
            copy.execute("SELECT pg_switch_wal()")
        assert copy.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone() == (0, 0)
    time.sleep(1)
    assert sorted(p.name for p in spool.iterdir()) == spooled  # ...and none of it reaches the production spool
    walingest.ingest(server)
    assert {s.name for s in WalSegment.objects.filter(server=server)} == before
    assert not WalSegment.objects.filter(server=server, timeline__gt=1).exists()


def test_the_incremental_runs_prove_the_chain_and_name_their_wal_range(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    enable_push(sample_cluster)
    refused = run_command("backup", "maldives", "--kind", "incremental")
    assert refused["status"] == "failed" and "no base backup" in refused["error"]
    base = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    write(sample_cluster, "CREATE TABLE one(x int)")
    first = run_command("backup", "maldives", "--kind", "incremental")
    assert first["status"] == "succeeded", first
    assert first["method"] == "wal-chain" and "parent" not in first  # 15 has no block-level incrementals
    run = BackupRun.objects.get(pk=first["id"])
    assert run.start_wal == base.start_wal and run.end_wal > base.end_wal
    assert run.details["chain_base_run"] == base.pk and run.details["segments"] >= 2
    assert WalSegment.objects.filter(server=server, name=run.end_wal).exists()  # switched, archived, ingested

    write(sample_cluster, "CREATE TABLE two(x int)")
    second = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "incremental")["id"])
    assert second.status == "succeeded"
    server.refresh_from_db()
    assert (
        walnames.segno_of(second.start_wal, server.wal_segment_size)
        == walnames.segno_of(run.end_wal, server.wal_segment_size) + 1
    )


def test_a_bad_primary_copy_falls_back_to_the_nas_copy(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, settings
):
    import shutil
    import tempfile

    from backups.models import BackupCopy, StorageLocation

    nas = Path(tempfile.mkdtemp(prefix="bp-nas-"))
    settings.NAS_ROOT = str(nas)
    StorageLocation.sync_from_settings()
    try:
        push_with_base(sample_cluster, server)
        segment = WalSegment.objects.filter(server=server, segno__isnull=False).order_by("-segno")[1]
        assert {c.location.name: c.status for c in segment.copies.all()} == {"wal": "ok", "nas": "ok"}
        primary_wal = segment.copies.get(location__name="wal")
        (Path(primary_wal.location.path) / primary_wal.key).write_bytes(b"not what was archived")
        base = BackupRun.objects.get(kind="base")
        (backup_root / base.key).unlink()

        port = free_port()
        result = pitr(restored(), port, "--target", "latest")
        assert result["status"] == "succeeded", result
        assert f"WAL segment {segment.name}: read from nas after wal: corrupt" in result["notes"]
        assert f"base backup #{base.pk}: read from nas after primary: missing" in result["notes"]
        assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
        primary_wal.refresh_from_db()
        assert primary_wal.status == BackupCopy.Status.BAD
    finally:
        shutil.rmtree(nas, ignore_errors=True)
