"""Where a storage location's data is (its kind, path, bucket, prefix, endpoint URL, region) does
not change once it holds copies or the journal's anchors: copies are catalogued by key relative
to that address, so re-pointing it would retire it without the change request retiring needs, and
send new copies and anchors wherever it now points. Sam is a Sysadmin."""

import shutil
import tempfile
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from backupportal import journal
from backupportal.models import JournalEntry
from backups.models import BackupCopy, StorageLocation
from backups.storage import store_for
from tests.adminform_helpers import admin_form_data
from tests.helpers import backup_json

ADDRESS = ("kind", "path", "bucket", "prefix", "endpoint_url", "region")


def address(location):
    location.refresh_from_db()
    return {f: getattr(location, f) for f in ADDRESS}


def change(client, location, **fields):
    url = reverse("admin:backups_storagelocation_change", args=[location.pk])
    return client.post(url, admin_form_data(client, url, **fields))


def add(client, **fields):
    url = reverse("admin:backups_storagelocation_add")
    return client.post(url, admin_form_data(client, url, **fields))


def test_a_sysadmin_cannot_repoint_a_location_that_holds_copies(client, sam, server, passphrase_file, tiers):
    assert backup_json()["status"] == "succeeded"
    s3, nas = StorageLocation.objects.get(name="s3"), StorageLocation.objects.get(name="nas")
    held = BackupCopy.objects.filter(location=s3, status="ok").count()
    assert held, "the backup made its S3 copies"
    before = address(s3), address(nas)
    unlocked = f"{tiers.bucket}-nolock"  # a bucket without Object Lock, as an intruder would choose
    tiers.s3.create_bucket(Bucket=unlocked)
    client.force_login(sam)
    for field, value in [
        ("endpoint_url", "https://attacker.example"),
        ("bucket", unlocked),
        ("prefix", "elsewhere/"),
        ("region", "eu-west-1"),
        ("kind", "nas"),
    ]:
        response = change(client, s3, **{field: value})
        assert response.status_code == 200, field
        assert f"Location s3 holds {held} catalogued copies" in response.content.decode(), field
        assert "add a new location" in response.content.decode()
    response = change(client, nas, path=str(tiers.nas / "elsewhere"))
    assert response.status_code == 200 and "Location nas holds" in response.content.decode()

    assert (address(s3), address(nas)) == before
    assert not JournalEntry.objects.filter(action="location_changed").exists()
    for copy in BackupCopy.objects.filter(location__in=[s3, nas]):
        assert store_for(copy.location).exists(copy.key, copy.version_id), copy  # still where the catalog says


def test_other_fields_of_a_location_with_copies_still_save(client, sam, server, passphrase_file, tiers):
    assert backup_json()["status"] == "succeeded"
    s3 = StorageLocation.objects.get(name="s3")
    client.force_login(sam)
    response = change(client, s3, capacity_bytes="5000000000", storage_class="STANDARD_IA")
    assert response.status_code == 302, response.content.decode()[:3000]
    s3.refresh_from_db()
    assert s3.capacity_bytes == 5_000_000_000 and s3.storage_class == "STANDARD_IA"


def test_a_location_without_copies_is_corrected_freely_and_still_checked(client, sam, tiers):
    client.force_login(sam)
    response = add(
        client, name="offsite2", kind="s3", bucket=tiers.bucket, prefix="offsite2/", endpoint_url=tiers.server.endpoint
    )  # beside the tiers' own "backupportal/": a location shares no keys with another
    assert response.status_code == 302, response.content.decode()[:3000]
    offsite = StorageLocation.objects.get(name="offsite2")

    # The save still checks the new address: a typo is caught here.
    response = change(client, offsite, bucket="no-such-bucket")
    assert response.status_code == 200
    assert "S3 bucket &#x27;no-such-bucket&#x27; does not exist at" in response.content.decode()

    other = f"{tiers.bucket}-2"
    tiers.s3.create_bucket(Bucket=other)
    response = change(client, offsite, bucket=other, prefix="moved/")
    assert response.status_code == 302, response.content.decode()[:3000]
    assert address(offsite)["bucket"] == other and offsite.prefix == "moved/"
    assert set(JournalEntry.objects.get(action="location_changed").details["fields"]) == {"bucket", "prefix"}

    response = add(client, name="nas2", kind="nas", path=str(tiers.nas / "first"))
    assert response.status_code == 302
    nas2 = StorageLocation.objects.get(name="nas2")
    response = change(client, nas2, path=str(tiers.nas / "second"))
    assert response.status_code == 302 and address(nas2)["path"] == str(tiers.nas / "second")


