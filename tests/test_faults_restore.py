"""Restores under faults: every copy of a base backup rotten (PITR falls back to an older one),
and a flipped byte in the middle of a large logical dump (the copy is marked bad, the next
location is read, and a restore with no good copy left leaves nothing behind)."""

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from backupportal.lib import sampledata
from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups import walingest, walnames
from backups.models import BackupCopy, BackupRun, StorageLocation
from restores.models import RestoreRun
from tests.helpers import (
    a_second_later,
    child_named,
    enable_push,
    flip_byte_in,
    pitr,
    pitr_to,
    register,
    rows,
    run_command,
    switch_wal,
    wait_archived,
)

pytest_plugins = ["tests.walfixtures"]
pytestmark = pytest.mark.django_db(transaction=True)
DB = "reliabilitymaldives"


def write(cluster, sql):
    cluster.execute(sql, dbname=DB)


def base_backup():
    result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "succeeded", result
    assert {c["location"] for c in result["copies"] if c["status"] == "ok"} >= {"primary", "nas"}, result
    return BackupRun.objects.get(pk=result["id"])


def file_of(copy):
    return Path(copy.location.path) / copy.key


def hide_segment(name, into):
    """The segment vanishes from every location (the catalog still lists it): a gap in the chain."""
    moved = []
    for copy in BackupCopy.objects.filter(wal_segment__name=name).select_related("location"):
        target = Path(into) / f"{copy.location.name}-{name}"
        shutil.move(file_of(copy), target)
        moved.append((target, file_of(copy)))
    assert moved
    return moved


def bad_sector(path):
    """4 KiB of garbage in the middle. One flipped byte may still inflate (to wrong bytes, which
    gpg's MDC catches only at the end); garbage this long stops the inflate where it starts."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(4096))


def rot_every_copy(run, artifact):
    """A bad sector in each of the run's two copies (primary, NAS) of `artifact`; the copies."""
    rotten = list(run.copies.filter(artifact=artifact).select_related("location"))
    assert len(rotten) == 2
    for copy in rotten:
        bad_sector(file_of(copy))
    return rotten


def no_helper_left():
    extracting = [t for t in threading.enumerate() if t.name.startswith("extract into")]
    return not extracting and all(child_named(os.getpid(), name) is None for name in ("zstd", "gpg"))


def test_pitr_falls_back_to_an_older_base_backup_when_every_copy_of_the_newer_is_bad(
    server, sample_cluster, passphrase_file, backup_root, nas_root, wal_spool, restored
):
    StorageLocation.sync_from_settings()  # the NAS mirror: two copies of everything
    enable_push(sample_cluster)
    older = base_backup()
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    gap = switch_wal(sample_cluster)  # a segment only the older base backup's chain needs
    wait_archived(sample_cluster, gap)
    walingest.ingest(server)
    newer = base_backup()
    size = server.wal_segment_size
    assert (
        walnames.segno_of(older.end_wal, size) < walnames.segno_of(gap, size) < walnames.segno_of(newer.start_wal, size)
    )
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    rotten = rot_every_copy(newer, "main")  # unseen by verify: the restore finds out while streaming

    # 1. Every copy of the newer base backup fails its sha256: the older one, and more WAL, reach the target.
    datadir, port = restored(), free_port()
    result = pitr_to(datadir, port, target)
    assert result["status"] == "succeeded", result
    # zstd -d stops at the bad sector (gpg's write then breaks) or the sha256 at the end of the copy
    # fails first: either way no byte of it is restored.
    fallback = f"base backup #{newer.pk} unreadable on every location; using #{older.pk}"
    assert fallback in result["notes"]
    assert result["base_backup"] == older.pk and RestoreRun.objects.get(pk=result["id"]).backup_run == older
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
    assert {c.status for c in newer.copies.filter(artifact="main")} == {"bad"}
    assert JournalEntry.objects.filter(action="pitr_base_fallback", details__using=older.pk).exists()

    # 2. The older base backup's chain has a gap now: refused before anything is written, saying why.
    hidden = Path(tempfile.mkdtemp(prefix="bp-hidden-"))
    moved = hide_segment(gap, hidden)
    datadir, port = restored(), free_port()
    result = pitr_to(datadir, port, target)
    assert result["_exit"] == 1, result
    error = result["_stderr"]
    assert f"base backup #{newer.pk} has no healthy copy in any enabled location" in error
    assert "no base backup with a complete WAL chain to the target is readable" in error
    assert f"#{older.pk}: WAL segment {gap} is missing from every location" in error
    assert not datadir.exists()
    assert JournalEntry.objects.filter(action="pitr_refused").exists()

    # 3. The same gap found only while restoring (the rot not yet known): failed, nothing left behind.
    BackupCopy.objects.filter(pk__in=[c.pk for c in rotten]).update(status="ok", last_error="")
    datadir, port = restored(), free_port()
    result = pitr_to(datadir, port, target)
    assert result["_exit"] == 1 and result["status"] == "failed", result
    assert f"base backup #{newer.pk} cannot be read intact from any location" in result["error"]
    assert f"#{older.pk}: WAL segment {gap} is missing from every location" in result["error"]
    assert not datadir.exists() and no_helper_left()
    assert {c.status for c in newer.copies.filter(artifact="main")} == {"bad"}

    # 4. The segment back: the plan skips the known-bad base backup at once.
    for source, back in moved:
        shutil.move(source, back)
    shutil.rmtree(hidden)
    datadir, port = restored(), free_port()
    result = pitr_to(datadir, port, target)
    assert result["status"] == "succeeded", result
    assert fallback in result["notes"] and result["base_backup"] == older.pk
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]


