"""Key custody against real clusters: rotatekey, restores picking each artifact's key, the custody
page, the monthly test per key, reencrypt, and a missing old key named by its id."""

import hashlib
import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from django.urls import reverse

from backupportal.lib import sampledata
from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups import keyring
from backups.crypto import EncryptionError
from backups.models import BackupCopy, BackupRun, EncryptionKey, WalSegment
from restores.keys import monthly_key_tests
from restores.models import RestoreTest
from tests.helpers import backup_json, enable_push, pitr, rows, run_command, switch_wal, wait_archived, write
from tests.test_object_lock import LOCK_DAYS, every_version, locked  # noqa: F401 (a fixture)

pytest_plugins = ["tests.walfixtures"]

NEW_PASSPHRASE = "the-Rotated-passphrase-of-2026"


def new_passphrase_file(tmp_path, text=NEW_PASSPHRASE):
    path = tmp_path / "rotated-passphrase"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def logical_backup():
    result = run_command("backup", "maldives")
    assert result["status"] == "succeeded", result
    return BackupRun.objects.get(pk=result["id"])


def keys_of(run):
    return set(run.copies.values_list("encryption_key_id", flat=True))


def restore(run, dbname):
    return run_command("restore", str(run.pk), "--into-database", dbname)


def gpg_opens(path, passphrase_file):
    """Stock gpg, given only that passphrase, decrypts the file."""
    done = subprocess.run(
        ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-file", str(passphrase_file), "-d", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture
def two_keys(server, sample_cluster, passphrase_file, backup_root, tmp_path):
    """A logical backup with the first key, rotatekey, a logical backup with the second."""
    before = logical_backup()
    rotated = run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))
    assert rotated["_exit"] == 0, rotated
    after = logical_backup()
    return before, after, before.details["key_id"], rotated["key_id"]


def test_backups_before_and_after_rotatekey_restore_each_with_its_own_key(
    two_keys, sample_cluster, passphrase_file, backup_root, tmp_path, settings, client, charlie
):
    before, after, old, new = two_keys
    assert old != new and len(new) == 16
    assert keys_of(before) == {old} and keys_of(after) == {new}  # the dump and its globals
    assert after.details["key_id"] == new
    # The key id is random, never derived from the passphrase.
    for secret in ("s3cret-Passphrase-for-tests", NEW_PASSPHRASE):
        assert hashlib.sha256(secret.encode()).hexdigest()[:16] not in (old, new)
    # Each artifact opens with its own passphrase only.
    assert gpg_opens(backup_root / before.key, passphrase_file)
    assert not gpg_opens(backup_root / after.key, passphrase_file)
    assert gpg_opens(backup_root / after.key, new_passphrase_file(tmp_path))
    # The keyring: a private directory, a private file per key.
    ring = Path(settings.KEYRING_DIR)
    assert stat.S_IMODE(ring.stat().st_mode) == 0o700
    assert {stat.S_IMODE((ring / f"{k}.passphrase").stat().st_mode) for k in (old, new)} == {0o600}
    rotation = JournalEntry.objects.get(action="key_rotated")
    assert rotation.details["key_id"] == new and rotation.details["retired"] == old
    assert NEW_PASSPHRASE not in str(rotation.details)

    for run, dbname in ((before, "restored_old_key"), (after, "restored_new_key")):
        result = restore(run, dbname)
        assert result["status"] == "succeeded", result
        with sample_cluster.connect("reliabilitymaldives") as a, sample_cluster.connect(dbname) as b:
            assert sampledata.counts(a) == sampledata.counts(b)

    client.force_login(charlie)  # an auditor reads it; nothing secret is on it
    page = client.get(reverse("key-custody")).content.decode()
    assert f"key-{old}" in page and f"key-{new}" in page
    assert "no passed restore test yet" in page
    assert NEW_PASSPHRASE not in page and "s3cret" not in page


def test_the_monthly_key_tests_prove_each_key_on_the_custody_page(two_keys, server, client, alice):
    before, after, old, new = two_keys
    # The newest backup's own test failed a moment ago: a key test of an older backup must not hide it.
    failed = RestoreTest.objects.create(
        server=server, kind="logical", database=after.database, backup_run=after, status="failed", error="checks"
    )
    failed.finished_at = failed.started_at
    failed.save()
    tests = monthly_key_tests()
    assert {(t.encryption_key, t.backup_run_id, t.status) for t in tests} == {
        (old, before.pk, "passed"),
        (new, after.pk, "passed"),
    }
    client.force_login(alice)
    page = client.get(reverse("key-custody")).content.decode()
    for test in tests:
        assert reverse("restore-test", args=[test.pk]) in page
    assert "no passed restore test yet" not in page
    assert all(t.of_key and t.monthly for t in tests)
    assert RestoreTest.objects.failing(server) == [failed]


