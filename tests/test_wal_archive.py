"""Push archiving against a real cluster: the archive program run by PostgreSQL, the ingest."""

from backups import wal
from backups.models import WalSegment

from .walhelpers import enable_push, switch_wal, wait_archived

pytest_plugins = ["tests.walfixtures"]


def test_archived_segments_are_ingested_encrypted_and_catalogued(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    enable_push(sample_cluster)
    sample_cluster.execute("CREATE TABLE a(x int)", dbname="reliabilitymaldives")
    name = switch_wal(sample_cluster)
    wait_archived(sample_cluster, name)
    result = wal.ingest(server)
    assert name in result.ingested, result
    seg = WalSegment.objects.get(server=server, name=name)
    assert seg.segno is not None and seg.size == 1024 * 1024
