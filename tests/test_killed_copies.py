"""What a copy killed mid-write leaves in a location: a NAS's `.partial` file, S3's unfinished
multipart upload. Found by a probe: both stayed for ever (S3 bills an upload's parts until it is
aborted). Real files, the real moto server and boto3; no cluster."""

import io
import json
import os
import subprocess
import time
from pathlib import Path

from django.core.management import call_command

from backupportal.models import JournalEntry
from backups.s3 import MIN_PART_SIZE
from backups.storage import store_for


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def partial(directory, name, pid, hours_old):
    """A temporary file as AtomicWriter names them (`.NAME.PID-RANDOM.partial`), last written `hours_old` ago."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{name}.{pid}-0123abcd.partial"
    path.write_bytes(b"half a dump")
    when = time.time() - hours_old * 3600
    os.utime(path, (when, when))
    return path


def retention():
    out = io.StringIO()
    call_command("retention", "--json", stdout=out)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_stale_partials_of_dead_writers_are_removed_from_a_nas_and_never_listed(tiers):
    nas = tiers.locations["nas"]
    place = Path(nas.path) / "maldives/logical"
    killed = partial(place, "20261201T0300-1.dump.gpg", dead_pid(), hours_old=2)
    live_writer = partial(place, "20261201T0400-2.dump.gpg", os.getpid(), hours_old=2)
    fresh = partial(place, "20261201T0500-3.dump.gpg", dead_pid(), hours_old=0)
    wal_partial = place / "000000010000000000000003.partial"  # PostgreSQL's name, not a writer's
    wal_partial.write_bytes(b"segment")
    os.utime(wal_partial, (time.time() - 7200,) * 2)
    assert list(store_for(nas).list()) == ["maldives/logical/000000010000000000000003.partial"]

    result = retention()

    assert not killed.exists() and live_writer.exists() and fresh.exists() and wal_partial.exists()
    assert result["leftovers"] == {nas.name: 1}
    entry = JournalEntry.objects.get(action="leftovers_removed")
    assert entry.object_repr == str(nas) and entry.details["count"] == 1


def test_the_next_write_of_a_key_removes_its_stale_partial(tiers):
    nas = tiers.locations["nas"]
    store = store_for(nas)
    killed = partial(store.path("maldives/a.dump").parent, "a.dump", dead_pid(), hours_old=2)
    with store.writer("maldives/a.dump") as out:
        out.write(b"the whole dump")
        out.commit()
    assert not killed.exists() and store.path("maldives/a.dump").read_bytes() == b"the whole dump"
    assert [p.name for p in killed.parent.iterdir()] == ["a.dump"]


def test_stale_multipart_uploads_under_the_locations_prefix_are_aborted(tiers, settings):
    s3, bucket = tiers.s3, tiers.bucket
    location = tiers.locations["s3"]
    settings.S3_MULTIPART_THRESHOLD = settings.S3_PART_SIZE = MIN_PART_SIZE

    def started(key):
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * MIN_PART_SIZE)
        return upload

    killed = started("backupportal/maldives/logical/killed.dump.gpg")
    busy = started("backupportal/maldives/logical/busy.dump.gpg")  # another worker's, sending parts
    others = started("other-portal/maldives/logical/theirs.dump.gpg")
    writing = store_for(location).writer("maldives/logical/writing.dump.gpg")  # this process's, in progress
    writing.write(b"y" * MIN_PART_SIZE)
    assert writing.multipart
    settings.S3_STALE_UPLOAD_AGE = 1
    time.sleep(1.5)
    s3.upload_part(
        Bucket=bucket, Key="backupportal/maldives/logical/busy.dump.gpg", UploadId=busy, PartNumber=2, Body=b"z"
    )

    try:
        result = retention()
        left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    finally:
        writing.abort()

    assert killed not in left and {busy, others, writing.upload_id} <= left
    assert result["leftovers"] == {location.name: 1}
    entry = JournalEntry.objects.get(action="leftovers_removed")
    assert entry.object_repr == str(location) and entry.details["count"] == 1
