"""A server's DSN re-pointed at another cluster: its backups would fill the retention floor while
the real cluster's age out. Every backup compares the cluster's system identifier with the one its
good backups recorded, and fails naming both when they differ."""

import pytest

from backupportal.lib.pgcluster import Cluster
from backups.models import BackupCopy, BackupRun, Server
from tests.helpers import backup_json, load_sample

pytest_plugins = ["tests.walfixtures"]
READER_PASSWORD = "Reader-Pa55word-xyz"


@pytest.fixture
def other_cluster(pg_base_dir):
    """A second cluster initdb'd of its own: copies of the session's template share its identifier."""
    cluster = Cluster.create(base_dir=pg_base_dir)
    try:
        cluster.start()
        load_sample(cluster, users=20, audit_logs=50, financial_records=50)
        yield cluster
    finally:
        cluster.destroy()


def sysid(cluster):
    return str(cluster.execute("SELECT system_identifier FROM pg_control_system()")[0][0])


def test_a_backup_of_a_server_whose_dsn_reaches_another_cluster_fails_naming_both(
    server, sample_cluster, other_cluster, passphrase_file, tiers
):
    good = backup_json()
    assert good["status"] == "succeeded", good
    ours, theirs = sysid(sample_cluster), sysid(other_cluster)
    assert ours != theirs
    assert BackupRun.objects.get(pk=good["id"]).details["system_identifier"] == ours
    kept = set(BackupCopy.objects.filter(run=good["id"], status=BackupCopy.Status.OK).values_list("pk", flat=True))
    assert len(kept) == 9  # dump, globals and manifest on three tiers

    real_dsn = server.dsn
    server.dsn = other_cluster.dsn("reliabilitymaldives")
    server.save()
    for kind in ("logical", "base"):
        failed = backup_json(kind=kind)
        assert failed["status"] == "failed", failed
        error = BackupRun.objects.get(pk=failed["id"]).error
        assert f"now reaches the cluster with system identifier {theirs}" in error
        assert f"its good backups are of cluster {ours}" in error
        assert "register it as a new server" in error
        assert "\n" not in error

    # The good backup is untouched, and still what a restore reads.
    run = BackupRun.objects.get(pk=good["id"])
    assert run.status == "succeeded" and run.deleted_at is None
    assert set(run.copies.filter(status=BackupCopy.Status.OK).values_list("pk", flat=True)) == kept
    assert list(BackupRun.objects.good().values_list("pk", flat=True)) == [good["id"]]

    # Pointed back, it backs up again.
    Server.objects.filter(pk=server.pk).update(dsn=real_dsn)
    assert backup_json()["status"] == "succeeded"


def test_an_identifier_the_role_may_not_read_warns_until_a_good_backup_recorded_one(
    sample_cluster, passphrase_file, tiers
):
    sample_cluster.create_role("reader", password=READER_PASSWORD)
    sample_cluster.execute("GRANT pg_read_all_data TO reader")
    server = Server(name="maldives", dsn=sample_cluster.dsn("reliabilitymaldives", user="reader"))
    server.password = READER_PASSWORD
    server.pg_version = server.probe()
    server.save()
    assert server.system_identifier() == sysid(sample_cluster), "PostgreSQL 15 lets any role read it"

    revoke = "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_control_system() FROM PUBLIC"
    sample_cluster.execute(revoke, dbname="reliabilitymaldives")  # a function's grants are per database
    result = backup_json()
    assert result["status"] == "succeeded", result
    notes = BackupRun.objects.get(pk=result["id"]).notes
    assert "the cluster's system identifier was not compared with its earlier backups'" in notes
    assert "permission denied" in notes

    # Once a good backup recorded it, a cluster that hides it is not taken on trust.
    sample_cluster.execute(revoke.replace("REVOKE", "GRANT").replace("FROM", "TO"), dbname="reliabilitymaldives")
    assert backup_json()["status"] == "succeeded"
    sample_cluster.execute(revoke, dbname="reliabilitymaldives")
    refused = backup_json()
    assert refused["status"] == "failed"
    assert refused["error"].startswith("server maldives's cluster does not say its system identifier (")
    assert refused["error"].endswith(
        f"which its good backups recorded as {sysid(sample_cluster)}: grant the backup role EXECUTE on"
        " pg_control_system(), or point the DSN back at that cluster"
    )


def test_wal_written_by_another_cluster_or_filed_under_another_name_is_not_catalogued(
    server, sample_cluster, other_cluster, passphrase_file, backup_root, wal_spool
):
    """Another cluster's archive_command pointed at this server's spool (a copied configuration,
    two servers' names swapped): its segments were catalogued as this server's, for a PITR to
    replay. The segment's own header says which cluster wrote it and where it belongs."""
    from backups import walingest, walnames, walspool
    from backups.models import WalSegment
    from tests.helpers import enable_push, switch_wal, wait_archived

    enable_push(sample_cluster)
    assert backup_json()["status"] == "succeeded"  # records the cluster's identifier
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    server.refresh_from_db()
    size, spool = server.wal_segment_size, walspool.spool_dir(server)
    newest = WalSegment.objects.filter(server=server, segno__isnull=False).order_by("-segno").first()

    # One of theirs, under the name of the next segment of ours.
    theirs = switch_wal(other_cluster)
    foreign = spool / walnames.segment_name(1, newest.segno + 1, size)
    foreign.write_bytes((other_cluster.datadir / "pg_wal" / theirs).read_bytes()[:size])
    foreign.chmod(0o640)
    with pytest.raises(walnames.WalError) as refused:
        walingest.ingest(server)
    said = str(refused.value)
    assert f"was written by the cluster with system identifier {sysid(other_cluster)}" in said, said
    assert f"({sysid(sample_cluster)}, as its backups recorded)" in said and foreign.exists()
    assert not WalSegment.objects.filter(server=server, name=foreign.name).exists()

    # One of ours (the segment being written), under another of our names.
    foreign.unlink()
    current = sample_cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    misfiled = spool / walnames.segment_name(1, walnames.segno_of(current, size) + 5, size)
    misfiled.write_bytes((sample_cluster.datadir / "pg_wal" / current).read_bytes())
    misfiled.chmod(0o640)
    with pytest.raises(walnames.WalError, match=f"WAL segment {misfiled.name} holds the WAL of segment"):
        walingest.ingest(server)
    assert not WalSegment.objects.filter(server=server, name=misfiled.name).exists()

    # One whose first page was zeroed (a probe's: catalogued good, its damage met only at restore).
    misfiled.write_bytes(bytes(size))
    with pytest.raises(walnames.WalError, match=f"WAL segment {misfiled.name} begins with zeros where its header"):
        walingest.ingest(server)
    assert not WalSegment.objects.filter(server=server, name=misfiled.name).exists()
