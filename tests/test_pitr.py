"""Point-in-time recovery against real clusters: push archiving, a base backup, PITR into a new cluster."""

import time

from django.utils import timezone

from backupportal.lib.pgcluster import free_port
from backups.models import BackupRun
from restores.models import RestoreRun

from .walhelpers import enable_push, rows, run_command, switch_wal, wait_archived

pytest_plugins = ["tests.walfixtures"]

DB = "reliabilitymaldives"


def write(cluster, sql):
    cluster.execute(sql, dbname=DB)


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
    print(result)
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]
    assert result["recovered_to"] and result["recovered_to"] <= target.isoformat(sep=" ")
    assert RestoreRun.objects.get(pk=result["id"]).kind == "pitr"
    assert not (at_t / "recovery.signal").exists() and not (at_t / "recovery.conf").exists()
    auto_conf = (at_t / "postgresql.auto.conf").read_text()
    assert "recovery_target_time" in auto_conf and "archive_mode = 'off'" in auto_conf

    latest = restored()
    port2 = free_port()
    result = run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(latest), "--port", str(port2)
    )
    assert result["status"] == "succeeded", result
    assert rows(port2, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
