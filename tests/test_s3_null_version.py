"""A copy put in an S3 bucket before its versioning was turned on, deleted after: found by a probe,
its "null" version stayed for ever behind the delete marker the deletion by key put in front of it
(the catalog had no version for it). Real moto server, real boto3; catalog rows, no cluster."""

import uuid
from datetime import timedelta

from django.utils import timezone

from backups.copies import delete_copy
from backups.models import BackupCopy, BackupRun, Server
from backups.storage import store_for

PREFIX = "backupportal/"


def copy_on_s3(location, key, body=b"an encrypted dump"):
    """A copy the portal made (its own writer), catalogued as it was made."""
    with store_for(location).writer(key) as out:
        out.write(body)
        size, sha256 = out.commit()
    server = Server.objects.get_or_create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres")[0]
    when = timezone.now() - timedelta(days=40)
    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded", started_at=when, finished_at=when)
    return BackupCopy.objects.create(
        run=run, location=location, key=key, size=size, sha256=sha256, status="ok", version_id=out.version_id
    )


def versions_of(tiers, key):
    listed = tiers.s3.list_object_versions(Bucket=tiers.bucket, Prefix=PREFIX + key)
    return [
        (v["VersionId"], "marker" if "Size" not in v else "object")
        for v in listed.get("Versions", []) + listed.get("DeleteMarkers", [])
        if v["Key"] == PREFIX + key
    ]


def versioning_on(tiers):
    tiers.s3.put_bucket_versioning(Bucket=tiers.bucket, VersioningConfiguration={"Status": "Enabled"})


def test_a_copy_from_before_versioning_leaves_no_null_version_and_its_neighbours_stay(tiers):
    location = tiers.locations["s3"]
    copy = copy_on_s3(location, "maldives/logical/old.dump.gpg")
    neighbour = copy_on_s3(location, "maldives/logical/old.dump.gpg.2")  # its name starts with the other's
    assert copy.version_id == ""  # an unversioned bucket makes no version
    versioning_on(tiers)
    # Someone (or an earlier attempt) put a newer version over it since.
    tiers.s3.put_object(Bucket=tiers.bucket, Key=PREFIX + copy.key, Body=b"newer")
    assert {v for v, _ in versions_of(tiers, copy.key)} >= {"null"}

    assert delete_copy(copy, "job:retention") is True

    copy.refresh_from_db()
    assert copy.status == BackupCopy.Status.DELETED
    assert versions_of(tiers, copy.key) == []  # no version, no delete marker: the key is gone
    assert versions_of(tiers, neighbour.key) == [("null", "object")]
    body = tiers.s3.get_object(Bucket=tiers.bucket, Key=PREFIX + neighbour.key)["Body"].read()
    assert body == b"an encrypted dump"


def test_a_version_s3_still_locks_is_never_forced_while_the_others_go(tiers):
    """Every version of the key is deleted but one that S3 Object Lock holds (put over the
    portal's copy by someone, on a bucket created with Object Lock): that one stays, and the
    deletion waits for its lock instead of bypassing it."""
    bucket = f"locked-{uuid.uuid4().hex[:12]}"
    tiers.s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    location = tiers.locations["s3"]
    location.bucket = tiers.bucket = bucket
    location.save()
    copy = copy_on_s3(location, "maldives/logical/kept.dump.gpg")
    until = timezone.now() + timedelta(days=3)
    locked = tiers.s3.put_object(
        Bucket=bucket,
        Key=PREFIX + copy.key,
        Body=b"locked",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
    )["VersionId"]
    assert len(versions_of(tiers, copy.key)) == 2

    assert delete_copy(copy, "job:retention") is False

    copy.refresh_from_db()
    assert copy.status == BackupCopy.Status.OK and copy.retain_until is not None
    assert "locked (GOVERNANCE)" in copy.last_error
    assert versions_of(tiers, copy.key) == [(locked, "object")]  # the portal's own version went
