"""The portal's own backups, trusted and in key custody: restoreportal restores only a selfbackup
the portal signed (never one forged with the recipients' public key or the passphrase), and
selfbackups are encrypted with the keyring's key, counted by it, moved off a compromised key by
reencrypt, and opened on a new host with the keyring's keys. A copy under S3 Object Lock keeps
its key until the lock expires."""

import hashlib
import json
import shutil
import sqlite3
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from backupportal.lib import signing
from backupportal.models import JournalEntry
from backups import keyring, portalrestore, selfbackup
from backups.models import EncryptionKey, PortalBackup
from tests import test_selfbackup
from tests.helpers import run_command, stop_gpg_agent
from tests.stock import GPG, stock
from tests.test_key_custody import gpg_opens, new_passphrase_file
from tests.test_object_lock import LOCK_DAYS, every_version, locked  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)
FORGED = "selfbackup-29991231T235959+0000.sqlite3.gpg"
new_host = test_selfbackup.new_host  # the fixture: a second host, the old one's keys copied in
portal = test_selfbackup.portal


def forged_database(into):
    """What someone with write access to a location and the passphrase (or the recipients' public
    key) builds: the portal's own schema, a superuser of theirs, and no journal."""
    target = sqlite3.connect(into)
    source = sqlite3.connect(connection.settings_dict["NAME"])
    source.backup(target)
    source.close()
    for (name,) in target.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        target.execute(f'DROP TRIGGER "{name}"')
    target.execute("DELETE FROM backupportal_journalentry")
    target.execute(
        "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff, "
        "is_active, date_joined) VALUES ('!', 1, 'mallory', '', '', '', 1, 1, '2026-12-01 00:00:00')"
    )
    target.commit()
    target.close()


def sidecar(path, suffix, data):
    Path(str(path) + suffix).write_bytes(data if isinstance(data, bytes) else data.encode())


def no_tables(var):
    database = var / "portal.sqlite3"
    if not database.exists():
        return True
    with sqlite3.connect(database) as db:
        return not db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()


def test_restoreportal_refuses_a_selfbackup_forged_without_the_signing_key(
    settings, tiers, passphrase_file, new_host, tmp_path
):
    if connection.vendor != "sqlite":
        pytest.skip("the forgery is an SQLite file")
    env, var = new_host
    genuine = run_command("selfbackup")
    assert genuine["status"] == "succeeded", genuine
    plain = tmp_path / "forged.sqlite3"
    forged_database(plain)
    forged = var / FORGED
    stock(f"{GPG} --symmetric --cipher-algo AES256 -o {forged} {plain}", tmp_path, passphrase_file)
    sha256 = hashlib.sha256(forged.read_bytes()).hexdigest()
    sidecar(forged, ".sha256", f"{sha256}  {FORGED}\n")

    def refused(*args):
        done = portal(env, "restoreportal", str(forged), *args, check=False)
        assert done.returncode == 1, done.stdout
        assert no_tables(var)
        return done.stderr.strip().splitlines()[-1]

    # The file and its .sha256, as the README asked before: no signed .json, nothing restored.
    assert "fetch it from the same location" in refused()
    # A .json as selfbackups wrote it before they were signed.
    sidecar(forged, ".json", json.dumps({"file": FORGED, "sha256": sha256, "journal_count": 0}))
    assert "is not a signed selfbackup envelope" in refused()
    # The genuine selfbackup's signed .json put beside the forgery.
    shutil.copy(Path(tiers.primary) / (genuine["key"] + ".json"), Path(str(forged) + ".json"))
    assert f"was signed for {Path(genuine['key']).name}, not {FORGED}" in refused()
    # Signed, by a key of the forger's own: it does not verify with the portal's public key,
    # whether from SIGNING_KEY_DIR or given with --public-key.
    about = {"file": FORGED, "sha256": sha256, "journal_entry": 1, "journal_count": 1, "journal_key_check": ""}
    text = json.dumps(about)
    # A short path: gpg-agent's sockets go under it, and a long pytest tmp_path (xdist's popen-gwN,
    # pytest-NNN on a machine that ran many sessions) went past the 107 bytes a socket path may have.
    forger = Path(tempfile.mkdtemp(prefix="bp-forger-"))
    settings.SIGNING_KEY_DIR = forger
    try:
        envelope = {"format": 1, "selfbackup": text, "signature": signing.sign(text.encode()).decode()}
    finally:
        stop_gpg_agent(forger)
        shutil.rmtree(forger, ignore_errors=True)
    sidecar(forged, ".json", json.dumps(envelope))
    assert "does not verify with the given public key" in refused()
    public = Path(env["SIGNING_KEY_DIR"]) / signing.PUBLIC_KEY_NAME
    assert "does not verify with the given public key" in refused("--public-key", str(public))


