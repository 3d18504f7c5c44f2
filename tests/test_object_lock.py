"""S3 Object Lock per storage location, against moto's S3 server over HTTP with real boto3.

The bucket is created with Object Lock, as an operator makes it. moto's server runs in this
process, so time_machine moves its clock with the portal's: a lock expires for both at once.
"""

import hashlib
import uuid
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
import time_machine
from botocore.exceptions import ClientError
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from backupportal.lib import sampledata
from backupportal.models import JournalEntry
from backups import manifests, retention, walingest, walkeys
from backups.copies import delete_copy, delete_run_artifacts, retry_deletions
from backups.models import BackupCopy, BackupRun, ChangeRequest, LockChange, StorageLocation
from backups.storage import ObjectLocked, StorageError, store_for
from tests.adminform_helpers import admin_form_data
from tests.helpers import good_backup, restore_json, run_command, verify_json
from tests.test_rebuild_catalog import burn_the_host, keep_public_key, signing_dir  # noqa: F401 (fixtures)
from tests.test_wal_keys import fetch, forget_keys, spool_segments

pytest_plugins = ["tests.walfixtures"]

LOCK_DAYS = 5
PREFIX = "backupportal/"


@pytest.fixture
def locked(tiers, s3_client):
    """The tiers, their S3 location on a bucket created with Object Lock, locking for LOCK_DAYS in governance mode."""
    bucket = f"locked-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    location = tiers.locations["s3"]
    location.bucket, location.lock_mode, location.lock_days = bucket, "governance", LOCK_DAYS
    location.full_clean()
    store_for(location).check()  # the bucket has Object Lock: the check the admin form makes passes
    location.save()
    tiers.bucket = bucket
    return tiers


def backup_and_wal_on_s3(server):
    """A good backup and two ingested WAL segments, copied to S3: (run, segment names, the run's
    S3 copies' (version, retain-until) by artifact, the WAL copies' versions by key)."""
    _, run = good_backup()
    forget_keys()
    names = spool_segments(server, 2)
    assert walingest.ingest(server).ingested == names
    made = {c.artifact: (c.version_id, c.retain_until) for c in s3_copies(run)}
    wal_made = {c.key: c.version_id for c in BackupCopy.objects.filter(wal_segment__isnull=False, location__kind="s3")}
    return run, names, made, wal_made


def s3_copies(run):
    return run.copies.filter(location__kind=StorageLocation.Kind.S3).select_related("location").order_by("artifact")


def head(tiers, copy):
    return tiers.s3.head_object(Bucket=tiers.bucket, Key=PREFIX + copy.key, VersionId=copy.version_id)


def every_version(tiers):
    return tiers.s3.list_object_versions(Bucket=tiers.bucket).get("Versions", [])


def test_a_lock_is_refused_where_it_cannot_hold(tiers):
    nas = tiers.locations["nas"]
    nas.lock_mode, nas.lock_days = "compliance", 30
    with pytest.raises(ValidationError, match="Object Lock is an S3 feature"):
        nas.full_clean()
    s3 = tiers.locations["s3"]
    s3.lock_mode, s3.lock_days = "governance", 0
    with pytest.raises(ValidationError, match="needs between 1 and 3650 lock days"):
        s3.full_clean()
    s3.lock_mode, s3.lock_days = "none", 7
    with pytest.raises(ValidationError, match="Lock days without a lock mode"):
        s3.full_clean()
    # The tiers' bucket was created without Object Lock: checked when the location is saved or checked.
    s3.lock_mode = "compliance"
    s3.full_clean()
    with pytest.raises(StorageError) as refused:
        store_for(s3).check()
    message = str(refused.value)
    assert message.startswith(f"S3 bucket '{tiers.bucket}' does not have Object Lock enabled")
    assert "compliance lock of location s3" in message and "enable it on the bucket" in message
    assert "\n" not in message


def test_the_admin_form_says_the_bucket_has_no_object_lock(client, sam, tiers):
    client.force_login(sam)
    url = reverse("admin:backups_storagelocation_change", args=[tiers.locations["s3"].pk])
    response = client.post(url, admin_form_data(client, url, lock_mode="governance", lock_days="7"))
    assert response.status_code == 200
    assert "does not have Object Lock enabled" in str(response.context["adminform"].form.non_field_errors())
    assert StorageLocation.objects.get(name="s3").lock_mode == "none"


