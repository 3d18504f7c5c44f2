"""A backup waits for its own WAL: another timeline's segments of the same numbers in the archive
(a copy restored by hand that kept production's archive_command, or an old primary's timeline
after a failover) are not it. Found by review: a base backup whose WAL never reached the archive
was catalogued as succeeded, and could not be restored."""

import os
from pathlib import Path

import pytest

from backups import walingest, walnames
from backups.models import BackupRun, WalSegment
from tests.helpers import enable_push, run_command, switch_wal, wait_archived

pytest_plugins = ["tests.walfixtures"]


@pytest.fixture
def foreign_timeline(server, sample_cluster, passphrase_file, backup_root, wal_spool, settings):
    """Production archives nothing any more; timeline 2's copies of its next segments are catalogued."""
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    server.refresh_from_db()
    size = server.wal_segment_size
    sample_cluster.execute("ALTER SYSTEM SET archive_command = 'false'")
    sample_cluster.execute("SELECT pg_reload_conf()")
    sample_cluster.execute("CREATE TABLE written_after (n int); INSERT INTO written_after VALUES (1)")
    current = sample_cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    segno = walnames.segno_of(current, size)
    spool = Path(settings.WAL_SPOOL) / "maldives"
    for n in range(segno, segno + 4):
        foreign = spool / walnames.segment_name(2, n, size)
        foreign.write_bytes(b"\1" * size)  # not a header of this server's (nor zeros, refused as damaged)
        os.chmod(foreign, 0o640)
    walingest.ingest(server)
    assert WalSegment.objects.filter(server=server, timeline=2).count() == 4
    settings.WAL_WAIT_SECONDS = 5
    return server


def test_a_base_backup_is_not_good_on_another_timelines_wal(foreign_timeline):
    result = run_command("backup", "maldives", "--kind", "base")
    run = BackupRun.objects.get(pk=result["id"])
    assert result["status"] == "failed", f"#{run.pk} {run.status} though {run.end_wal} was never archived"
    assert "WAL segment 00000001" in run.error and "was not archived within 5 s" in run.error


def test_a_wal_chain_is_not_proven_by_another_timelines_wal(foreign_timeline):
    assert not foreign_timeline.takes_block_incrementals  # PostgreSQL 15: an incremental is a WAL chain
    result = run_command("backup", "maldives", "--kind", "incremental")
    run = BackupRun.objects.get(pk=result["id"])
    assert result["status"] == "failed", f"#{run.pk} {run.status} though production's WAL was never archived"
    assert "WAL segment 00000001" in run.error and "was not archived within 5 s" in run.error
