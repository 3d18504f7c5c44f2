"""WAL segments under the WAL data key: zstd then gpg with a random key (no key derivation per
segment), the key wrapped with the passphrase beside the WAL; segments from before it still
decrypt with the passphrase; a key that cannot be found or unwrapped is named."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from backups import keyring, walingest, walkeys
from backups.crypto import Encryption
from backups.models import BackupCopy, StorageLocation, WalSegment
from backups.streams import FetchFailed, FileSink, decrypt_first_healthy, readable
from backups.walspool import spool_dir
from tests.stock import GPG, stock

pytest_plugins = ["tests.walfixtures"]
SEGMENT = 1 << 20


def spool_segments(server, count=2):
    """Segments in the spool as the archive program leaves them: compressible, like real WAL."""
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True)
    names = [f"0000000100000000000000{n:02X}" for n in range(1, count + 1)]
    for n, name in enumerate(names):
        (spool / name).write_bytes((f"row {n} " * 50).encode().ljust(size_of(server), b"\0"))
    return names


def size_of(server):
    return server.wal_segment_size or SEGMENT


def forget_keys():
    """A new process: nothing unwrapped yet."""
    walkeys._unwrapped.clear()
    walkeys._current.clear()


def primary_copy(name):
    return BackupCopy.objects.select_related("location", "wal_segment").get(wal_segment__name=name)


def path_of(copy):
    return Path(copy.location.path) / copy.key


def fetch(copy, tmp_path):
    sink = FileSink(tmp_path / copy.wal_segment.name)
    decrypt_first_healthy(readable([copy]), sink, Encryption(), f"WAL segment {copy.wal_segment.name}")
    return hashlib.sha256(sink.path.read_bytes()).hexdigest()


def s2k_mode(path):
    """The S2K specifier of a symmetric file's first packet (tag 3): 1 salted, 3 iterated and salted."""
    data = path.read_bytes()
    assert data[0] in (0x8C, 0xC3), "a symmetric-key packet, with a one-byte length (old or new format)"
    assert data[2] == 4 and data[3] == 9, "version 4, AES-256"
    return data[4]


@pytest.fixture
def ingested(server, passphrase_file, backup_root, wal_spool):
    forget_keys()
    names = spool_segments(server)
    assert walingest.ingest(server).ingested == names
    return names