def test_every_object_the_portal_puts_in_a_locked_location_is_locked_and_catalogued_by_version(
    server, passphrase_file, locked, settings
):
    settings.JOURNAL_ANCHORS = True  # the journal's anchors go to every location too
    before = timezone.now().replace(microsecond=0)  # S3 keeps retain-until to the second
    result, run = good_backup()
    assert {c["status"] for c in result["copies"]} == {"ok"}, result
    copies = list(s3_copies(run))
    assert [c.artifact for c in copies] == ["globals", "main", "signed_manifest"]
    for copy in copies:
        assert copy.version_id
        assert before + timedelta(days=LOCK_DAYS) <= copy.retain_until <= timezone.now() + timedelta(days=LOCK_DAYS)
        lock = head(locked, copy)
        assert (lock["ObjectLockMode"], lock["ObjectLockRetainUntilDate"]) == ("GOVERNANCE", copy.retain_until)
    # Everything in the bucket, not only what the catalog has a row for: the anchors are locked too.
    versions = every_version(locked)
    assert any(v["Key"].startswith(PREFIX + "journal-anchors/") for v in versions), versions
    for version in versions:
        lock = locked.s3.head_object(Bucket=locked.bucket, Key=version["Key"], VersionId=version["VersionId"])
        assert lock["ObjectLockMode"] == "GOVERNANCE", version["Key"]


def test_a_multipart_upload_is_locked_too(locked, settings):
    """moto ignores the lock headers of a multipart upload; the writer reads the lock back and sets it."""
    settings.S3_MULTIPART_THRESHOLD, settings.S3_PART_SIZE = 1 << 20, 5 << 20
    data = bytes(range(256)) * (6 * 4096)  # 6 MiB: two parts
    with store_for(locked.locations["s3"]).writer("big.bin") as out:
        out.write(data)
        assert out.commit() == (len(data), hashlib.sha256(data).hexdigest())
    assert out.multipart and out.version_id
    lock = locked.s3.head_object(Bucket=locked.bucket, Key=PREFIX + "big.bin", VersionId=out.version_id)
    assert (lock["ObjectLockMode"], lock["ObjectLockRetainUntilDate"]) == ("GOVERNANCE", out.retain_until)
    assert out.retain_until > timezone.now() + timedelta(days=LOCK_DAYS - 1)


def test_a_locked_object_survives_the_portals_own_versioned_delete(server, passphrase_file, locked):
    _, run = good_backup()
    main = s3_copies(run).get(artifact="main")
    with pytest.raises(ObjectLocked) as refused:
        store_for(main.location).delete(main.key, main.version_id)
    assert f"version {main.version_id} is locked (GOVERNANCE) until " in str(refused.value)
    assert str(refused.value).endswith("it can be deleted after then, not before")

    # A DBA deletes the backup: the primary and NAS copies go; the locked ones stay catalogued, and say why.
    result = delete_run_artifacts(run, "alice")
    assert result["failed"] == ["s3:globals", "s3:main", "s3:signed_manifest"]
    assert sorted(result["deleted"]) == [
        "nas:globals",
        "nas:main",
        "nas:signed_manifest",
        "primary:globals",
        "primary:main",
        "primary:signed_manifest",
    ]
    for copy in s3_copies(run):
        assert copy.status == BackupCopy.Status.OK
        assert copy.next_attempt_at == copy.retain_until
        assert f"locked by S3 Object Lock until {copy.retain_until:%Y-%m-%d %H:%M} UTC" in copy.last_error
    waits = JournalEntry.objects.filter(action="copy_delete_waits")
    assert waits.count() == 3 and {e.outcome for e in waits} == {"failed"}
    assert retry_deletions(timezone.now()) == 0  # nothing is asked of S3 before the lock expires

    # The catalog lost the lock (a copy from before the version was recorded): S3 refuses the
    # delete, and the portal says so instead of marking the copy deleted.
    BackupCopy.objects.filter(pk=main.pk).update(retain_until=None, next_attempt_at=None)
    main.refresh_from_db()
    assert delete_copy(main, "alice") is False
    main.refresh_from_db()
    assert main.status == BackupCopy.Status.OK and main.retain_until is not None
    assert "is locked (GOVERNANCE) until" in main.last_error
    body = locked.s3.get_object(Bucket=locked.bucket, Key=PREFIX + main.key, VersionId=main.version_id)["Body"]
    assert hashlib.sha256(body.read()).hexdigest() == main.sha256


