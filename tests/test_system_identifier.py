"""A server's DSN re-pointed at another cluster: its backups would fill the retention floor while
the real cluster's age out. Every backup compares the cluster's system identifier with the one its
good backups recorded, and fails naming both when they differ."""

import pytest

from backupportal.lib.pgcluster import Cluster
from backups.models import BackupCopy, BackupRun, Server
from tests.helpers import backup_json, load_sample

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
