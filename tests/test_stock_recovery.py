"""The README's recovery without the portal, word for word: a base backup and the WAL after it,
taken by the portal, recovered on a machine that has only the passphrase, the archive, gpg,
zstd, tar and PostgreSQL, to a moment between two writes."""

import shutil
import subprocess

from backupportal.lib.osuser import chown_to_db_user, free_port
from backupportal.lib.pgcluster import Cluster
from backupportal.lib.pgdatadir import pg_bin
from backups import walingest
from backups.models import BackupRun, WalSegment
from tests.helpers import a_second_later, enable_push, rows, run_command, switch_wal, wait_archived, write
from tests.stock import GPG, artifact, restore_command, stock

pytest_plugins = ["tests.walfixtures"]


def test_a_base_backup_and_its_wal_recover_to_a_moment_with_gpg_zstd_and_tar_alone(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, tmp_path
):
    enable_push(sample_cluster)
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    run = BackupRun.objects.get(pk=base["id"])
    write(sample_cluster, "CREATE TABLE stock(x int); INSERT INTO stock VALUES (1)")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO stock VALUES (2)")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)

    # The new machine: the server's WAL folder as copied from any tier, and the passphrase.
    datadir = restored()
    parent = datadir.parent
    archive, gpghome, verify_wal = parent / "archive", parent / "gnupg", parent / "verify-wal"
    shutil.copytree(backup_root / "wal" / "maldives" / "wal", archive)
    keys = sorted((archive / "keys").glob("*.key.gpg"))
    assert len(keys) == 1, keys
    walkey = parent / "walkey"
    stock(f"umask 077; {GPG} --decrypt --output {walkey} {keys[0]}", tmp_path, passphrase_file)
    assert len(walkey.read_text().strip()) == 64
    datadir.mkdir(mode=0o700)
    verify_wal.mkdir()
    gpghome.mkdir(mode=0o700)
    stock(f"{GPG} --decrypt {artifact(run)} | zstd -d | tar -x -C {datadir}", tmp_path, passphrase_file)
    # The server compressed this tar (BASE_COMPRESSION=server): its manifest is the file beside it.
    assert run.details["compressed_by"] == "server" and not (datadir / "backup_manifest").exists()
    manifest = artifact(run, "manifest")
    stock(f"{GPG} --yes --decrypt --output {datadir / 'backup_manifest'} {manifest}", tmp_path, passphrase_file)
    line = restore_command(walkey, archive, gpghome)
    for name in WalSegment.objects.filter(server=server, name__gte=run.start_wal, name__lte=run.end_wal).values_list(
        "name", flat=True
    ):
        stock(line.replace("%f", name).replace("%p", str(verify_wal / name)), tmp_path, passphrase_file)
    verified = subprocess.run(
        [str(pg_bin() / "pg_verifybackup"), f"--wal-directory={verify_wal}", str(datadir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert verified.returncode == 0, verified.stderr

    # Recovery by PostgreSQL itself, fetching each segment with the one line.
    chown_to_db_user(parent)
    (datadir / "recovery.signal").touch()
    chown_to_db_user(datadir / "recovery.signal")
    cluster = Cluster(datadir, port=free_port())
    cluster.configure(
        restore_command=line,
        recovery_target_time=target.isoformat(sep=" "),
        recovery_target_action="promote",
        archive_mode="off",
    )
    cluster.start()
    assert rows(cluster.port, "SELECT x FROM stock ORDER BY x") == [(1,)]
    assert "restored log file" in cluster.log_tail(200)