def test_a_location_holding_the_journals_anchors_is_not_repointed(client, sam, tiers):
    client.force_login(sam)
    assert add(client, name="nas2", kind="nas", path=str(tiers.nas / "anchored")).status_code == 302
    nas2 = StorageLocation.objects.get(name="nas2")
    written = journal.write_anchors()["locations"]
    assert any(r["location"] == "nas2" and r["written"] for r in written)
    assert not BackupCopy.objects.filter(location=nas2).exists()

    response = change(client, nas2, path=str(tiers.nas / "elsewhere"))
    assert response.status_code == 200
    assert "Location nas2 holds the journal&#x27;s anchors" in response.content.decode()
    assert address(nas2)["path"] == str(tiers.nas / "anchored")


def test_settings_that_move_a_location_holding_copies_keep_its_address(settings, server, passphrase_file, tiers):
    """An edited BACKUP_ROOT or S3_PREFIX (a mount moved, a typo) at the next migrate: the copies
    stay where the catalog says, migrate exits non-zero saying which setting and what to do, and
    what is not an address (the storage class) still follows the settings."""
    assert backup_json()["status"] == "succeeded"
    primary, s3 = StorageLocation.objects.get(name="primary"), StorageLocation.objects.get(name="s3")
    before = address(primary), address(s3)
    held = {
        loc.name: BackupCopy.objects.filter(location=loc).exclude(status="deleted").count() for loc in (primary, s3)
    }
    assert all(held.values()), held
    settings.BACKUP_ROOT = tiers.primary / "moved"
    settings.S3_PREFIX = "elsewhere/"
    settings.S3_STORAGE_CLASS = "STANDARD_IA"

    with pytest.raises(CommandError) as raised:
        call_command("migrate", verbosity=0)
    said = str(raised.value)
    assert "\n" not in said
    assert (
        f"location 'primary' holds {held['primary']} catalogued copies at {before[0]['path']}, "
        "but BACKUP_ROOT now says otherwise: its address is kept. Set BACKUP_ROOT back, or move every file "
        "there first" in said
    )
    assert f"location 's3' holds {held['s3']} catalogued copies at s3://{tiers.bucket}/backupportal/" in said
    assert "but S3_PREFIX now says otherwise: its address is kept. Set S3_PREFIX back; another bucket" in said
    assert (address(primary), address(s3)) == before
    s3.refresh_from_db()
    assert s3.storage_class == "STANDARD_IA"
    for copy in BackupCopy.objects.filter(location__in=[primary, s3]).exclude(status="deleted"):
        assert store_for(copy.location).exists(copy.key, copy.version_id), copy

    settings.BACKUP_ROOT, settings.S3_PREFIX = before[0]["path"], before[1]["prefix"]
    call_command("migrate", verbosity=0)  # set back: nothing to say


def test_a_directory_location_follows_its_setting_once_its_files_are_there(settings, server, passphrase_file, tiers):
    """The DBA moved the backups to a bigger disk, every file under its name, then BACKUP_ROOT:
    the location follows, and each copy reads from there. A file missing keeps it where it was."""
    assert backup_json()["status"] == "succeeded"
    primary = StorageLocation.objects.get(name="primary")
    old = Path(primary.path)
    # The NAS mirror's directory holds the same keys with the same sizes: never two locations in one.
    settings.BACKUP_ROOT = tiers.nas
    with pytest.raises(CommandError, match="location 'primary' holds"):
        call_command("migrate", verbosity=0)
    assert address(primary)["path"] == str(old)
    new = Path(tempfile.mkdtemp(prefix="bp-bigger-disk-"))
    try:
        shutil.copytree(old, new, dirs_exist_ok=True)
        kept = BackupCopy.objects.filter(location=primary, status="ok")
        missing = kept.first()
        (new / missing.key).unlink()
        settings.BACKUP_ROOT = new
        with pytest.raises(CommandError, match="location 'primary' holds .* Set BACKUP_ROOT back, or move every file"):
            call_command("migrate", verbosity=0)
        assert address(primary)["path"] == str(old)

        shutil.copy2(old / missing.key, new / missing.key)
        call_command("migrate", verbosity=0)
        assert address(primary)["path"] == str(new)
        for copy in kept:
            assert store_for(copy.location).path(copy.key).is_relative_to(new)
            assert store_for(copy.location).exists(copy.key), copy
    finally:
        shutil.rmtree(new, ignore_errors=True)


def test_settings_move_a_location_that_holds_nothing(settings, backup_root, tmp_path):
    primary = StorageLocation.objects.get(name="primary")
    assert not primary.holdings()
    settings.BACKUP_ROOT = tmp_path / "elsewhere"
    StorageLocation.sync_from_settings()
    assert address(primary)["path"] == str(tmp_path / "elsewhere")