def test_a_restore_with_its_old_key_missing_fails_naming_the_key(two_keys, sample_cluster, settings):
    before, after, old, new = two_keys
    kept = Path(settings.KEYRING_DIR) / f"{old}.passphrase"
    kept.rename(kept.with_name("escrow"))
    result = restore(before, "restored_without_key")
    assert result["status"] == "failed"
    error = result["error"]
    assert f"encryption key {old} is not in the keyring" in error and f"{old}.passphrase" in error, error
    assert "\n" not in error
    assert "restored_without_key" not in {r[0] for r in sample_cluster.execute("SELECT datname FROM pg_database")}
    # The copies are not blamed: the key is what is missing.
    assert set(before.copies.values_list("status", flat=True)) == {BackupCopy.Status.OK}


def s3_objects(tiers):
    listed = tiers.s3.list_objects_v2(Bucket=tiers.bucket).get("Contents", [])
    return {o["Key"].removeprefix("backupportal/"): o for o in listed}


def test_reencrypt_leaves_every_artifact_readable_with_the_new_key_alone(
    tiers, two_keys, sample_cluster, passphrase_file, tmp_path, settings
):
    """On every tier: primary, NAS, and S3 (moto over HTTP)."""
    before, after, old, new = two_keys
    assert before.copies.filter(status="ok").count() == 9  # the dump, its globals and manifest, on three tiers
    old_objects = set(before.copies.values_list("key", flat=True))
    result = run_command("reencrypt", "--from-key", old)
    assert result["_exit"] == 0 and result["status"] == "succeeded", result
    assert result["reencrypted"] == 9 and result["old_removed"] == 9
    assert keys_of(before) == {new}
    for copy in before.copies.select_related("location"):
        assert copy.old_key == "" and new in copy.key
        if copy.location.kind == "s3":
            data = tiers.s3.get_object(Bucket=tiers.bucket, Key=f"backupportal/{copy.key}")["Body"].read()
        else:
            data = (Path(copy.location.path) / copy.key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == copy.sha256
    main = before.copies.get(location__kind="primary", artifact="main")
    assert gpg_opens(tiers.primary / main.key, new_passphrase_file(tmp_path))
    assert not any((root / key).exists() for key in old_objects for root in (tiers.primary, tiers.nas))
    assert not old_objects & set(s3_objects(tiers))
    again = run_command("reencrypt", "--from-key", old)  # resumable: nothing is left to do
    assert again["_exit"] == 0 and again["reencrypted"] == 0

    # No kept artifact needs the old key: retention takes it out of the keyring.
    assert keyring.drop_unneeded(actor="test") == [old]
    assert not (Path(settings.KEYRING_DIR) / f"{old}.passphrase").exists()
    assert EncryptionKey.objects.get(pk=old).dropped_at is not None
    assert JournalEntry.objects.filter(action="key_dropped", details__key_id=old).exists()
    restored = restore(before, "restored_reencrypted")
    assert restored["status"] == "succeeded", restored
    with sample_cluster.connect("reliabilitymaldives") as a, sample_cluster.connect("restored_reencrypted") as b:
        assert sampledata.counts(a) == sampledata.counts(b)
    refused = run_command("reencrypt", "--from-key", old)
    assert refused["_exit"] == 1 and "left the keyring" in refused["_stderr"]


def test_pitr_through_a_rotation_and_after_reencrypting_the_base_and_wal(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, tmp_path, settings
):
    """The base backup, its manifest and the WAL before the rotation are on the first key (the
    WAL's data key wrapped by it), the WAL after on the second; re-encrypted, the second alone recovers."""
    enable_push(sample_cluster)
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    old = BackupRun.objects.get(pk=base["id"]).details["key_id"]
    write(sample_cluster, "CREATE TABLE probe(tx text)")
    write(sample_cluster, "INSERT INTO probe VALUES ('A')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    assert run_command("ingestwal", "maldives")["_exit"] == 0
    new = run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))["key_id"]
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    assert run_command("ingestwal", "maldives")["_exit"] == 0
    wal = BackupCopy.objects.filter(artifact="wal")
    assert set(wal.values_list("encryption_key_id", flat=True)) == {old, new}
    assert set(BackupCopy.objects.filter(run=base["id"]).values_list("artifact", "encryption_key_id")) == {
        ("main", old),
        ("manifest", old),
        ("signed_manifest", old),
    }

    result = run_command("reencrypt", "--from-key", old)
    assert result["status"] == "succeeded", result
    assert set(BackupCopy.objects.kept().values_list("encryption_key_id", flat=True)) == {new}
    assert keyring.drop_unneeded(actor="test") == [old]
    for wal_key in Path(settings.VAR_DIR, "walkeys").glob("*.key.gpg"):
        wal_key.unlink()  # and the WAL data keys are unwrapped afresh, with the new key, from the tiers
    from backups import walkeys

    walkeys._unwrapped.clear()
    recovered = pitr(restored(), (port := free_port()), "--target", "latest")
    assert recovered["status"] == "succeeded", recovered
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
    assert WalSegment.objects.exists()


