"""Object Lock keeps a version from being deleted, not from being covered: anyone with the
portal's S3 keys may put a new, unlocked version over each object (and a delete marker on top).
The portal still reads the locked originals: a catalogued copy by its version id, a rebuilt
catalog by checking every version, a WAL key file by preferring the locked version.

Against moto's S3 server over HTTP with real boto3, as tests/test_object_lock.py.
"""

from pathlib import Path

import pytest

from backupportal.models import JournalEntry
from backups.models import BackupCopy, BackupRun, StorageLocation
from backups.storage import store_for
from tests.helpers import good_backup, restore_json, run_command, verify_json
from tests.test_object_lock import PREFIX, backup_and_wal_on_s3, every_version, locked, s3_copies  # noqa: F401 (fixtures)
from tests.test_rebuild_catalog import burn_the_host, keep_public_key, signing_dir  # noqa: F401 (fixtures)
from tests.test_wal_keys import fetch, forget_keys

pytest_plugins = ["tests.walfixtures"]

RANSOM = b"ransomed: pay to get your backups back"


@pytest.fixture
def bucket(request):
    """tests/test_object_lock.py's tiers whose S3 location locks its objects (governance)."""
    return request.getfixturevalue("locked")


def put_over_everything(tiers, then_delete=False):
    """A new version without a lock over every object of the bucket, as s3:PutObject allows; then,
    when asked, a delete marker in front of it. Returns the keys (without the prefix)."""
    keys = sorted({v["Key"] for v in every_version(tiers)})
    for key in keys:
        tiers.s3.put_object(Bucket=tiers.bucket, Key=key, Body=RANSOM)
        if then_delete:
            assert tiers.s3.delete_object(Bucket=tiers.bucket, Key=key)["DeleteMarker"] is True
    return [key.removeprefix(PREFIX) for key in keys]


def without_local_copies(run):
    for copy in run.copies.exclude(location__kind=StorageLocation.Kind.S3).select_related("location"):
        (Path(copy.location.path) / copy.key).unlink()


def test_a_copy_whose_object_was_written_over_is_still_restored_from_its_version(
    server, sample_cluster, passphrase_file, bucket
):
    _, run = good_backup()
    put_over_everything(bucket)
    without_local_copies(run)
    body = bucket.s3.get_object(Bucket=bucket.bucket, Key=PREFIX + s3_copies(run).get(artifact="main").key)["Body"]
    assert body.read() == RANSOM  # what a read by key gets now
    code, result, _ = verify_json(str(run.pk))
    assert {c["status"] for c in result["copies"] if c["location"] == "s3"} == {"ok"}, result
    restored = restore_json(str(run.pk), "--into-database", "restored_past_overwrite")
    assert restored["status"] == "succeeded", restored
    assert f"read from s3 (s3://{bucket.bucket}/" in restored["notes"]


@pytest.mark.usefixtures("signing_dir")
@pytest.mark.parametrize("then_delete", [False, True], ids=["overwritten", "overwritten-then-deleted"])
def test_a_catalog_rebuilt_after_objects_were_written_over_reads_the_locked_originals(
    server, passphrase_file, bucket, wal_spool, settings, tmp_path, request, then_delete
):
    settings.S3_BUCKET = bucket.bucket  # the fresh portal's environment names the locked bucket
    run, names, made, wal_made = backup_and_wal_on_s3(server)
    public = keep_public_key(tmp_path)
    keys = put_over_everything(bucket, then_delete)
    assert any("/wal/keys/" in key for key in keys)  # the WAL key file is written over too

    request.getfixturevalue("burn_the_host")()
    rebuilt = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert rebuilt["_exit"] == 0 and rebuilt["refused"] == [] and rebuilt["skipped"] == [], rebuilt
    assert rebuilt["wal_created"] == 2 and rebuilt["locked_manifests"] == 0
    [new_run] = BackupRun.objects.all()
    assert {c.artifact: (c.version_id, c.retain_until) for c in s3_copies(new_run)} == made
    wal = BackupCopy.objects.filter(wal_segment__isnull=False).select_related("location", "wal_segment")
    assert {c.key: c.version_id for c in wal} == wal_made

    # Every version put over what was read is named (the key file is not read by a rebuild).
    read = {k for k in keys if "/wal/keys/" not in k}
    assert sorted(t["key"] for t in rebuilt["tampered"]) == sorted(read), rebuilt["tampered"]
    ransom = {v["VersionId"] for v in every_version(bucket) if v["Size"] == len(RANSOM)}
    assert {t["version"] for t in rebuilt["tampered"]} <= ransom
    assert "passed over as tampered" in rebuilt["_stderr"] and "replace those keys" in rebuilt["_stderr"]
    entry = JournalEntry.objects.get(action="catalog_rebuilt")
    assert entry.details["tampered"] == len(read) and entry.outcome == "ok"

    assert verify_json(str(new_run.pk))[0] == 0
    restored = restore_json(str(new_run.pk), "--into-database", "rebuilt_past_overwrite")
    assert restored["status"] == "succeeded", restored
    # The WAL key file is read by key (no catalogued version): its locked version, not the newer one.
    forget_keys()
    assert all(fetch(copy, tmp_path) == copy.wal_segment.sha256 for copy in wal)


@pytest.mark.usefixtures("signing_dir")
def test_a_rebuild_that_catalogues_nothing_while_manifests_are_locked_fails(
    server, passphrase_file, bucket, settings, tmp_path, request
):
    """Someone who may also bypass governance removed the dump's locked version and put another:
    the manifest verifies, its run cannot be catalogued, and the command must not exit 0."""
    settings.S3_BUCKET = bucket.bucket
    _, run = good_backup()
    main = s3_copies(run).get(artifact="main")
    public = keep_public_key(tmp_path)
    bucket.s3.delete_object(
        Bucket=bucket.bucket, Key=PREFIX + main.key, VersionId=main.version_id, BypassGovernanceRetention=True
    )
    bucket.s3.put_object(Bucket=bucket.bucket, Key=PREFIX + main.key, Body=RANSOM)

    request.getfixturevalue("burn_the_host")()
    rebuilt = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert rebuilt["_exit"] == 1 and rebuilt["runs_created"] == [] and rebuilt["locked_manifests"] == 1, rebuilt
    assert "nothing catalogued, although S3 Object Lock holds a version of 1 manifest(s)" in rebuilt["_stderr"]
    [skipped] = rebuilt["skipped"]
    assert f"its manifest says {main.size}" in skipped["why"]
    assert JournalEntry.objects.get(action="catalog_rebuilt").outcome == "failed"


def test_a_read_by_key_prefers_the_locked_version_and_otherwise_the_newest(bucket):
    store = store_for(StorageLocation.objects.get(name="s3"))
    with store.writer("anchor.json") as out:
        out.write(b"original")
        out.commit()
    bucket.s3.put_object(Bucket=bucket.bucket, Key=PREFIX + "anchor.json", Body=RANSOM)
    with store.open("anchor.json") as f:
        assert f.read() == b"original"
    assert store.surviving_version("anchor.json") == out.version_id
    # Without a lock on any version (a versioned bucket that does not lock), the newest is read.
    bucket.s3.put_object(Bucket=bucket.bucket, Key=PREFIX + "plain.json", Body=b"first")
    bucket.s3.put_object(Bucket=bucket.bucket, Key=PREFIX + "plain.json", Body=b"second")
    with store.open("plain.json") as f:
        assert f.read() == b"second"