def test_segments_are_zstd_under_a_data_key_that_is_wrapped_with_the_full_key_derivation(ingested, backup_root):
    copy = primary_copy(ingested[0])
    assert copy.compression == "zstd" and len(copy.key_id) == 16
    assert s2k_mode(path_of(copy)) == 1  # a random 256-bit key: salted, not iterated
    key_file = backup_root / "wal" / "maldives" / "wal" / "keys" / f"{copy.key_id}.key.gpg"
    assert s2k_mode(key_file) == 3  # the passphrase: the strategy's derivation
    assert (key_file.stat().st_mode & 0o077) == 0
    local = walkeys.keyring() / f"{copy.key_id}.key.gpg"
    assert local.read_bytes() == key_file.read_bytes() and (local.stat().st_mode & 0o777) == 0o600
    # One key for every segment of this passphrase; the plaintext of the key is nowhere on disk.
    assert set(BackupCopy.objects.values_list("key_id", flat=True)) == {copy.key_id}
    secret = walkeys.unwrap(copy.key_id, Encryption()).encode()
    for folder in (backup_root, walkeys.keyring()):
        assert not [p for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_fresh_portal_unwraps_the_key_from_beside_the_wal_and_reads_the_segments(ingested, tmp_path):
    copy = primary_copy(ingested[0])
    (walkeys.keyring() / f"{copy.key_id}.key.gpg").unlink()
    forget_keys()
    assert fetch(copy, tmp_path) == copy.wal_segment.sha256


def test_a_segment_from_before_the_data_key_still_decrypts_with_the_passphrase(
    ingested, passphrase_file, backup_root, tmp_path
):
    copy = primary_copy(ingested[1])
    walkey = tmp_path / "walkey"
    key_file = backup_root / "wal" / "maldives" / "wal" / "keys" / f"{copy.key_id}.key.gpg"
    stock(f"umask 077; {GPG} --decrypt --output {walkey} {key_file}", tmp_path, passphrase_file)
    # Made into what ingest wrote before: gpg's own compression (zip, level 1), the passphrase, no key id.
    path = path_of(copy)
    old = path.with_suffix(".old")
    stock(
        f"gpg --batch --quiet --pinentry-mode loopback --passphrase-file {walkey} --decrypt {path} | zstd -d | "
        f"{GPG} --symmetric --cipher-algo AES256 --s2k-mode 3 --s2k-count 65011712 --compress-algo zip -z 1 "
        f"--output {old}",
        tmp_path,
        passphrase_file,
    )
    os.replace(old, path)
    BackupCopy.objects.filter(pk=copy.pk).update(
        key_id="", compression="", size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()
    )
    copy.refresh_from_db()
    assert fetch(copy, tmp_path) == copy.wal_segment.sha256
    assert stock(f"{GPG} --decrypt {path} | sha256sum", tmp_path, passphrase_file).split()[0] == copy.wal_segment.sha256
    # ... and the new ones beside it, in the same restore.
    assert fetch(primary_copy(ingested[0]), tmp_path) == primary_copy(ingested[0]).wal_segment.sha256


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_key_file_missing_or_corrupt_everywhere_fails_naming_the_key(damage, ingested, backup_root, tmp_path):
    copy = primary_copy(ingested[0])
    (walkeys.keyring() / f"{copy.key_id}.key.gpg").unlink()
    beside = backup_root / "wal" / "maldives" / "wal" / "keys" / f"{copy.key_id}.key.gpg"
    if damage == "missing":
        beside.unlink()
    else:
        data = bytearray(beside.read_bytes())
        data[-5] ^= 0xFF
        beside.write_bytes(bytes(data))
    forget_keys()
    with pytest.raises(FetchFailed) as failed:
        fetch(copy, tmp_path)
    message = str(failed.value)
    assert f"WAL key {copy.key_id}" in message and "\n" not in message
    assert ("is missing" in message) if damage == "missing" else ("cannot be unwrapped" in message)
    assert not (tmp_path / copy.wal_segment.name).exists()
    # Nothing was condemned: the segment's copy is good, its key is what is missing.
    assert BackupCopy.objects.get(pk=copy.pk).status == BackupCopy.Status.OK


def test_a_new_passphrase_gets_a_new_key_and_the_old_segments_keep_theirs(
    ingested, server, passphrase_file, settings, tmp_path, caplog
):
    old_key = primary_copy(ingested[0]).key_id
    secret = walkeys.unwrap(old_key, Encryption())
    rotated = tmp_path / "rotated"
    rotated.write_text("another-passphrase\n")
    rotated.chmod(0o600)
    keyring.rotate(passphrase_file=str(rotated), actor="test")
    spool = spool_dir(server)
    (spool / "000000010000000000000003").write_bytes(b"\1" * size_of(server))
    walkeys._current.clear()  # as a new process: the pointer names the old key
    caplog.clear()
    assert walingest.ingest(server).ingested == ["000000010000000000000003"]
    # Trying the old key with the new passphrase is expected to fail: not gpg's ERROR in the log
    # of an ingest that succeeds (found by review: BAD_PASSPHRASE on a worker's stderr).
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("gnupg")]
    new_key = primary_copy("000000010000000000000003").key_id
    assert new_key and new_key != old_key
    assert walkeys.unwrap(old_key, Encryption()) == secret  # this process still holds it
    assert WalSegment.objects.count() == 3


def test_the_wal_key_never_reaches_gpgs_argv(ingested, server):
    copy = primary_copy(ingested[0])
    secret = walkeys.unwrap(copy.key_id, Encryption())
    argv = Encryption().with_data_key(copy.key_id, secret).gpg.make_args(["--symmetric"], passphrase=True)
    assert secret not in " ".join(argv)
    assert subprocess.run(["pgrep", "-af", secret[:16]], capture_output=True).stdout == b""