def test_wrong_key_commands_are_refused_in_one_line(server, passphrase_file, backup_root, tmp_path, settings):
    keyring.current("test")  # the configured key set up
    same = run_command("rotatekey", "--passphrase-file", str(passphrase_file))
    assert same["_exit"] == 1 and "already the current key" in same["_stderr"]
    open_file = new_passphrase_file(tmp_path)
    open_file.chmod(0o644)
    loose = run_command("rotatekey", "--passphrase-file", str(open_file))
    assert loose["_exit"] == 1 and "chmod 600" in loose["_stderr"]
    stranger = run_command("rotatekey", "--recipients", "nobody@example.mv")
    assert stranger["_exit"] == 1 and "nobody@example.mv has no public key" in stranger["_stderr"]
    unknown = run_command("reencrypt", "--from-key", "0123456789abcdef")
    assert unknown["_exit"] == 1 and "no key 0123456789abcdef" in unknown["_stderr"]
    current = EncryptionKey.objects.get(current=True).pk
    itself = run_command("reencrypt", "--from-key", current)
    assert itself["_exit"] == 1 and "is the current key" in itself["_stderr"]
    # A passphrase file changed behind the keyring's back is refused, not silently used or ignored.
    settings.BACKUP_PASSPHRASE_FILE = str(new_passphrase_file(tmp_path, "changed-by-hand"))
    with pytest.raises(EncryptionError, match="rotatekey"):
        keyring.current("test")
    assert EncryptionKey.objects.count() == 1


def test_rotating_to_recipients_needs_their_secret_key_to_restore_and_keeps_the_passphrase_backups(
    server, sample_cluster, passphrase_file, backup_root, tmp_path, settings, client, charlie
):
    owner = tmp_path / "owner-gnupg"
    owner.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(owner), "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run(
        gpg + ["--quick-gen-key", "dr@reliabilitymaldives.mv", "ed25519", "cert", "never"],
        check=True,
        capture_output=True,
    )
    listed = subprocess.run(gpg + ["--list-keys", "--with-colons"], capture_output=True, text=True, check=True)
    fpr = listed.stdout.split("fpr:::::::::")[1].split(":")[0]
    subprocess.run(gpg + ["--quick-add-key", fpr, "cv25519", "encr", "never"], check=True, capture_output=True)
    portal = tmp_path / "portal-gnupg"
    portal.mkdir(mode=0o700)
    settings.GNUPGHOME = str(portal)
    public = subprocess.run(gpg + ["--export", fpr], capture_output=True, check=True).stdout
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(portal), "--import"], input=public, check=True, capture_output=True
    )

    before = logical_backup()
    rotated = run_command("rotatekey", "--recipients", fpr)
    assert rotated["_exit"] == 0 and rotated["kind"] == "recipients" and rotated["recipients"] == [fpr], rotated
    after = logical_backup()
    assert keys_of(after) == {rotated["key_id"]} and after.details["encryption"] == "gpg-pubkey"
    client.force_login(charlie)
    page = client.get(reverse("key-custody")).content.decode()
    assert fpr in page and f"key-{before.details['key_id']}" in page

    # The portal holds no secret key: the new backup is not readable here; the old one still is.
    refused = restore(after, "restored_recipients")
    assert refused["status"] == "failed" and "gpg" in refused["error"], refused
    assert restore(before, "restored_passphrase")["status"] == "succeeded"
    secret = subprocess.run(gpg + ["--export-secret-keys", fpr], capture_output=True, check=True).stdout
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(portal), "--import"], input=secret, check=True, capture_output=True
    )
    done = restore(after, "restored_recipients")
    assert done["status"] == "succeeded", done


