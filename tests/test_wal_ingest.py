"""WAL ingest on every tier: the WAL key travels with the WAL, and a long pass makes the offsite
copies on its way instead of at its end."""

import pytest

from backups import walingest, walkeys
from backups.models import BackupCopy, StorageLocation
from backups.walnames import WalError
from backups.walspool import spool_dir
from tests.test_wal_keys import fetch, forget_keys, spool_segments

pytest_plugins = ["tests.walfixtures"]


def test_a_fresh_portal_recovers_a_segment_from_s3_alone_with_the_key_beside_it(
    server, passphrase_file, tiers, wal_spool, tmp_path
):
    forget_keys()
    names = spool_segments(server, 2)
    assert walingest.ingest(server).ingested == names
    copies = BackupCopy.objects.filter(wal_segment__name=names[0]).select_related("location", "wal_segment")
    assert {c.location.kind: c.status for c in copies} == {"primary": "ok", "nas": "ok", "s3": "ok"}
    assert len({c.key_id for c in copies}) == 1 and {c.compression for c in copies} == {"zstd"}
    key_id = copies[0].key_id
    (walkeys.keyring() / f"{key_id}.key.gpg").unlink()  # a new machine: only the passphrase
    forget_keys()
    s3 = copies.get(location__kind=StorageLocation.Kind.S3)
    assert fetch(s3, tmp_path) == s3.wal_segment.sha256
    assert not (walkeys.keyring() / f"{key_id}.key.gpg").exists()  # unwrapped from S3 into memory only


def test_a_long_ingest_pass_makes_the_offsite_copies_on_its_way(
    server, passphrase_file, backup_root, nas_root, wal_spool, monkeypatch
):
    StorageLocation.sync_from_settings()
    forget_keys()
    names = spool_segments(server, 4)
    monkeypatch.setattr(walingest, "COPY_EVERY", -1)  # every segment counts as a long pass
    copied_during = []
    real = walingest.copy_pending

    def watched(s, *args):
        copied_during.append(BackupCopy.objects.filter(location__kind="nas", status="ok").count())
        return real(s, *args)

    monkeypatch.setattr(walingest, "copy_pending", watched)
    assert walingest.ingest(server).ingested == names
    assert len(copied_during) > 2 and copied_during[-1] >= 2  # before the pass ended, NAS had copies
    assert BackupCopy.objects.filter(location__kind="nas", status="ok").count() == 4


def test_wal_archived_while_an_ingest_runs_is_taken_by_the_same_pass(
    server, passphrase_file, backup_root, wal_spool, monkeypatch
):
    forget_keys()
    first = spool_segments(server, 2)
    later = "000000010000000000000009"
    real = walingest.record

    def archive_meanwhile(*args, **kwargs):
        (spool_dir(server) / later).write_bytes(b"\2" * (server.wal_segment_size or 1 << 20))
        return real(*args, **kwargs)

    monkeypatch.setattr(walingest, "record", archive_meanwhile)
    assert walingest.ingest(server).ingested == [*first, later]


def test_an_ingest_without_zstd_says_so_and_keeps_the_spool(
    server, passphrase_file, backup_root, wal_spool, monkeypatch
):
    forget_keys()
    names = spool_segments(server, 2)
    monkeypatch.setattr(walingest, "WAL_ZSTD", ["/nonexistent/zstd", "-q", "-1", "-c"])
    with pytest.raises(WalError) as refused:
        walingest.ingest(server)
    assert "zstd is not installed: apt-get install zstd" in str(refused.value)
    assert all((spool_dir(server) / name).exists() for name in names)
    assert not BackupCopy.objects.exists()
    assert not [p for p in (backup_root / "wal").rglob("*") if p.is_file() and "/keys/" not in str(p)]