@pytest.mark.parametrize("damage", ["altered", "code", "cut"])
def test_a_segment_altered_after_it_was_catalogued_fails_its_integrity_check(damage, ingested, tmp_path):
    """The copy hashes as catalogued (the damage came before, say on the way into the location),
    yet its OpenPGP integrity code or its length gives it away: nothing is written."""
    copy = primary_copy(ingested[0])
    path = path_of(copy)
    data = bytearray(path.read_bytes())
    if damage == "altered":
        data[len(data) // 2] ^= 0x10
    elif damage == "code":
        data[-3] ^= 0x10  # the integrity code itself: the plaintext is whole, the check is not
    else:
        data = data[: len(data) - 40]
    path.write_bytes(bytes(data))
    copy.sha256, copy.size = hashlib.sha256(data).hexdigest(), len(data)
    copy.save(update_fields=["sha256", "size"])
    with pytest.raises(FetchFailed) as failed:
        fetch(copy, tmp_path)
    message = str(failed.value)
    # altered: zstd, which reads the plaintext first, or else the integrity code, refuses it
    said = {"altered": ("Data corruption detected", "the file was altered"), "code": ("the file was altered",)}
    said = said.get(damage, ("cut short",))
    assert any(why in message for why in said) and "does not decrypt" in message, message
    assert not (tmp_path / copy.wal_segment.name).exists()


def test_a_tier_down_while_the_key_was_put_out_gets_it_with_its_segments(
    server, passphrase_file, tiers, wal_spool, tmp_path
):
    """Found by a probe: S3 was down during the ingest, which puts the WAL data key beside the WAL
    on every tier; once back, the copy worker copied the segments there and not the key, so S3 alone
    (the primary site lost, with the passphrase) could not decrypt them."""
    forget_keys()
    walkeys._failed.clear()
    tiers.server.stop()
    try:
        names = spool_segments(server, 2)
        assert walingest.ingest(server).ingested == names
    finally:
        tiers.server.start()
    on_s3 = BackupCopy.objects.filter(location__kind=StorageLocation.Kind.S3, wal_segment__name__in=names)
    walingest.copy_pending(server)
    assert set(on_s3.values_list("status", flat=True)) == {"ok"}
    copy = on_s3.select_related("location", "wal_segment").first()
    (walkeys.keyring() / f"{copy.key_id}.key.gpg").unlink()  # a fresh portal with S3 and the passphrase
    forget_keys()
    assert fetch(copy, tmp_path) == copy.wal_segment.sha256


def test_a_segment_retention_deleted_and_archived_again_is_catalogued_again(
    server, passphrase_file, backup_root, wal_spool
):
    """Found by a probe: the revived row's new copy collided with its deleted copy (one a location),
    and the ingest took the segment for a duplicate: out of the spool, still deleted in the catalog."""
    from django.utils import timezone

    from backups import walspool
    from backups.retention import delete_copies

    forget_keys()
    names = spool_segments(server, 2)
    assert walingest.ingest(server).ingested == names
    segment = WalSegment.objects.get(server=server, name=names[0])  # as wal_retention deletes it
    assert delete_copies(segment.copies.exclude(status=BackupCopy.Status.DELETED))
    WalSegment.objects.filter(pk=segment.pk).update(deleted_at=timezone.now())
    walspool.forget_ingested(server, [names[0]])

    again = spool_segments(server, 1)
    assert walingest.ingest(server).ingested == again
    segment.refresh_from_db()
    assert segment.deleted_at is None
    assert list(segment.copies.values_list("location__name", "status")) == [("wal", "ok")]


def test_an_ingest_conflict_resolves_once_the_other_file_is_gone(server, passphrase_file, backup_root, wal_spool):
    """Found by a probe: after a DBA removed the file that arrived again with other content, its
    error marker stayed, and archive_failing with it, for ever."""
    from watching.models import Alert
    from watching.monitor import check_wal

    forget_keys()
    names = spool_segments(server, 1)
    assert walingest.ingest(server).ingested == names
    spool = spool_dir(server)
    (spool / "ingested" / names[0]).unlink()  # as a pull spool leaves it, or retention
    (spool / names[0]).write_bytes(b"\7" * size_of(server))
    assert walingest.ingest(server).conflicts == names
    check_wal(server)
    assert Alert.objects.get(condition="archive_failing").state == "open"
    (spool / names[0]).unlink()  # looked at and removed: the catalog keeps the first
    walingest.ingest(server)
    check_wal(server)
    assert Alert.objects.get(condition="archive_failing").state == "resolved"