def test_reencrypt_continues_where_it_stopped(two_keys, backup_root, settings):
    """A copy it cannot reach now is left on the old key (exit 1, named); the next run finishes."""
    from backups.models import StorageLocation

    before, after, old, new = two_keys
    primary = StorageLocation.objects.get(kind="primary", name="primary")
    StorageLocation.objects.filter(pk=primary.pk).update(enabled=False)
    stopped = run_command("reencrypt", "--from-key", old)
    assert stopped["_exit"] == 1 and stopped["status"] == "failed" and stopped["reencrypted"] == 0
    assert {f["copy"] for f in stopped["failed"]} == set(before.copies.values_list("pk", flat=True))
    assert "location primary is disabled" in stopped["failed"][0]["error"]
    assert keyring.drop_unneeded(actor="test") == []  # still needed
    StorageLocation.objects.filter(pk=primary.pk).update(enabled=True)
    finished = run_command("reencrypt", "--from-key", old)
    assert finished["_exit"] == 0 and finished["reencrypted"] == 3, finished  # dump, globals, signed manifest
    assert keys_of(before) == {new}


def test_reencrypt_on_a_locked_location_keeps_the_old_version_until_its_lock_expires(
    locked,  # noqa: F811 (the fixture imported above)
    two_keys,
    sample_cluster,
    passphrase_file,
    tmp_path,
    settings,
):
    """The re-encrypted S3 copy is read by its own new version; the old version (under S3 Object
    Lock) stays catalogued with its key until its retain-until, then goes by version."""
    import time_machine
    from django.utils import timezone

    before, _after, old, new = two_keys
    s3_before = {c.pk: c.version_id for c in before.copies.filter(location__kind="s3")}
    assert all(s3_before.values())  # catalogued by version from the start
    result = run_command("reencrypt", "--from-key", old)
    assert result["_exit"] == 0 and result["reencrypted"] == 9, result
    assert result["old_removed"] == 6 and result["old_waiting"] == 3  # primary and NAS gone, S3 locked
    for copy in before.copies.filter(location__kind="s3"):
        assert new in copy.key and copy.old_key and copy.old_encryption_key_id == old
        assert copy.version_id and copy.version_id != s3_before[copy.pk]
        head = locked.s3.head_object(Bucket=locked.bucket, Key=f"backupportal/{copy.key}", VersionId=copy.version_id)
        assert head["ObjectLockMode"] == "GOVERNANCE" and copy.retain_until is not None
    assert keyring.drop_unneeded(actor="test") == []  # the locked old versions still need the old key
    # The copy reads (by its new version) with the new key alone: verify re-hashes every tier.
    verified = run_command("verify", str(before.pk))
    assert verified["_exit"] == 0, verified

    with time_machine.travel(timezone.now() + timedelta(days=LOCK_DAYS + 1)):
        again = run_command("reencrypt", "--from-key", old)
        assert again["_exit"] == 0 and again["old_removed"] == 3 and again["reencrypted"] == 0, again
        assert keyring.drop_unneeded(actor="test") == [old]
    old_keys = {v["Key"] for v in every_version(locked) if old not in v["Key"] and ".k" not in v["Key"]}
    assert not {f"backupportal/{c.key}" for c in before.copies.filter(location__kind="s3")} & old_keys
    assert not before.copies.exclude(old_key="").exists()


def test_the_current_keys_file_missing_from_the_keyring_is_named_as_such(server, passphrase_file, backup_root):
    """Found by a probe: with the current key's passphrase file gone from the keyring (the
    configuration unchanged), the backup advised 'switch to it with manage.py rotatekey': a new
    key, and the old backups still naming the lost one. It says to put the file back from escrow."""
    from backups.keyring import keyring_dir

    assert backup_json()["status"] == "succeeded"  # the keyring is set up with the configured key
    current = EncryptionKey.objects.get(current=True)
    (keyring_dir() / f"{current.pk}.passphrase").unlink()
    result = backup_json()
    assert result["status"] == "failed", result
    assert result["error"].startswith(f"the current encryption key {current.pk} is not in the keyring "), result[
        "error"
    ]
    assert f"put {current.pk}.passphrase back there" in result["error"] and "rotatekey" not in result["error"]


