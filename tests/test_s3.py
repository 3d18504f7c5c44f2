"""S3Store against a real S3-compatible server (moto over HTTP), talked to by real boto3."""

import hashlib
import os
import socket
import time

import pytest
from django.core.exceptions import ValidationError

from backups.models import StorageLocation
from backups.s3 import S3Store
from backups.storage import MissingArtifact, StorageError, store_for

MiB = 1024 * 1024


@pytest.fixture
def s3(tiers):
    return store_for(tiers.locations["s3"])


def test_a_small_artifact_goes_up_in_one_put_and_streams_back(s3, tiers):
    with s3.writer("maldives/logical/a.dump.gpg") as out:
        out.write(b"x" * 1000)
        out.write(b"y" * 24)
        size, sha256 = out.commit()
    assert (size, sha256) == (1024, hashlib.sha256(b"x" * 1000 + b"y" * 24).hexdigest())
    assert not out.multipart
    head = tiers.s3.head_object(Bucket=tiers.bucket, Key="backupportal/maldives/logical/a.dump.gpg")
    assert head["ContentLength"] == 1024
    assert s3.uri("maldives/logical/a.dump.gpg") == f"s3://{tiers.bucket}/backupportal/maldives/logical/a.dump.gpg"
    assert s3.exists("maldives/logical/a.dump.gpg")
    with s3.open("maldives/logical/a.dump.gpg") as body:
        assert body.read(1000) == b"x" * 1000 and body.read(100) == b"y" * 24 and body.read(100) == b""
    s3.delete("maldives/logical/a.dump.gpg")
    assert not s3.exists("maldives/logical/a.dump.gpg")
    with pytest.raises(MissingArtifact, match="is missing from location s3"):
        s3.open("maldives/logical/a.dump.gpg")


# Run in its own process: moto serves from this one, and would count in its memory.
UPLOADER = """
import hashlib, json, os, sys, tracemalloc
import django
django.setup()
from django.conf import settings
from backups.models import StorageLocation
from backups.s3 import S3Store
settings.S3_MULTIPART_THRESHOLD, settings.S3_PART_SIZE = 1 << 20, 5 << 20
location = StorageLocation(name="s3", kind="s3", bucket=sys.argv[1], prefix="backupportal", endpoint_url=sys.argv[2])
expected = hashlib.sha256()
tracemalloc.start()
with S3Store(location).writer("big.bin") as out:
    for _ in range(int(sys.argv[3])):  # made as it goes: never the whole file in memory
        chunk = os.urandom(1 << 20)
        expected.update(chunk)
        out.write(chunk)
    size, sha256 = out.commit()
print(json.dumps({"size": size, "sha256": sha256, "expected": expected.hexdigest(), "parts": len(out.parts),
                  "peak": tracemalloc.get_traced_memory()[1]}))
"""