def test_restoreportal_needs_the_portals_public_key(settings, tiers, passphrase_file, new_host):
    env, var = new_host
    taken = run_command("selfbackup")
    env["SIGNING_KEY_DIR"] = str(var / "signing")  # the signing directory was not kept
    done = portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]), check=False)
    assert done.returncode == 1 and "give --public-key FILE" in done.stderr
    kept = var / "signing-public.asc"
    shutil.copy(Path(settings.SIGNING_KEY_DIR) / signing.PUBLIC_KEY_NAME, kept)
    restored = portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]), "--public-key", str(kept))
    assert "signature verified" in restored.stdout


def test_a_restored_journal_that_is_not_the_signed_one_is_refused(tiers, passphrase_file):
    taken = PortalBackup.objects.get(pk=run_command("selfbackup")["id"])
    newest = JournalEntry.objects.get(pk=taken.journal_entry)
    signed = {"journal_entry": newest.pk, "journal_count": taken.journal_count, "journal_hmac": newest.hmac}
    journal_now = JournalEntry.objects.order_by("-id").first()
    now = {"journal_entry": journal_now.pk, "journal_count": JournalEntry.objects.count()}
    portalrestore.check_journal(now | {"journal_hmac": journal_now.hmac})  # the chain walks, and ends as said
    for wrong in ({"journal_count": now["journal_count"] + 1}, {"journal_hmac": "0" * 64}, signed):
        with pytest.raises(portalrestore.RestoreRefused, match="not the database that was signed"):
            portalrestore.check_journal(now | {"journal_hmac": journal_now.hmac} | wrong)


def test_the_selfbackup_is_encrypted_with_the_keyrings_key_and_refuses_a_passphrase_changed_by_hand(
    settings, tiers, passphrase_file, tmp_path
):
    taken = run_command("selfbackup")
    current = EncryptionKey.objects.get(current=True)
    assert taken["encryption_key"] == current.pk == PortalBackup.objects.get(pk=taken["id"]).encryption_key_id
    assert current.artifacts().selfbackups.count() == 1
    rogue = new_passphrase_file(tmp_path, "changed-by-hand-never-escrowed")
    settings.BACKUP_PASSPHRASE_FILE = str(rogue)
    refused = run_command("selfbackup")
    assert refused["_exit"] == 1 and refused["status"] == "failed"
    assert "BACKUP_PASSPHRASE_FILE names a key the keyring does not hold" in refused["_stderr"]
    assert sorted(p.name for p in (Path(tiers.primary) / "portal").iterdir()) == sorted(
        Path(taken["key"]).name + suffix for suffix in ("", ".json", ".sha256")
    )