def test_a_key_only_delete_leaves_the_copy_verifiable_and_restorable(server, sample_cluster, passphrase_file, locked):
    _, run = good_backup()
    code, result, _ = verify_json(str(run.pk))
    assert code == 0 and result["locked"] == 3 and result["lock_problems"] == 0
    for listed in result["copies"]:
        if listed["location"] != "s3":
            assert listed["lock"] is None
            continue
        copy = s3_copies(run).get(artifact=listed["artifact"])
        assert listed["lock"] == {"mode": "GOVERNANCE", "retain_until": copy.retain_until.isoformat(), "problem": ""}
    out = StringIO()
    call_command("verify", str(run.pk), stdout=out)
    assert f"object lock: GOVERNANCE until {s3_copies(run).get(artifact='main').retain_until.isoformat()}" in (
        out.getvalue()
    )

    # The local disaster, and someone with the bucket's keys deleting by key: S3 puts a delete marker.
    for copy in run.copies.exclude(location__kind=StorageLocation.Kind.S3).select_related("location"):
        (Path(copy.location.path) / copy.key).unlink()
    for copy in s3_copies(run):
        marker = locked.s3.delete_object(Bucket=locked.bucket, Key=PREFIX + copy.key)
        assert marker["DeleteMarker"] is True
        with pytest.raises(ClientError, match="NoSuchKey|Not Found|404"):
            locked.s3.get_object(Bucket=locked.bucket, Key=PREFIX + copy.key)

    code, result, _ = verify_json(str(run.pk))
    verdicts = {(c["location"], c["artifact"]): c["status"] for c in result["copies"]}
    assert verdicts == {
        ("primary", "main"): "bad",
        ("primary", "globals"): "bad",
        ("nas", "main"): "bad",
        ("nas", "globals"): "bad",
        ("s3", "main"): "ok",
        ("s3", "globals"): "ok",
        ("primary", "signed_manifest"): "bad",
        ("nas", "signed_manifest"): "bad",
        ("s3", "signed_manifest"): "ok",
    }
    result = restore_json(str(run.pk), "--into-database", "restored_after_marker")
    assert result["status"] == "succeeded", result
    assert f"read from s3 (s3://{locked.bucket}/" in result["notes"]
    with sample_cluster.connect("restored_after_marker") as conn:
        assert sampledata.counts(conn) == run.details["row_counts"]


@pytest.mark.usefixtures("signing_dir")
def test_a_catalog_rebuilt_from_a_locked_bucket_sees_past_delete_markers_and_keeps_versions_and_locks(
    server, passphrase_file, locked, wal_spool, settings, tmp_path, request
):
    """The host burns, and whoever burnt it deleted every object of the bucket by key (S3 put a
    delete marker in front of each). The fresh portal's location does not even say it locks yet."""
    settings.S3_BUCKET = locked.bucket  # the fresh portal's environment names the locked bucket
    run, names, made, wal_made = backup_and_wal_on_s3(server)
    # An object nobody locked, deleted by key too (as the portal prunes): it stays deleted.
    locked.s3.put_object(Bucket=locked.bucket, Key=f"{PREFIX}maldives/logical/gone{manifests.SUFFIX}", Body=b"x")
    public = keep_public_key(tmp_path)
    for key in {v["Key"] for v in every_version(locked)}:
        assert locked.s3.delete_object(Bucket=locked.bucket, Key=key)["DeleteMarker"] is True
    assert "Contents" not in locked.s3.list_objects_v2(Bucket=locked.bucket)

    request.getfixturevalue("burn_the_host")()
    location = StorageLocation.objects.get(name="s3")
    assert not location.locked
    listed = store_for(location).surviving()
    assert store_for(location).surviving(page_size=1) == listed and len(listed) > 5  # page by page, the same
    rebuilt = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert rebuilt["_exit"] == 0 and rebuilt["refused"] == [] and rebuilt["skipped"] == [], rebuilt
    assert rebuilt["tampered"] == [] and rebuilt["_stderr"] == ""  # a marker hides; it writes nothing over
    assert rebuilt["wal_created"] == 2
    [new_run] = BackupRun.objects.all()
    assert {c.artifact: (c.version_id, c.retain_until) for c in s3_copies(new_run)} == made
    assert all(version and until for version, until in made.values())
    wal = BackupCopy.objects.filter(wal_segment__isnull=False).select_related("location", "wal_segment")
    assert {c.key: c.version_id for c in wal} == wal_made and all(c.retain_until for c in wal)
    assert verify_json(str(new_run.pk))[0] == 0  # read by version, past the markers
    restored = restore_json(str(new_run.pk), "--into-database", "rebuilt_past_markers")
    assert restored["status"] == "succeeded", restored
    # The WAL's key file too is read past its marker (by key: it has no catalogued version).
    forget_keys()
    assert all(fetch(copy, tmp_path) == copy.wal_segment.sha256 for copy in wal)