def upload_in_child(tiers, mib):
    import json
    import subprocess
    import sys

    # The child's settings come from the environment: moto's endpoint is its S3_ENDPOINT_URL.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": os.getcwd()}
    env["S3_ENDPOINT_URL"] = tiers.server.endpoint
    child = subprocess.run(
        [sys.executable, "-c", UPLOADER, tiers.bucket, tiers.server.endpoint, str(mib)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_a_large_artifact_goes_up_by_multipart_holding_one_part_in_memory(s3, tiers):
    small, large = upload_in_child(tiers, 10), upload_in_child(tiers, 40)
    assert large["parts"] == 8 and large["size"] == 40 * MiB and large["sha256"] == large["expected"]
    # Measured: about 23 MiB at the peak (the part, and botocore's copy of it while it signs and
    # sends), the same for 10 MiB as for 40 MiB: memory does not grow with the file.
    assert large["peak"] < 30 * MiB, f"peak {large['peak'] / MiB:.1f} MiB"
    assert abs(large["peak"] - small["peak"]) < 2 * MiB, (small["peak"], large["peak"])
    head = tiers.s3.head_object(Bucket=tiers.bucket, Key="backupportal/big.bin")
    assert head["ContentLength"] == 40 * MiB and head["ETag"].endswith('-8"')
    downloaded = hashlib.sha256()
    with s3.open("big.bin") as body:
        while chunk := body.read(MiB):
            downloaded.update(chunk)
    assert downloaded.hexdigest() == large["sha256"]


def test_a_failure_mid_upload_aborts_it_and_leaves_nothing_visible(s3, tiers, settings):
    settings.S3_MULTIPART_THRESHOLD = MiB
    settings.S3_PART_SIZE = 5 * MiB
    with pytest.raises(RuntimeError), s3.writer("half.bin") as out:
        for _ in range(6):
            out.write(os.urandom(MiB))
        assert out.multipart and len(out.parts) == 1
        raise RuntimeError("pg_dump died")
    assert "Contents" not in tiers.s3.list_objects_v2(Bucket=tiers.bucket)
    assert "Uploads" not in tiers.s3.list_multipart_uploads(Bucket=tiers.bucket)


def test_server_side_encryption_and_storage_class_come_from_the_location(tiers):
    location = tiers.locations["s3"]
    location.sse, location.storage_class = "AES256", "STANDARD_IA"
    location.full_clean()
    with store_for(location).writer("sse.bin") as out:
        out.write(b"secret bytes, encrypted by gpg already")
        out.commit()
    head = tiers.s3.head_object(Bucket=tiers.bucket, Key="backupportal/sse.bin")
    assert head["ServerSideEncryption"] == "AES256" and head["StorageClass"] == "STANDARD_IA"


def test_s3_options_that_would_break_verify_or_restore_are_refused(tiers):
    location = tiers.locations["s3"]
    location.storage_class = "DEEP_ARCHIVE"
    with pytest.raises(ValidationError, match="cannot be read without a restore request"):
        location.full_clean()
    location.storage_class, location.sse = "", "rot13"
    with pytest.raises(ValidationError, match="Unknown server-side encryption 'rot13'"):
        location.full_clean()


def test_a_bucket_that_does_not_exist_is_refused_with_one_line(tiers):
    location = StorageLocation(name="typo", kind="s3", bucket="no-such-bucket", endpoint_url=tiers.server.endpoint)
    with pytest.raises(StorageError) as e:
        S3Store(location).check()
    assert str(e.value) == (
        f"S3 bucket 'no-such-bucket' does not exist at {tiers.server.endpoint}: create it, "
        "or correct the bucket of storage location typo"
    )
    with pytest.raises(StorageError, match="'no-such-bucket' does not exist"), S3Store(location).writer("k") as out:
        out.write(b"data")
        out.commit()


def test_a_dead_endpoint_fails_in_seconds_not_minutes(tiers, settings):
    # A host that accepts the connection and then never answers: the worst case for a worker.
    settings.S3_CONNECT_TIMEOUT, settings.S3_READ_TIMEOUT, settings.S3_MAX_ATTEMPTS = 2, 2, 2
    settings.STORAGE_ALLOWED_HOSTS = ["127.0.0.1"]  # the silent host is another port there
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    location = tiers.locations["s3"]
    location.endpoint_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            S3Store(location).check()
    finally:
        silent.close()
    assert time.monotonic() - started < 10


def test_a_second_s3_location_sharing_anothers_keys_is_refused(tiers):
    """Found by a probe: a second location on the same bucket and prefix was accepted; its copy
    found the first's object "already there", removed it as a leftover and failed its own write,
    and the first's copy stayed catalogued good over nothing. Refused as a NAS at another's path is."""
    first = tiers.locations["s3"]

    def second(prefix):
        return StorageLocation(
            name="offsite-dr", kind="s3", bucket=first.bucket, prefix=prefix, endpoint_url=first.endpoint_url
        )

    nested = first.prefix.strip("/") + "/dr/"
    for prefix in (first.prefix, "/" + first.prefix, nested, ""):
        with pytest.raises(ValidationError) as refused:
            second(prefix).full_clean()
        assert f"overlaps location {first.name} (s3://{first.bucket}/" in str(refused.value), prefix
    second(first.prefix.strip("/") + "-dr/").full_clean()  # beside it: apart