def test_reencrypt_moves_the_selfbackups_off_a_compromised_key_so_it_leaves_the_keyring(
    settings, tiers, passphrase_file, tmp_path
):
    old = PortalBackup.objects.get(pk=run_command("selfbackup")["id"])
    old_key = old.encryption_key_id
    rotated = run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))
    assert rotated["_exit"] == 0, rotated
    settings.BACKUP_PASSPHRASE_FILE = str(new_passphrase_file(tmp_path))
    assert keyring.drop_unneeded(actor="test") == []  # the selfbackup still needs the old key
    assert EncryptionKey.objects.get(pk=old_key).artifacts().count() == 1

    result = run_command("reencrypt", "--from-key", old_key)
    assert result["_exit"] == 0 and result["status"] == "succeeded", result
    assert result["selfbackups_removed"] == [old.pk] and result["selfbackups_locked"] == []
    fresh = PortalBackup.objects.get(pk=result["selfbackup"])
    assert fresh.encryption_key_id == rotated["key_id"] and fresh.status == "succeeded"
    assert gpg_opens(Path(tiers.primary) / fresh.key, new_passphrase_file(tmp_path))
    old.refresh_from_db()
    assert old.deleted_at is not None and old.locked_until is None
    name = Path(old.key).name
    for root in (tiers.primary, tiers.nas):
        assert not list((Path(root) / "portal").glob(name + "*"))
    listed = tiers.s3.list_object_versions(Bucket=tiers.bucket)
    assert not [v for v in listed.get("Versions", []) if name in v["Key"]]
    assert keyring.drop_unneeded(actor="test") == [old_key]


def test_restoreportal_opens_a_selfbackup_from_before_a_rotation_with_the_keyrings_key(
    settings, tiers, passphrase_file, new_host, tmp_path
):
    env, var = new_host
    taken = run_command("selfbackup")
    assert run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))["_exit"] == 0
    # The new host is set up with the current passphrase only.
    shutil.copy(new_passphrase_file(tmp_path), env["BACKUP_PASSPHRASE_FILE"])
    backup = Path(tiers.primary) / taken["key"]
    refused = portal(env, "restoreportal", str(backup), check=False)
    assert refused.returncode == 1 and "opens with none of the 1 key(s) tried" in refused.stderr
    # With the keyring back from the key escrow, the selfbackup's own key opens it.
    shutil.copytree(settings.KEYRING_DIR, var / "keyring", dirs_exist_ok=True)
    restored = json.loads(portal(env, "restoreportal", str(backup), "--json").stdout.splitlines()[-1])
    assert restored["status"] == "restored" and restored["restored_up_to"] == taken["journal_entry"]


def test_a_selfbackup_held_by_object_lock_keeps_its_key_until_the_lock_expires(
    locked,  # noqa: F811 (the fixture imported above)
    settings,
    passphrase_file,
    tmp_path,
):
    old = PortalBackup.objects.get(pk=run_command("selfbackup")["id"])
    rotated = run_command("rotatekey", "--passphrase-file", str(new_passphrase_file(tmp_path)))
    settings.BACKUP_PASSPHRASE_FILE = str(new_passphrase_file(tmp_path))
    result = run_command("reencrypt", "--from-key", old.encryption_key_id)
    assert result["_exit"] == 0 and result["selfbackups_locked"] == [old.pk], result
    old.refresh_from_db()
    assert old.deleted_at is not None and old.locked_until > timezone.now()
    assert not (Path(locked.primary) / old.key).exists() and not (Path(locked.nas) / old.key).exists()
    assert [v for v in every_version(locked) if v["Key"] == f"backupportal/{old.key}"]
    assert keyring.drop_unneeded(actor="test") == []  # the locked version still needs the old key

    with time_machine.travel(timezone.now() + timedelta(days=LOCK_DAYS + 1)):
        assert selfbackup.remove_old("test") == [old.pk]
        old.refresh_from_db()
        assert old.locked_until is None
        assert not [v for v in every_version(locked) if Path(old.key).name in v["Key"]]
        assert keyring.drop_unneeded(actor="test") == [old.encryption_key_id]
    assert PortalBackup.objects.good().get().encryption_key_id == rotated["key_id"]