def test_a_key_a_running_backup_encrypts_with_stays_in_the_keyring(
    server, sample_cluster, passphrase_file, backup_root, tmp_path, settings, monkeypatch
):
    """Found by a probe: a backup takes the current key at its start and catalogues its copies at
    its end. rotatekey and retention's key drop in between took the key out of the keyring, and the
    backup then "succeeded" with a dump no restore could decrypt ("not in the keyring")."""
    from backups import logical

    dump_then = logical.encrypt_to
    midway = {}

    def rotate_and_drop_while_it_dumps(*args, **kwargs):
        if not midway:  # the operator rotates, and the nightly retention runs, while pg_dump streams
            midway["rotated"] = run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))
            settings.BACKUP_PASSPHRASE_FILE = str(new_passphrase_file(tmp_path))
            midway["dropped"] = keyring.drop_unneeded(actor="job:retention")
        return dump_then(*args, **kwargs)

    monkeypatch.setattr(logical, "encrypt_to", rotate_and_drop_while_it_dumps)
    run = logical_backup()
    assert midway["rotated"]["_exit"] == 0 and midway["dropped"] == []
    old = run.details["key_id"]
    assert old in keys_of(run) and EncryptionKey.objects.get(pk=old).dropped_at is None
    restored = restore(run, "restored_after_midway_rotation")
    assert restored["status"] == "succeeded", restored
    # Once the backup is done, its copies are what keep the key; re-encrypted, it may go.
    assert run_command("reencrypt", "--from-key", old)["_exit"] == 0
    assert keyring.drop_unneeded(actor="test") == [old]


def test_a_verify_or_restore_that_read_the_catalog_before_a_reencrypt_condemns_no_copy(two_keys, backup_root):
    """Found by a probe: a weekly verify lists the copies, then reads them for hours. A copy that
    reencrypt moved in between was read by its old object, gone, and marked bad: every copy of a
    good backup "missing", the corruption alert raised, restores and later reencrypts skipping
    them. The verify reads the object the catalog names now; a restore's stale read marks nothing."""
    from backups import copies, streams, verify

    before, _after, old, new = two_keys
    listed = list(before.copies.select_related("location", "run__server").order_by("pk"))
    assert run_command("reencrypt", "--from-key", old)["_exit"] == 0
    assert [verify.verify_copy(copy) for copy in listed] == [("ok", "")] * len(listed)
    with pytest.raises(streams.NoReadableCopy) as read:  # what a restore that listed them first meets
        streams.open_first(listed)
    copies.mark_faults(read.value.faults)
    assert set(before.copies.values_list("status", flat=True)) == {"ok"}
    assert not JournalEntry.objects.filter(action="copy_bad").exists()
    assert keys_of(before) == {new}
    assert run_command("verify", str(before.pk))["bad"] == 0


class Killed(BaseException):
    """reencrypt killed (SIGKILL) after the catalog moved to the new object, before the old went."""


def test_an_old_object_on_a_nas_unmounted_at_its_removal_keeps_its_key(
    tiers, server, sample_cluster, passphrase_file, tmp_path, monkeypatch
):
    """Found by a probe: reencrypt killed before removing a NAS copy's old object; the next run
    found the NAS unmounted, "removed" the object (a file already gone), forgot it, and the old key
    then left the keyring, while the object, readable with that key, came back with the NAS."""
    from backups import reencrypt

    before = logical_backup()
    old = before.details["key_id"]
    assert run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))["_exit"] == 0
    remove = reencrypt.remove_replaced

    def killed_at_the_nas(copy):
        if copy.location.name == "nas":
            raise Killed()
        return remove(copy)

    monkeypatch.setattr(reencrypt, "remove_replaced", killed_at_the_nas)
    with pytest.raises(Killed):
        run_command("reencrypt", "--from-key", old)
    monkeypatch.setattr(reencrypt, "remove_replaced", remove)
    (copy,) = before.copies.exclude(old_key="")
    assert copy.location.name == "nas"
    nas, away = Path(tiers.nas), Path(f"{tiers.nas}.away")
    nas.rename(away)
    nas.mkdir()  # the mount point, the NAS not mounted on it
    try:
        waiting = run_command("reencrypt", "--from-key", old)
    finally:
        nas.rmdir()
        away.rename(nas)
    assert copy.pk in {c for c in before.copies.exclude(old_key="").values_list("pk", flat=True)}, waiting
    assert waiting["old_waiting"] >= 1 and keyring.drop_unneeded(actor="test") == []
    finished = run_command("reencrypt", "--from-key", old)
    assert finished["_exit"] == 0 and not before.copies.exclude(old_key="").exists(), finished
    assert not (nas / copy.old_key).exists() and keys_of(before) == {finished["to_key"]}
    assert keyring.drop_unneeded(actor="test") == [old]


