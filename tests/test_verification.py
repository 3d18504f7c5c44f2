"""A verification is a catalog row its page follows: bytes and copies counted as they are read,
a verdict at the end, journaled, one at a time per run, and never stuck behind a dead worker."""

from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import Verification
from tests.helpers import flip_byte, good_backup, verify_json


def test_a_dba_verifies_a_run_and_its_page_counts_every_copy_and_byte(client, alice, server, passphrase_file, tiers):
    _, run = good_backup()
    client.force_login(alice)

    response = client.post(reverse("verify-run", args=[run.pk]))  # tasks run in-process in tests
    verification = Verification.objects.get(run=run)
    assert response["Location"] == verification.get_absolute_url()

    copies = run.copies.all()
    assert verification.status == "verified" and verification.requested_by == "alice"
    # dump, globals and signed manifest on three tiers
    assert verification.copies_checked == verification.copies_total == len(copies) == 9
    assert verification.bytes_checked == verification.bytes_total == sum(c.size for c in copies)
    assert verification.copies_bad == verification.copies_unreachable == 0
    assert {c["status"] for c in verification.result["copies"]} == {"ok"}

    progress = client.get(reverse("verification-progress", args=[verification.pk])).json()
    assert progress["status"] == "verified" and progress["done"] is True
    assert progress["bytes_checked"] == verification.bytes_checked and progress["elapsed_s"] >= 0
    page = client.get(verification.get_absolute_url()).content.decode()
    assert "verified" in page and 'data-done="1"' in page
    assert f"#{verification.pk}" in client.get(run.get_absolute_url()).content.decode()

    requested = JournalEntry.objects.get(action="verify_requested")
    assert (requested.actor, requested.object_type, requested.object_id) == (
        "alice",
        "backups.Verification",
        str(verification.pk),
    )
    assert JournalEntry.objects.get(action="verify", actor="alice").outcome == "ok"


def test_a_flipped_byte_fails_the_verification_and_names_the_copy(client, alice, server, passphrase_file, tiers):
    _, run = good_backup()
    nas_file = tiers.nas / run.key
    nas_file.write_bytes(flip_byte(nas_file.read_bytes()))

    code, result, _ = verify_json(str(run.pk))
    assert code == 1
    verification = Verification.objects.get(pk=result["verification"])
    assert verification.status == "failed" and verification.requested_by.startswith("os:")
    assert verification.error == "1 bad and 0 unreachable of 9 copies"
    assert verification.copies_checked == 9 and verification.copies_bad == 1
    bad = [c for c in verification.result["copies"] if c["status"] == "bad"]
    assert [(c["location"], c["artifact"]) for c in bad] == [("nas", "main")]
    assert bad[0]["error"].startswith("sha256 ")

    client.force_login(alice)
    page = client.get(verification.get_absolute_url()).content.decode()
    assert "1 bad and 0 unreachable of 9 copies" in page and "Traceback" not in page


def test_the_weekly_check_is_catalogued_too(server, passphrase_file, tiers):
    from backups.tasks import verify_copies

    good_backup()
    result = verify_copies()
    verification = Verification.objects.get(pk=result["verification"])
    assert verification.run is None and verification.status == "verified"
    assert verification.copies_checked == result["checked"] > 0


def test_one_verification_at_a_time_per_run_but_never_behind_a_dead_worker(
    client, alice, server, passphrase_file, tiers
):
    _, run = good_backup()
    client.force_login(alice)
    url = reverse("verify-run", args=[run.pk])
    now = timezone.now()
    busy = Verification.objects.create(run=run, status="running", started_at=now, heartbeat_at=now)

    response = client.post(url, follow=True)
    assert f"already being verified (verification #{busy.pk})" in response.content.decode()
    assert response.redirect_chain[-1][0] == busy.get_absolute_url()
    assert Verification.objects.filter(run=run).count() == 1

    Verification.objects.filter(pk=busy.pk).update(heartbeat_at=now - Verification.STALE_AFTER - timedelta(seconds=1))
    client.post(url)
    busy.refresh_from_db()
    assert busy.status == "failed" and busy.error.startswith("interrupted: no progress since")
    assert run.verifications.first().status == "verified"


def test_the_page_of_a_verification_whose_worker_died_stops_waiting(client, charlie, server):
    from backups.models import BackupRun

    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded")
    long_ago = timezone.now() - Verification.STALE_AFTER - timedelta(minutes=1)
    stale = Verification.objects.create(run=run, status="running", started_at=long_ago, heartbeat_at=long_ago)
    client.force_login(charlie)
    progress = client.get(reverse("verification-progress", args=[stale.pk])).json()
    assert progress["done"] and progress["status"] == "failed" and "no progress since" in progress["error"]


def test_an_auditor_may_watch_but_not_verify(client, charlie, server, passphrase_file, tiers):
    _, run = good_backup()
    client.force_login(charlie)
    assert b"Verify copies now" not in client.get(run.get_absolute_url()).content
    assert client.post(reverse("verify-run", args=[run.pk])).status_code == 403
    assert not Verification.objects.exists()
    assert not JournalEntry.objects.filter(action="verify_requested").exists()


def test_verify_of_a_run_whose_copies_went_with_its_failure_is_refused(server, passphrase_file, backup_root):
    """Found by a probe: 'verify RUN' of a failed run said '0 ok of 0' and exited 0, its journal
    entry ok; its copies, removed with the failure, are catalogued deleted."""
    from django.utils import timezone

    from backups.models import BackupCopy, BackupRun, StorageLocation
    from tests.helpers import run_command

    run = BackupRun.objects.create(server=server, kind="logical", status="failed", started_at=timezone.now())
    BackupCopy.objects.create(
        run=run,
        location=StorageLocation.objects.get(name="primary"),
        key="k",
        size=1,
        sha256="a" * 64,
        status="deleted",
    )
    result = run_command("verify", str(run.pk))
    assert result["_exit"] != 0 and f"run #{run.pk} is failed and has no copies to verify" in result["_stderr"]


def test_a_copy_replaced_by_a_directory_is_found_bad(server, passphrase_file, backup_root):
    """Found by a probe: a directory where the copy's file was read 'unreachable', check after check,
    and the copy stayed ok (restorable, as far as the catalog knew)."""
    _, run = good_backup()
    path = backup_root / run.key
    path.unlink()
    (path / "junk").mkdir(parents=True)
    verify_json(str(run.pk))
    copy = run.copies.get(artifact="main", location__name="primary")
    assert copy.status == "bad" and "is a directory, not the copy" in copy.last_error, (copy.status, copy.last_error)
