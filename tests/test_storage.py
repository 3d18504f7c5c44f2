"""Storage tiers end to end: primary, NAS and S3 (moto over HTTP), copies, verify, fallback, retention."""

import hashlib
import shutil
import subprocess
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from backupportal.lib import sampledata
from backupportal.models import JournalEntry
from backups.copies import delete_run_artifacts, mark_faults, open_first_healthy, retry_due_copies
from backups.models import BackupCopy, BackupRun, StorageLocation
from backups.streams import CopyCorrupt
from tests.helpers import flip_byte, good_backup, verify_json
from watching import monitor
from watching.models import Alert

# A logical run's files on every tier: its globals, its dump, its signed manifest (backups.manifests).
ARTIFACTS = ["globals", "main", "signed_manifest"]


def gpg(*args, passphrase_file, stdin=None, tmp_path):
    """The plain gpg CLI, as a DBA would run it."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    base = ["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", "--homedir", str(home)]
    return subprocess.run(
        [*base, "--passphrase-file", str(passphrase_file), *args], input=stdin, capture_output=True, check=True
    )


def pg_restore(cluster, server, dbname, dump):
    cluster.create_database(dbname)
    subprocess.run(
        [str(server.bin_dir() / "pg_restore"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
        + ["-d", dbname, str(dump)],
        check=True,
        capture_output=True,
    )
    with cluster.connect(dbname) as conn:
        return sampledata.counts(conn)


def s3_key(run, artifact="main"):
    return "backupportal/" + run.copies.get(artifact=artifact, location__kind="primary").key


def test_a_backup_reaches_all_three_tiers_with_matching_sha256(
    server, sample_cluster, passphrase_file, tiers, tmp_path, settings
):
    settings.S3_MULTIPART_THRESHOLD = 4096  # so that even this small dump goes up by multipart upload
    result, run = good_backup()
    copies = {c["location"]: c for c in result["copies"]}
    assert set(copies) == {"primary", "nas", "s3"}
    assert {c["status"] for c in copies.values()} == {"ok"}
    assert {c["sha256"] for c in copies.values()} == {result["sha256"]}
    assert copies["s3"]["uri"] == f"s3://{tiers.bucket}/{s3_key(run)}"
    assert copies["nas"]["uri"] == f"file://{tiers.nas / run.key}"
    # The globals went everywhere too.
    assert run.copies.filter(artifact="globals", status="ok").count() == 3

    # Each tier holds the very bytes: hash what is really there.
    primary_bytes = (tiers.primary / run.key).read_bytes()
    assert hashlib.sha256(primary_bytes).hexdigest() == run.sha256
    assert (tiers.nas / run.key).read_bytes() == primary_bytes
    assert (tiers.nas / run.key).stat().st_mode & 0o777 == 0o600
    head = tiers.s3.head_object(Bucket=tiers.bucket, Key=s3_key(run))
    assert head["ETag"].endswith('-1"'), "uploaded as a multipart upload"

    # A plain boto3 download decrypts with the gpg CLI and restores with pg_restore.
    downloaded = tmp_path / "downloaded.dump.gpg"
    tiers.s3.download_file(tiers.bucket, s3_key(run), str(downloaded))
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == run.sha256
    dump = tmp_path / "downloaded.dump"
    gpg("--decrypt", "--output", str(dump), str(downloaded), passphrase_file=passphrase_file, tmp_path=tmp_path)
    counts = pg_restore(sample_cluster, server, "from_s3", dump)
    assert counts == run.details["row_counts"]

    # And so does `aws s3 cp`, where the AWS CLI is installed.
    if shutil.which("aws"):
        cli = tmp_path / "cli.dump.gpg"
        subprocess.run(
            [
                "aws",
                "--endpoint-url",
                tiers.server.endpoint,
                "s3",
                "cp",
                f"s3://{tiers.bucket}/{s3_key(run)}",
                str(cli),
            ],
            check=True,
            capture_output=True,
        )
        assert cli.read_bytes() == primary_bytes

    made = JournalEntry.objects.filter(
        action="copy_made", object_id__in=[str(pk) for pk in run.copies.values_list("pk", flat=True)]
    )
    assert made.count() == 6  # main, globals and the signed manifest, to the NAS and to S3


def test_s3_down_during_a_backup_the_copy_is_retried_and_completes_when_it_is_back(server, passphrase_file, tiers):
    tiers.server.stop()
    result, run = good_backup()  # the primary backup does not care
    status = {c["location"]: c["status"] for c in result["copies"]}
    assert status == {"primary": "ok", "nas": "ok", "s3": "failed"}
    copy = run.copies.get(location__kind="s3", artifact="main")
    assert copy.attempts == 1 and "cannot reach the S3 endpoint" in copy.last_error
    assert timedelta(seconds=50) < copy.next_attempt_at - timezone.now() <= timedelta(minutes=1)
    alert = Alert.objects.get(condition="upload_failed", subject="location:s3", state="open")
    assert "to s3 failed on attempt 1" in alert.message

    # Not due yet: nothing is tried.
    assert retry_due_copies()["copied"] == 0
    assert run.copies.get(pk=copy.pk).attempts == 1
    # Due, still down: a second attempt, and the wait doubles.
    later = timezone.now() + timedelta(minutes=2)
    retry_due_copies(now=later)
    copy.refresh_from_db()
    assert copy.attempts == 2 and copy.status == "failed"
    assert timedelta(seconds=110) < copy.next_attempt_at - timezone.now() <= timedelta(minutes=2)

    tiers.server.start()
    summary = retry_due_copies(now=later + timedelta(minutes=5))
    assert summary["copied"] == 3  # the dump, its globals and its signed manifest
    copy.refresh_from_db()
    assert copy.status == "ok" and copy.attempts == 3 and copy.sha256 == run.sha256
    body = tiers.s3.get_object(Bucket=tiers.bucket, Key=s3_key(run))["Body"].read()
    assert hashlib.sha256(body).hexdigest() == run.sha256
    alert.refresh_from_db()
    assert alert.state == "resolved"
    assert JournalEntry.objects.filter(action="copy_failed", object_id=str(copy.pk)).count() == 2


def test_a_backup_on_a_worker_queues_its_copies(server, passphrase_file, tiers, alice):
    from backups.tasks import enqueue_backup

    outcome = enqueue_backup(server, "logical", actor="alice")  # tasks run inline in the tests
    run = BackupRun.objects.get(pk=outcome.run.pk)
    assert run.status == "succeeded"
    # The dump, its globals and its signed manifest (backups.manifests) on every tier.
    assert sorted(run.copies.filter(status="ok").values_list("location__name", flat=True)) == [
        *["nas"] * 3,
        *["primary"] * 3,
        *["s3"] * 3,
    ]


def test_the_storage_schedules_exist(db):
    from django_q.models import Schedule

    retry = Schedule.objects.get(name="copies-retry")
    assert (retry.func, retry.schedule_type, retry.cron) == ("backups.tasks.retry_copies", "C", "* * * * *")
    weekly = Schedule.objects.get(name="verify-weekly")
    assert (weekly.func, weekly.schedule_type, weekly.cron) == ("backups.tasks.verify_copies", "C", "0 4 * * 0")


def test_verify_finds_a_flipped_byte_on_the_nas_and_in_s3(server, passphrase_file, tiers):
    result, run = good_backup()
    code, clean, _ = verify_json()
    assert code == 0 and clean["checked"] == clean["ok"] == 9  # dump, globals, signed manifest on 3 tiers

    nas_file = tiers.nas / run.key
    nas_file.write_bytes(flip_byte(nas_file.read_bytes()))
    body = tiers.s3.get_object(Bucket=tiers.bucket, Key=s3_key(run))["Body"].read()
    tiers.s3.put_object(Bucket=tiers.bucket, Key=s3_key(run), Body=flip_byte(body, at=10))

    code, found, err = verify_json()
    assert code == 1 and "2 bad" in err
    assert (found["checked"], found["ok"], found["bad"]) == (9, 7, 2)
    assert sorted((c["location"], c["artifact"], c["status"]) for c in found["copies"]) == [
        ("nas", "main", "bad"),
        ("s3", "main", "bad"),
    ]
    assert dict(run.copies.filter(artifact="main").values_list("location__name", "status")) == {
        "primary": "ok",
        "nas": "bad",
        "s3": "bad",
    }
    alert = Alert.objects.get(condition="corruption", subject="server:maldives", state="open")
    assert "Bad copy" in alert.message
    assert JournalEntry.objects.filter(action="copy_bad").count() == 2
    assert JournalEntry.objects.get(action="verify_all", outcome="failed").details["bad"] == 2

    # One run's verify lists every copy of it.
    code, one, _ = verify_json(str(run.pk))
    assert code == 1 and len(one["copies"]) == 9 and one["run"] == run.pk

    # Put right (the good bytes back), the copies verify again and the alert resolves.
    nas_file.write_bytes((tiers.primary / run.key).read_bytes())
    tiers.s3.put_object(Bucket=tiers.bucket, Key=s3_key(run), Body=body)
    code, fixed, _ = verify_json()
    assert code == 0 and fixed["ok"] == 9
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_verify_finds_a_missing_copy(server, passphrase_file, tiers):
    result, run = good_backup()
    (tiers.primary / run.key).unlink()
    code, found, _ = verify_json(str(run.pk))
    assert code == 1 and found["bad"] == 1
    bad = run.copies.get(status="bad")
    assert bad.location.kind == "primary" and "is missing from location primary" in bad.last_error


def test_verify_refuses_an_unknown_run(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="unknown run #999"):
        call_command("verify", "999")


def restore_through(reader, sample_cluster, server, passphrase_file, tmp_path, dbname):
    """Decrypt what open_first_healthy yields with the gpg CLI, then pg_restore it."""
    ciphertext = b"".join(iter(lambda: reader.read(64 * 1024), b""))
    assert reader.verified
    dump = tmp_path / f"{dbname}.dump"
    gpg("--decrypt", "--output", str(dump), passphrase_file=passphrase_file, stdin=ciphertext, tmp_path=tmp_path)
    return pg_restore(sample_cluster, server, dbname, dump)


def test_a_restore_read_with_the_primary_deleted_comes_from_the_nas_then_s3(
    server, sample_cluster, passphrase_file, tiers, tmp_path
):
    result, run = good_backup()
    for gone, next_tier in [("primary", "nas"), ("nas", "s3")]:
        (getattr(tiers, gone) / run.key).unlink()
        with open_first_healthy(run) as reader:
            assert reader.copy.location.name == next_tier
            assert reader.note == f"read from {next_tier}: {gone} copy missing"
            counts = restore_through(reader, sample_cluster, server, passphrase_file, tmp_path, f"from_{next_tier}")
        assert counts == run.details["row_counts"]
        assert run.copies.get(location__name=gone, artifact="main").status == "bad"
    assert JournalEntry.objects.filter(action="copy_fallback").count() == 2


def test_a_corrupt_primary_is_caught_while_streaming_and_the_next_read_falls_back(server, passphrase_file, tiers):
    result, run = good_backup()
    path = tiers.primary / run.key
    path.write_bytes(flip_byte(path.read_bytes()))
    reader = open_first_healthy(run)
    assert reader.copy.location.name == "primary"
    with pytest.raises(CopyCorrupt, match="primary copy") as caught, reader:
        while reader.read(65536):
            pass
    assert run.copies.get(location__kind="primary", artifact="main").status == "ok"  # the reader writes nothing
    mark_faults([caught.value])  # the restore does this on its own thread
    assert run.copies.get(location__kind="primary", artifact="main").status == "bad"
    assert Alert.objects.filter(condition="corruption", subject="server:maldives", state="open").exists()
    with open_first_healthy(run) as again:
        assert again.copy.location.name == "nas"
        assert hashlib.sha256(b"".join(iter(again.read, b""))).hexdigest() == run.sha256


def test_a_copy_is_made_from_the_nas_when_the_primary_is_corrupt(server, passphrase_file, tiers):
    tiers.server.stop()
    result, run = good_backup()
    tiers.server.start()
    path = tiers.primary / run.key
    path.write_bytes(flip_byte(path.read_bytes()))
    retry_due_copies(now=timezone.now() + timedelta(minutes=2))
    s3_copy = run.copies.get(location__kind="s3", artifact="main")
    # The first attempt read the primary, found it corrupt at the end and uploaded nothing.
    assert s3_copy.status == "failed" and "sha256" in s3_copy.last_error
    assert "Contents" not in tiers.s3.list_objects_v2(Bucket=tiers.bucket, Prefix=s3_key(run))
    retry_due_copies(now=timezone.now() + timedelta(minutes=5))
    s3_copy.refresh_from_db()
    assert s3_copy.status == "ok" and s3_copy.sha256 == run.sha256
    assert JournalEntry.objects.filter(action="copy_made", object_id=str(s3_copy.pk)).get().details["source"] == "nas"


def test_retention_deletes_a_run_from_every_tier_and_journals_each_deletion(server, passphrase_file, tiers):
    result, run = good_backup()
    deleted = delete_run_artifacts(run, actor="job:retention")
    assert deleted == {
        "deleted": [f"{tier}:{artifact}" for tier in ("nas", "primary", "s3") for artifact in ARTIFACTS],
        "failed": [],
    }
    run.refresh_from_db()
    assert run.deleted_at is not None and not run.is_good
    assert not [p for p in tiers.primary.rglob("*") if p.is_file()]
    assert not [p for p in tiers.nas.rglob("*") if p.is_file()]
    assert "Contents" not in tiers.s3.list_objects_v2(Bucket=tiers.bucket)
    assert set(run.copies.values_list("status", flat=True)) == {"deleted"}
    entries = JournalEntry.objects.filter(action="copy_deleted", actor="job:retention")
    assert sorted(e.details["location"] for e in entries) == [*["nas"] * 3, *["primary"] * 3, *["s3"] * 3]
    assert JournalEntry.objects.filter(action="backup_deleted", object_id=str(run.pk)).exists()


def test_retention_with_s3_down_deletes_the_rest_and_retries_s3(server, passphrase_file, tiers):
    result, run = good_backup()
    tiers.server.stop()
    deleted = delete_run_artifacts(run, actor="job:retention")
    assert deleted["failed"] == [f"s3:{artifact}" for artifact in ARTIFACTS]
    assert (
        "delete failed: cannot reach the S3 endpoint" in run.copies.get(location__kind="s3", artifact="main").last_error
    )
    tiers.server.start()
    assert len(tiers.s3.list_objects_v2(Bucket=tiers.bucket)["Contents"]) == 3
    assert retry_due_copies(now=timezone.now() + timedelta(minutes=2))["deleted"] == 3
    assert "Contents" not in tiers.s3.list_objects_v2(Bucket=tiers.bucket)
    assert set(run.copies.values_list("status", flat=True)) == {"deleted"}


def test_free_space_under_20_percent_raises_storage_low_for_the_location(server, passphrase_file, tiers):
    result, run = good_backup()
    nas = tiers.locations["nas"]
    used = sum(c.size for c in run.copies.filter(location=nas))
    # "wal" is the WAL archive at WAL_ROOT, a location of its own.
    assert {r["location"]: r["ok"] for r in StorageLocation.check_storage()} == {
        "primary": True,
        "wal": True,
        "nas": True,
        "s3": True,
    }

    nas.capacity_bytes = int(used / 0.85)  # 15% left of what the portal may use there
    nas.save()
    report = {r["location"]: r for r in StorageLocation.check_storage()}
    assert not report["nas"]["ok"] and 14 <= report["nas"]["free_pct"] <= 16
    monitor.check_storage()  # the monitor's minute: it alone opens the alert
    alert = Alert.objects.get(condition="storage_low", subject="location:nas", state="open")
    assert "under 20%" in alert.message

    nas.capacity_bytes = used * 10
    nas.save()
    assert {r["location"]: r["ok"] for r in StorageLocation.check_storage()}["nas"]
    monitor.check_storage()
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_a_copy_refused_by_the_capacity_fails_and_leaves_nothing(server, passphrase_file, tiers):
    nas = tiers.locations["nas"]
    nas.capacity_bytes = 100
    nas.save()
    result, run = good_backup()
    copy = run.copies.get(location=nas, artifact="main")
    assert copy.status == "failed" and "configured capacity" in copy.last_error
    assert not [p for p in tiers.nas.rglob("*") if p.is_file()]


def test_a_bucket_that_does_not_exist_fails_the_copy_with_one_clear_line(server, passphrase_file, tiers):
    s3 = tiers.locations["s3"]
    s3.bucket = "no-such-bucket"
    s3.save()
    result, run = good_backup()
    copy = run.copies.get(location=s3, artifact="main")
    assert copy.status == "failed"
    assert copy.last_error == (
        f"S3 bucket 'no-such-bucket' does not exist at {tiers.server.endpoint}: create it, "
        "or correct the bucket of storage location s3"
    )


def test_wal_segments_use_the_same_copies_verify_and_retention(server, tiers):
    import os

    from backups.copies import delete_artifacts, enqueue_copies
    from backups.models import WalSegment
    from backups.storage import store_for
    from backups.verify import verify_all

    data = os.urandom(64 * 1024)
    key = "maldives/wal/000000010000000000000003"
    with store_for(tiers.locations["primary"]).writer(key) as out:
        out.write(data)
        size, sha256 = out.commit()
    segment = WalSegment.objects.create(
        server=server,
        timeline=1,
        name=key.rsplit("/", 1)[1],
        size=size,
        sha256=sha256,
        key=key,
        archived_at=timezone.now(),
    )
    BackupCopy.objects.create(
        wal_segment=segment,
        location=tiers.locations["primary"],
        artifact="wal",
        key=key,
        size=size,
        sha256=sha256,
        status="ok",
        attempts=1,
    )
    enqueue_copies(segment)  # the task runs inline in the tests
    assert dict(segment.copies.values_list("location__name", "status")) == {"primary": "ok", "nas": "ok", "s3": "ok"}
    assert tiers.s3.get_object(Bucket=tiers.bucket, Key=f"backupportal/{key}")["Body"].read() == data

    # A worker that died mid-copy: its lease runs out and the copy is taken up again.
    s3_copy = segment.copies.get(location__kind="s3")
    BackupCopy.objects.filter(pk=s3_copy.pk).update(status="copying", next_attempt_at=timezone.now())
    retry_due_copies(now=timezone.now() + timedelta(seconds=1))
    s3_copy.refresh_from_db()
    assert s3_copy.status == "ok" and s3_copy.attempts == 2

    assert verify_all()["ok"] == 3
    assert delete_artifacts(segment, actor="job:retention")["failed"] == []
    assert not (tiers.nas / key).exists() and not (tiers.primary / key).exists()
    assert "Contents" not in tiers.s3.list_objects_v2(Bucket=tiers.bucket)
    segment.refresh_from_db()
    assert segment.deleted_at is not None


def test_two_writers_of_one_key_never_write_into_one_file(tmp_path):
    """A copy's lease expired while its NAS write hung and another worker took it over: each
    writer has a temporary file of its own; the first to commit wins, whole, and the other is
    refused, never a file of both writers' bytes under the first one's sha256."""
    from backups.storage import AtomicWriter, StorageError, partials_of

    final = tmp_path / "maldives" / "logical" / "run.dump.gpg"
    hung, taker = AtomicWriter(final), AtomicWriter(final)
    assert hung.tmp != taker.tmp and len(partials_of(final)) == 2
    hung.write(b"a" * 1000)
    taker.write(b"b" * 600)
    hung.write(b"a" * 1000)
    size, digest = taker.commit()
    assert final.read_bytes() == b"b" * 600 and digest == hashlib.sha256(b"b" * 600).hexdigest()
    with pytest.raises(StorageError, match="already exists"):
        hung.commit()
    hung.abort()
    assert final.read_bytes() == b"b" * 600 and partials_of(final) == []