def test_verify_fails_a_lock_lifted_behind_the_portals_back(server, passphrase_file, locked):
    _, run = good_backup()
    main = s3_copies(run).get(artifact="main")
    sooner = timezone.now() + timedelta(days=1)
    # Someone with s3:BypassGovernanceRetention shortens the lock: the object is still there, and intact.
    locked.s3.put_object_retention(
        Bucket=locked.bucket,
        Key=PREFIX + main.key,
        VersionId=main.version_id,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": sooner},
        BypassGovernanceRetention=True,
    )
    code, result, err = verify_json()
    assert code == 1 and result["bad"] == 0 and result["lock_problems"] == 1
    assert "1 lock(s) shorter than catalogued" in err
    [listed] = [c for c in result["copies"] if c["lock"] and c["lock"]["problem"]]
    assert listed["key"] == main.key and listed["status"] == "ok"
    assert listed["lock"]["problem"].startswith("S3 holds it until ")
    assert listed["lock"]["problem"].endswith(f"the catalog says until {main.retain_until.isoformat()}")


def test_retention_waits_for_the_lock_and_deletes_after_it_expires(server, passphrase_file, locked):
    server.logical_retention_days, server.retention_floor = 1, 1
    server.save(update_fields=["logical_retention_days", "retention_floor"])
    _, old = good_backup()
    _, newest = good_backup()
    until = timezone.localtime(s3_copies(old).get(artifact="main").retain_until).date()
    start = timezone.now()

    # Two days on: the old backup is past its day, but its S3 copies are locked for three more.
    with time_machine.travel(start + timedelta(days=2)):
        assert {r.pk: rule for r, rule in retention.plan(server).items()}[old.pk] == f"locked until {until.isoformat()}"
        out = StringIO()
        call_command("retention", "--dry-run", stdout=out)
        assert f"#{old.pk} maldives logical reliabilitymaldives finished" in out.getvalue()
        assert f"kept: locked until {until.isoformat()}" in out.getvalue()
        assert retention.apply() == []
    old.refresh_from_db()
    assert old.deleted_at is None and not old.copies.exclude(status="ok").exists()
    assert not JournalEntry.objects.filter(action__in=["copy_delete_waits", "copy_delete_failed"]).exists()

    # Past the lock (for S3 too: moto's clock moved with ours): deleted on every tier, by version.
    with time_machine.travel(start + timedelta(days=LOCK_DAYS + 1)):
        assert [d["id"] for d in retention.apply()] == [old.pk]
        assert {r.pk: rule for r, rule in retention.plan(server).items()}[
            newest.pk
        ] == "floor"  # the newest good backup stays, lock or not
    old.refresh_from_db()
    assert old.deleted_at is not None
    assert set(old.copies.values_list("status", flat=True)) == {"deleted"}
    gone = {c.version_id for c in s3_copies(old)}
    assert gone.isdisjoint(v["VersionId"] for v in every_version(locked))
    assert {c.status for c in newest.copies.all()} == {"ok"}


def test_wal_segments_and_their_key_file_uploaded_to_a_locked_location_are_locked(
    server, passphrase_file, locked, wal_spool, tmp_path
):
    forget_keys()
    names = spool_segments(server, 2)
    assert walingest.ingest(server).ingested == names
    copies = BackupCopy.objects.filter(wal_segment__server=server, location__kind="s3").select_related("location")
    assert copies.count() == 2
    for copy in copies:
        assert copy.status == "ok" and copy.version_id and copy.retain_until
        assert head(locked, copy)["ObjectLockMode"] == "GOVERNANCE"
    key_files = [v for v in every_version(locked) if "/wal/keys/" in v["Key"]]
    assert len(key_files) == 1
    lock = locked.s3.head_object(Bucket=locked.bucket, Key=key_files[0]["Key"], VersionId=key_files[0]["VersionId"])
    assert lock["ObjectLockMode"] == "GOVERNANCE"

    # Someone hides the key file behind a delete marker, on a new machine: the WAL still decrypts.
    locked.s3.delete_object(Bucket=locked.bucket, Key=key_files[0]["Key"])
    key_id = copies[0].key_id
    (walkeys.keyring() / f"{key_id}.key.gpg").unlink()
    forget_keys()
    s3 = copies.select_related("wal_segment").get(wal_segment__name=names[0])
    assert fetch(s3, tmp_path) == s3.wal_segment.sha256

    # WAL retention waits for the lock too, then deletes the segments by version.
    server.wal_retention_days = 1
    server.save(update_fields=["wal_retention_days"])
    start = timezone.now()
    assert retention.wal_retention(server, start + timedelta(days=2), False, "job:retention")["deleted"] == 0
    assert set(copies.values_list("status", flat=True)) == {"ok"}
    with time_machine.travel(start + timedelta(days=LOCK_DAYS + 1)):
        assert retention.wal_retention(server, timezone.now(), False, "job:retention")["deleted"] == 2
    assert set(copies.values_list("status", flat=True)) == {"deleted"}
    assert {c.version_id for c in copies}.isdisjoint(v["VersionId"] for v in every_version(locked))