def test_pitr_falls_back_to_an_older_base_backup_when_the_newers_manifest_is_bad_everywhere(
    server, sample_cluster, passphrase_file, backup_root, nas_root, wal_spool, restored
):
    """The manifest of a backup the server compressed is fetched beside the extraction
    (restores.pitr_extract.Extraction): its failure is the base backup's, as when fetched after."""
    StorageLocation.sync_from_settings()
    enable_push(sample_cluster)
    older = base_backup()
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    newer = base_backup()
    assert newer.details["manifest_in_tar"] is False  # the server compressed it: its manifest is apart
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    rot_every_copy(newer, "manifest")

    datadir, port = restored(), free_port()
    result = pitr(datadir, port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert f"base backup #{newer.pk} unreadable on every location; using #{older.pk}" in result["notes"]
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
    assert {c.status for c in newer.copies.filter(artifact="manifest")} == {"bad"}
    assert {c.status for c in newer.copies.filter(artifact="main")} == {"ok"}  # its tar was fine
    assert not list(datadir.rglob("*backup_manifest.early*")) and no_helper_left()


def test_a_restore_test_of_a_rotten_base_backup_fails_and_does_not_fall_back(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """A restore test proves one backup: restoring another one instead would be a lie."""
    from restores.restoretest import run_restore_test

    settings.SANDBOX_ROOT = Path(tempfile.mkdtemp(prefix="bp-sandboxes-"))
    settings.SANDBOX_ROOT.chmod(0o755)
    enable_push(sample_cluster)
    older = base_backup_primary()
    newer = base_backup_primary()
    flip_byte_in(file_of(newer.copies.get(artifact="main")))
    test = run_restore_test(server, actor="alice", kind="base")
    assert test.status == "failed", test.error
    assert f"base backup #{newer.pk} cannot be read intact" in test.error
    assert RestoreRun.objects.get(restore_test=test).backup_run_id == newer.pk != older.pk
    assert list(settings.SANDBOX_ROOT.iterdir()) == []
    shutil.rmtree(settings.SANDBOX_ROOT)


def test_a_restore_test_of_a_base_backup_a_restore_would_not_use_fails_naming_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """The newest base backup is not on production's timeline history (here its catalog row says
    timeline 2, as one taken on an old primary after a failover would): a restore to its end
    would use the older one, and passing on that would say nothing of this one."""
    from restores.restoretest import run_restore_test

    settings.SANDBOX_ROOT = Path(tempfile.mkdtemp(prefix="bp-sandboxes-"))
    settings.SANDBOX_ROOT.chmod(0o755)
    enable_push(sample_cluster)
    older = base_backup_primary()
    newer = base_backup_primary()
    BackupRun.objects.filter(pk=newer.pk).update(timeline=2)
    test = run_restore_test(server, actor="alice", kind="base")
    assert test.status == "failed", test.checks
    assert f"base backup #{newer.pk} is not the one a restore to its end would use (#{older.pk})" in test.error
    assert f"are not used: #{newer.pk} (timeline 2)" in test.error and "take a new base backup" in test.error
    assert list(settings.SANDBOX_ROOT.iterdir()) == []
    shutil.rmtree(settings.SANDBOX_ROOT)


def test_a_cluster_whose_postgresql_conf_lives_elsewhere_recovers_with_its_recorded_settings(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Debian keeps postgresql.conf in /etc: the backup has none, and a copy on defaults (100
    connections) refuses to recover what a production of 150 wrote ("insufficient parameter
    settings"). The written one holds pg_control's values of what recovery checks."""
    sample_cluster.configure(max_connections=150, max_prepared_transactions=3)
    sample_cluster.restart()
    enable_push(sample_cluster)
    conf = sample_cluster.datadir / "postgresql.conf"
    kept = conf.read_bytes()
    conf.unlink()  # as if in /etc: the running server has read it already
    try:
        base_backup_primary()
    finally:
        conf.write_bytes(kept)
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)

    datadir, port = restored(), free_port()
    result = pitr(datadir, port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert "one was written with production's max_connections = 150" in result["notes"]
    assert "max_prepared_transactions = 3" in result["notes"]
    assert rows(port, "SELECT tx FROM probe") == [("A",)]


def test_an_unlogged_critical_table_emptied_by_recovery_passes_the_base_restore_test(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """Recovery empties UNLOGGED tables, as a crash does in production: a good physical restore of
    one is empty, and the critical-table check says so instead of failing the test."""
    from backups.models import Database
    from restores.restoretest import run_restore_test

    settings.SANDBOX_ROOT = Path(tempfile.mkdtemp(prefix="bp-sandboxes-"))
    settings.SANDBOX_ROOT.chmod(0o755)
    write(sample_cluster, "CREATE UNLOGGED TABLE sessions AS SELECT g AS id FROM generate_series(1, 50) g")
    Database.of_dsn(server)
    Database.objects.filter(server=server, name=server.dbname).update(critical_tables=["public.sessions", "users"])
    enable_push(sample_cluster)
    base_backup_primary()
    test = run_restore_test(server, actor="alice", kind="base")
    assert test.status == "passed", test.error
    checks = {c["name"]: c for c in test.checks}
    assert checks["rows in public.sessions"]["detail"].startswith("public.sessions is UNLOGGED: recovery empties")
    assert checks["rows in public.users"]["ok"] and "200 rows" in checks["rows in public.users"]["detail"]
    shutil.rmtree(settings.SANDBOX_ROOT)


def base_backup_primary():
    result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "succeeded", result
    return BackupRun.objects.get(pk=result["id"])


# --- A flipped byte in the middle of a large logical dump. -----------------------------------------


def databases(cluster):
    return {r[0] for r in cluster.execute("SELECT datname FROM pg_database")}


def scratch_files(settings):
    root = Path(settings.VAR_DIR) / "scratch"
    return [p for p in root.rglob("*")] if root.exists() else []


def test_a_flipped_byte_in_a_large_dump_is_caught_the_next_copy_read_and_nothing_left(
    big_cluster, passphrase_file, backup_root, nas_root, settings
):
    """gpg does not compress a dump (pg_dump did), so it reads a rotten one to its end, where its
    MDC and the sha256 catch the flip; pg_restore, fed the bad bytes, may give up first (piped)."""
    register(big_cluster)
    StorageLocation.sync_from_settings()
    backup = run_command("backup", "maldives")
    assert backup["status"] == "succeeded", backup
    run = BackupRun.objects.get(pk=backup["id"])
    primary, nas = (run.copies.get(artifact="main", location__name=name) for name in ("primary", "nas"))
    assert run.size > 64 << 20  # the bad byte lies tens of MB in, far past every pipe and buffer
    before = databases(big_cluster)

    # The primary copy rots: the restore (piped into pg_restore) marks it bad and reads the NAS copy.
    flip_byte_in(file_of(primary))
    settings.RESTORE_JOBS = 1
    result = run_command("restore", str(run.pk), "--into-database", "restored_big")
    assert result["status"] == "succeeded", result
    primary.refresh_from_db()
    assert primary.status == "bad" and "sha256" in primary.last_error
    assert "from nas" in result["notes"], result["notes"]
    with big_cluster.connect(DB) as a, big_cluster.connect("restored_big") as b:
        assert sampledata.counts(a) == sampledata.counts(b)
        assert b.execute("SELECT count(*) FROM scans").fetchone() == (110000,)
    big_cluster.execute("DROP DATABASE restored_big")

    # The NAS copy rots too: overlapped (pg_restore loads the data from the stream while the
    # scratch file is written, before the hash is known) it fails as corrupt all the same, the
    # copy is marked bad, the new database with what it had loaded is dropped, the file removed.
    flip_byte_in(file_of(nas))
    settings.RESTORE_JOBS = 2
    result = run_command("restore", str(run.pk), "--into-database", "restored_big")
    assert result["_exit"] == 1 and result["status"] == "failed", result
    assert "corrupt: sha256" in result["error"] and f"(nas copy {nas.key})" in result["error"], result["error"]
    nas.refresh_from_db()
    assert nas.status == "bad"
    assert databases(big_cluster) == before
    assert scratch_files(settings) == []
    assert child_named(os.getpid(), "gpg") is None and child_named(os.getpid(), "pg_restore") is None

    # With no healthy copy left, the next restore is refused before anything is created.
    result = run_command("restore", str(run.pk), "--into-database", "restored_big")
    assert result["_exit"] == 1 and "no healthy copy left" in (result.get("error", "") + result["_stderr"])
    assert databases(big_cluster) == before