def test_reencrypt_while_a_backup_writes_with_the_old_key_does_not_say_it_is_done(
    server, sample_cluster, passphrase_file, backup_root, tmp_path, settings, monkeypatch
):
    """Found by a probe: reencrypt run while a backup that took the old key was still dumping said
    "succeeded" (exit 0), and the backup then catalogued its copies on the old key."""
    from backups import logical

    first = logical_backup()
    old = first.details["key_id"]
    dump_then = logical.encrypt_to
    midway = {}

    def rotate_and_reencrypt_while_it_dumps(*args, **kwargs):
        if not midway:
            run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))
            settings.BACKUP_PASSPHRASE_FILE = str(new_passphrase_file(tmp_path))
            midway["reencrypt"] = run_command("reencrypt", "--from-key", old)
        return dump_then(*args, **kwargs)

    monkeypatch.setattr(logical, "encrypt_to", rotate_and_reencrypt_while_it_dumps)
    run = logical_backup()
    said = midway["reencrypt"]
    assert said["_exit"] == 1 and said["status"] == "failed" and said["under_way"] == [run.pk], said
    assert old in keys_of(run) and old not in keys_of(first)
    again = run_command("reencrypt", "--from-key", old)
    assert again["_exit"] == 0 and again["under_way"] == [] and old not in keys_of(run), again


def test_a_key_a_wal_ingest_writes_with_stays_in_the_keyring_until_its_segments_are_catalogued(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, tmp_path, settings, monkeypatch
):
    """Found by a probe: a WAL ingest takes the current key once for its batch (minutes, on a
    backlog) and catalogues each segment after encrypting it. rotatekey, reencrypt and the key
    drop in between took the key out of the keyring while segments were still being written with
    it: WAL no PITR could read, and reencrypt said "succeeded"."""
    from backups import walingest
    from backups.crypto import keyring_dir

    enable_push(sample_cluster)
    write(sample_cluster, "CREATE TABLE probe(tx text)")
    for n in range(3):
        write(sample_cluster, f"INSERT INTO probe VALUES ('{n}')")
        wait_archived(sample_cluster, switch_wal(sample_cluster))
    old = keyring.current().custody_key
    naming = walingest.wal_key
    midway = {}

    def rotate_reencrypt_and_drop_midway(server, name):
        midway["names"] = midway.get("names", 0) + 1
        if midway["names"] == 2:  # the first segment is being encrypted with the old key
            run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))
            settings.BACKUP_PASSPHRASE_FILE = str(new_passphrase_file(tmp_path))
            midway["reencrypt"] = run_command("reencrypt", "--from-key", old)
            midway["dropped"] = keyring.drop_unneeded(actor="job:retention")
        return naming(server, name)

    monkeypatch.setattr(walingest, "wal_key", rotate_reencrypt_and_drop_midway)
    assert run_command("ingestwal", "maldives")["_exit"] == 0
    assert midway["names"] >= 3
    assert midway["dropped"] == [] and (keyring_dir() / f"{old}.passphrase").is_file()
    said = midway["reencrypt"]
    assert said["_exit"] == 1 and said.get("wal_writing") is True, said
    wal = BackupCopy.objects.filter(artifact="wal")
    assert old in set(wal.values_list("encryption_key_id", flat=True))
    # Once the batch is catalogued, reencrypt moves it and the key may go.
    again = run_command("reencrypt", "--from-key", old)
    assert again["_exit"] == 0 and again["wal_writing"] is False, again
    assert set(wal.values_list("encryption_key_id", flat=True)) == {keyring.current().custody_key}
    assert keyring.drop_unneeded(actor="test") == [old]