def test_checkserver_checks_the_buckets_object_lock(server, passphrase_file, locked, wal_spool, s3_client):
    checks = {c["check"]: c for c in run_command("checkserver", "maldives")["checks"]}
    assert checks["object lock of s3"]["verdict"] == "ok"
    assert checks["object lock of s3"]["detail"] == f"governance lock of {LOCK_DAYS} days on s3://{locked.bucket}"
    s3_client.create_bucket(Bucket="no-lock-" + locked.bucket)
    StorageLocation.objects.filter(name="s3").update(bucket="no-lock-" + locked.bucket)
    result = run_command("checkserver", "maldives")
    check = next(c for c in result["checks"] if c["check"] == "object lock of s3")
    assert check["verdict"] == "fail" and "does not have Object Lock enabled" in check["detail"]
    assert result["_exit"] == 1 and not result["ready"]


def test_a_shorter_lock_waits_for_another_person(alice, bob, locked):
    location = StorageLocation.objects.get(name="s3")
    with pytest.raises(ValidationError, match="is not shorter: save it on the location itself"):
        LockChange.request(location, alice, "compliance", LOCK_DAYS, "stronger")
    # A stronger mode for fewer days protects what is written from now on for less time.
    assert location.shortens_lock("compliance", 1) and not location.shortens_lock("compliance", LOCK_DAYS + 1)
    change = LockChange.request(location, alice, "governance", 1, "the bucket costs too much")
    location.refresh_from_db()
    assert (location.lock_mode, location.lock_days) == ("governance", LOCK_DAYS)
    assert (
        str(change)
        == f"Change request #{change.pk}: Shorten a location's S3 Object Lock (lock of s3: governance {LOCK_DAYS}-day -> governance 1-day)"
    )
    with pytest.raises(PermissionDenied, match="your own change request"):
        change.approve(alice)
    change.approve(bob)
    location.refresh_from_db()
    assert (location.lock_mode, location.lock_days) == ("governance", 1)
    entry = JournalEntry.objects.filter(action="location_changed").latest("pk")
    assert entry.actor == "bob" and entry.details["change_request"] == change.pk


def test_the_admin_sends_a_shorter_lock_to_approval(client, sam, alice, locked):
    client.force_login(sam)
    url = reverse("admin:backups_storagelocation_change", args=[locked.locations["s3"].pk])
    response = client.post(url, admin_form_data(client, url, lock_mode="governance", lock_days="2"))
    assert response.status_code == 200
    assert "give the reason for it" in str(response.context["adminform"].form.errors["lock_change_reason"])
    data = admin_form_data(client, url, lock_days="2", capacity_bytes="1000000000", lock_change_reason="cost")
    assert client.post(url, data).status_code == 302
    location = StorageLocation.objects.get(name="s3")
    assert (location.lock_days, location.capacity_bytes) == (LOCK_DAYS, 1000000000)  # the rest is saved
    change = ChangeRequest.objects.pending().get(kind="shorten_lock")
    assert change.requested_by == sam and change.reason == "cost"
    # Compliance for one day, after governance for LOCK_DAYS, is shorter too.
    response = client.post(url, admin_form_data(client, url, lock_mode="compliance", lock_days="1"))
    assert response.status_code == 200 and "lock_change_reason" in response.context["adminform"].form.errors
    # A longer lock needs no one else.
    data = admin_form_data(client, url, lock_mode="compliance", lock_days="10")
    assert client.post(url, data).status_code == 302
    location.refresh_from_db()
    assert (location.lock_mode, location.lock_days) == ("compliance", 10)
    # A DBA sees the location read-only, its lock included.
    client.force_login(alice)
    page = client.get(url)
    assert page.status_code == 200 and "Compliance" in page.content.decode()
    assert client.post(url, data).status_code == 403
