"""Retention and PITR agree on which base backups can be restored (backups.copies.restorable):
the floor is filled, and the WAL window started, only by base backups a PITR would start from.
Real clusters, push archiving, gpg, and the verify finding a flipped byte; PITR to latest before
and after retention."""

from datetime import timedelta
from pathlib import Path

from django.utils import timezone

from backupportal.lib.osuser import free_port
from backups import retention, walingest, walnames
from backups.models import BackupRun, WalSegment
from tests.helpers import enable_push, flip_byte_in, run_command, switch_wal, verify_json, wait_archived
from tests.test_wal_retention import age

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"


def base(cluster, *tables):
    """A base backup, then a table and an archived segment for each of `tables`."""
    run = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    for name in tables:
        cluster.execute(f"CREATE TABLE {name}(x int)", dbname=DB)
        wait_archived(cluster, switch_wal(cluster))
    return run


def damage(run, artifact):
    """A flipped byte in the run's copy of `artifact`, found by the verify."""
    copy = run.copies.get(artifact=artifact)
    flip_byte_in(Path(copy.location.path) / copy.key)
    verify_json(str(run.pk))
    assert run.copies.get(artifact=artifact).status == "bad"


def pitr_latest(restored):
    return run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(restored()),
        "--port", str(free_port()),
    )  # fmt: skip


def test_the_wal_window_starts_at_a_base_pitr_can_use_not_at_a_corrupt_one(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """The window began at the newest base before it, corrupt or not: the WAL between the older
    good base and the corrupt one was deleted, and no PITR could reach the window any more."""
    enable_push(sample_cluster)
    good = base(sample_cluster, "a1", "a2", "a3")
    corrupt = base(sample_cluster, "b1", "b2")
    walingest.ingest(server)
    server.refresh_from_db()
    damage(corrupt, "main")
    assert pitr_latest(restored)["status"] == "succeeded"  # from the good one

    now = timezone.now()
    age(good, 20, now)
    age(corrupt, 9, now)  # both before the 7-day window: the corrupt one is the newest before it
    start = walnames.segno_of(corrupt.start_wal, server.wal_segment_size)
    WalSegment.objects.filter(segno__lt=start).update(archived_at=now - timedelta(days=15))
    done = retention.apply_wal_and_base_retention(now=now)
    assert done["wal"]["maldives"]["kept_from"] == good.start_wal
    result = pitr_latest(restored)
    assert result["status"] == "succeeded", result


def test_the_floor_is_not_filled_by_base_backups_whose_separate_manifest_is_lost(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """A tar the server compressed holds no manifest: without a good copy of it PITR refuses the
    base, but retention counted it restorable, kept three such and deleted the one PITR uses."""
    enable_push(sample_cluster)
    first = base(sample_cluster, "t0")
    others = [base(sample_cluster, f"t{n}") for n in (1, 2, 3)]
    walingest.ingest(server)
    server.refresh_from_db()
    assert [r.details.get("manifest_in_tar") for r in others] == [False] * 3
    for run in others:
        damage(run, "manifest")
    assert pitr_latest(restored)["status"] == "succeeded"

    now = timezone.now()
    for run, days in zip([first, *others], (40, 35, 34, 33), strict=True):
        age(run, days, now)
    WalSegment.objects.update(archived_at=now - timedelta(days=33))
    kept = {run.pk: rule for run, rule in retention.plan(server, now).items()}
    assert kept[first.pk] == "floor"
    done = retention.apply_wal_and_base_retention(now=now)
    assert first.pk not in [d["id"] for d in done["deleted"]]
    result = pitr_latest(restored)
    assert result["status"] == "succeeded", result


def test_backups_kept_only_in_a_location_disabled_for_a_while_keep_their_tiers(db, backup_root, tmp_path):
    """A monthly or yearly backup whose only copy is on a NAS disabled for maintenance is there
    when the NAS returns: retention must not delete it meanwhile (PITR's "restorable now" is not
    retention's)."""
    from datetime import datetime

    import time_machine

    from backups.models import BackupCopy, StorageLocation
    from tests.test_gfs import MALE, backup, make_server

    StorageLocation.sync_from_settings()
    primary = StorageLocation.objects.get(name="primary")
    nas = StorageLocation.objects.create(name="nas1", kind="nas", path=str(tmp_path), enabled=True)
    server = make_server(logical_retention_days=7, keep_monthly=6, keep_yearly=2, retention_floor=1)
    now = datetime(2026, 12, 3, 3, tzinfo=MALE)
    yearly = backup(server, datetime(2025, 12, 20, 2, tzinfo=MALE))
    monthly = backup(server, datetime(2026, 10, 20, 2, tzinfo=MALE))
    newest = backup(server, now - timedelta(days=1))
    for n, run in enumerate((yearly, monthly)):
        (tmp_path / f"n{n}").write_bytes(b"dump")
        BackupCopy.objects.create(run=run, location=nas, key=f"n{n}", size=1, sha256="a" * 64, status="ok")
    BackupCopy.objects.create(run=newest, location=primary, key="p", size=1, sha256="a" * 64, status="ok")
    StorageLocation.objects.filter(pk=nas.pk).update(enabled=False)
    kept = {run.pk: rule for run, rule in retention.plan(server, now).items()}
    assert kept[yearly.pk] == "monthly 2025-12" and kept[monthly.pk] == "monthly 2026-10", kept
    with time_machine.travel(now, tick=False):
        retention.apply()
    assert not BackupRun.objects.filter(pk__in=[yearly.pk, monthly.pk], deleted_at__isnull=False).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n0", "n1"]


def test_the_wal_a_base_on_a_location_disabled_for_a_while_needs_is_kept(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Its base is kept (it is there when the NAS returns), and so must be the WAL from it: the
    window's start and every moment between the two bases stay reachable."""
    import shutil

    from backups import walchain
    from backups.models import StorageLocation

    enable_push(sample_cluster)
    old = base(sample_cluster, "b1", "b2")
    between = sample_cluster.execute("SELECT pg_current_wal_lsn()::text")[0][0]
    new = base(sample_cluster, "c1")
    walingest.ingest(server)
    server.refresh_from_db()
    nasdir = backup_root.parent / f"{backup_root.name}-nas"
    nasdir.mkdir(mode=0o755)
    nas = StorageLocation.objects.create(name="nas1", kind="nas", path=str(nasdir))
    for copy in old.copies.all():  # its only copies on the NAS now
        (nasdir / copy.key).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(copy.location.path) / copy.key, nasdir / copy.key)
        copy.location = nas
        copy.save(update_fields=["location"])
    now = timezone.now()
    age(old, 9, now)
    age(new, 3, now)
    size = server.wal_segment_size
    WalSegment.objects.filter(segno__lt=walnames.segno_of(new.start_wal, size)).update(
        archived_at=now - timedelta(days=15)
    )
    StorageLocation.objects.filter(pk=nas.pk).update(enabled=False)  # maintenance
    done = retention.apply_wal_and_base_retention(now=now)
    assert done["wal"]["maldives"]["kept_from"] == old.start_wal
    StorageLocation.objects.filter(pk=nas.pk).update(enabled=True)  # back
    first, last = walnames.segno_of(old.start_wal, size), walnames.segno_of(new.start_wal, size)
    assert walchain.missing_segments(server, first, last) == []
    result = run_command(
        "restore", "--server", "maldives", "--target-lsn", between, "--into-datadir", str(restored()),
        "--port", str(free_port()),
    )  # fmt: skip
    assert result["status"] == "succeeded", result
    shutil.rmtree(nasdir, ignore_errors=True)
