"""Storage locations in the admin (Sysadmins), verifying from the portal (DBAs), and the S3 secret kept out of sight."""

import logging
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse

from backupportal.models import JournalEntry
from backups.models import BackupCopy, BackupRun, StorageLocation
from backups.s3 import endpoint_refusal
from backups.storage import StorageError, store_for
from tests.helpers import S3_SECRET, backup_json, listening, portal_env, rebinding
from watching.models import Alert


def location_form(**fields):
    data = {
        "name": "",
        "kind": "nas",
        "path": "",
        "bucket": "",
        "prefix": "",
        "endpoint_url": "",
        "region": "",
        "sse": "",
        "storage_class": "",
        "capacity_bytes": "",
        "enabled": "on",
    }
    return data | fields


def add_location(client, **fields):
    return client.post(reverse("admin:backups_storagelocation_add"), location_form(**fields))


def test_the_nas_location_comes_from_nas_root(tiers):
    nas = StorageLocation.objects.get(name="nas")
    assert nas.kind == "nas" and nas.path == str(tiers.nas)
    assert store_for(nas).uri("maldives/x.gpg") == f"file://{tiers.nas}/maldives/x.gpg"


def test_a_sysadmin_adds_a_nas_location_under_nas_root(client, sam, tiers):
    client.force_login(sam)
    response = add_location(client, name="nas2", path=str(tiers.nas / "second"))
    assert response.status_code == 302, response.content.decode()[:3000]
    location = StorageLocation.objects.get(name="nas2")
    assert JournalEntry.objects.get(action="location_added", actor="sam").object_id == str(location.pk)


@pytest.mark.parametrize(
    "path, message",
    [
        ("/etc/backups", "is outside the allowed roots"),
        ("{nas}/../escape", "contains &#x27;..&#x27;"),
        ("relative/dir", "is relative"),
    ],
)
def test_a_storage_path_outside_the_roots_is_refused(client, sam, tiers, path, message):
    client.force_login(sam)
    response = add_location(client, name="bad", path=path.format(nas=tiers.nas))
    assert response.status_code == 200 and message in response.content.decode()
    assert not StorageLocation.objects.filter(name="bad").exists()


def test_a_nas_location_at_or_inside_another_locations_directory_is_refused(client, sam, tiers):
    """At the primary's path a copy "to the NAS" is the primary's own file under the same key: the
    copy took it for a leftover, removed it, and the only copy was gone."""
    client.force_login(sam)
    for path in (tiers.primary, tiers.primary / "nas", tiers.nas):
        response = add_location(client, name="nas2", path=str(path))
        assert response.status_code == 200 and "give the NAS a directory of its own" in response.content.decode()
    assert not StorageLocation.objects.filter(name="nas2").exists()


def test_nas_root_overlapping_backup_root_stops_the_start(settings, db):
    env = portal_env(settings, NAS_ROOT=str(settings.BACKUP_ROOT))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "manage.py", "check"], env=env, capture_output=True, text=True, cwd=root)
    assert done.returncode != 0 and "NAS_ROOT" in done.stderr and "give the NAS its own directory" in done.stderr


def test_a_location_left_outside_the_roots_by_a_settings_change_refuses_writes(tiers, settings):
    nas = StorageLocation.objects.get(name="nas")
    settings.NAS_ROOT = ""
    with pytest.raises(StorageError, match="location nas: Storage path .* is outside the allowed roots"):
        store_for(nas).writer("x")


def test_an_s3_bucket_that_does_not_exist_is_refused_when_the_location_is_saved(client, sam, tiers):
    client.force_login(sam)
    response = add_location(
        client, name="offsite2", kind="s3", bucket="no-such-bucket", endpoint_url=tiers.server.endpoint
    )
    assert response.status_code == 200
    assert "S3 bucket &#x27;no-such-bucket&#x27; does not exist at" in response.content.decode()
    assert not StorageLocation.objects.filter(name="offsite2").exists()
    response = add_location(
        client, name="offsite2", kind="s3", bucket=tiers.bucket, prefix="offsite2/", endpoint_url=tiers.server.endpoint
    )  # beside the tiers' own "backupportal/": a location shares no keys with another
    assert response.status_code == 302
    assert StorageLocation.objects.filter(name="offsite2", kind="s3").exists()


def test_a_dba_verifies_a_run_from_the_portal_and_from_the_admin(
    client, alice, charlie, sam, server, passphrase_file, tiers
):
    run = BackupRun.objects.get(pk=backup_json()["id"])
    url = reverse("verify-run", args=[run.pk])

    client.force_login(charlie)
    assert client.post(url).status_code == 403
    assert not JournalEntry.objects.filter(action="verify").exists()

    client.force_login(alice)
    assert b"Verify copies now" in client.get(run.get_absolute_url()).content
    response = client.post(url, follow=True)
    assert b"Verification of run" in response.content
    entry = JournalEntry.objects.get(action="verify", actor="alice")
    # dump, globals and signed manifest on three tiers
    assert entry.details == {"checked": 9, "bad": 0, "unreachable": 0}
    assert run.copies.filter(verified_at__isnull=False).count() == 9

    changelist = reverse("admin:backups_backuprun_changelist")
    response = client.post(changelist, {"action": "verify_copies", "_selected_action": [run.pk]}, follow=True)
    assert response.status_code == 200
    assert JournalEntry.objects.filter(action="verify", actor="alice").count() == 2

    # A Sysadmin does not run verifications.
    client.force_login(sam)
    assert b"verify_copies" not in client.get(changelist).content
    client.post(changelist, {"action": "verify_copies", "_selected_action": [run.pk]})
    assert not JournalEntry.objects.filter(action="verify", actor="sam").exists()


def test_the_s3_secret_key_never_appears_anywhere(client, sam, server, passphrase_file, tiers, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # boto3's own debug log included
    out, err = StringIO(), StringIO()
    call_command("backup", "maldives", "--json", stdout=out, stderr=err)
    tiers.server.stop()  # failures: their messages, alerts and journal entries too
    try:
        call_command("backup", "maldives", "--json", stdout=out, stderr=err)
    except SystemExit:
        pass
    try:
        call_command("verify", "--json", stdout=out, stderr=err)
    except SystemExit:
        pass
    tiers.server.start()

    assert BackupCopy.objects.filter(status="failed").exists(), "the failure path was exercised"
    texts = [out.getvalue(), err.getvalue(), caplog.text, "".join(capfd.readouterr())]
    texts += [str(e.__dict__) for e in JournalEntry.objects.all()]
    texts += [a.message for a in Alert.objects.all()]
    texts += list(BackupCopy.objects.values_list("last_error", flat=True))
    texts += [r.error + r.notes + str(r.details) for r in BackupRun.objects.all()]
    client.force_login(sam)
    s3 = StorageLocation.objects.get(name="s3")
    for url in [
        reverse("admin:backups_storagelocation_changelist"),
        reverse("admin:backups_storagelocation_change", args=[s3.pk]),
        reverse("admin:backups_backupcopy_changelist"),
        reverse("admin:backupportal_journalentry_changelist"),
        reverse("admin:watching_alert_changelist"),
        BackupRun.objects.first().get_absolute_url(),
    ]:
        response = client.get(url)
        assert response.status_code == 200, url
        texts.append(response.content.decode())
    assert "Making request" in caplog.text, "boto3's debug log was captured"
    for text in texts:
        assert S3_SECRET not in text


def test_an_s3_endpoint_inside_the_network_is_refused_unless_listed_and_a_metadata_address_always(
    client, sam, tiers, settings
):
    """Whoever edits a location chooses where the worker sends requests signed with the S3 keys:
    not a probe of the portal's network. The environment's own S3_ENDPOINT_URL needs no listing."""
    client.force_login(sam)
    port = tiers.server.endpoint.rsplit(":", 1)[1]
    same_server = f"http://localhost:{port}"  # the same moto, by another name: not the environment's
    response = add_location(client, name="probe", kind="s3", bucket=tiers.bucket, endpoint_url=same_server)
    assert response.status_code == 200
    [error] = response.context["adminform"].form.errors["endpoint_url"]
    assert error.startswith("refused: localhost resolves to ") and "a loopback address" in error
    assert error.endswith("list localhost in STORAGE_ALLOWED_HOSTS to allow it")
    assert not StorageLocation.objects.filter(name="probe").exists()

    settings.STORAGE_ALLOWED_HOSTS = ["localhost", "169.254.0.0/16"]
    response = add_location(client, name="minio", kind="s3", bucket=tiers.bucket, endpoint_url=same_server)
    assert response.status_code == 302, response.content.decode()[:2000]
    response = add_location(client, name="imds", kind="s3", bucket="b", endpoint_url="http://169.254.169.254/")
    assert response.context["adminform"].form.errors["endpoint_url"] == [
        "refused: 169.254.169.254 resolves to 169.254.169.254, a cloud metadata address, which no storage location"
        " may reach"
    ]


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9\\@example.com",  # urllib3 would connect to 127.0.0.1, urlsplit reads example.com
        "http://169.254.169.254\\@s3.example.com",
        "http://user:secret-pw@s3.example.com",
        "http://[fe80::1%25lo]:9000",
        "http://s3.example.com/?x=1",
        "http://s3.example.com /",
        "http://minio_1:9000",  # botocore would refuse it at every use
    ],
)
def test_an_endpoint_two_parsers_could_read_differently_is_refused_without_repeating_it(
    client, sam, tiers, settings, endpoint
):
    client.force_login(sam)
    response = add_location(client, name="odd", kind="s3", bucket=tiers.bucket, endpoint_url=endpoint)
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["endpoint_url"] == [
        "refused: the endpoint URL must be scheme://host[:port][/path], with no user, password, query, backslash"
        " or blank: type it again"
    ]
    assert not StorageLocation.objects.filter(name="odd").exists()
    # Nor through the environment's exemption: only the very same endpoint is exempt.
    settings.S3_ENDPOINT_URL = "http://s3.example.com"
    assert endpoint_refusal("http://169.254.169.254\\@s3.example.com").startswith("refused: the endpoint URL must")


def test_a_name_that_resolves_inside_the_network_after_the_check_is_not_connected_to(tiers, settings, monkeypatch):
    """DNS rebinding: the save and the store see a public address, the connection would see 127.0.0.1."""
    asked = rebinding(monkeypatch, "minio.rebind.example")
    settings.S3_CONNECT_TIMEOUT, settings.S3_READ_TIMEOUT, settings.S3_MAX_ATTEMPTS = 1, 1, 1
    with listening() as listener:
        location = StorageLocation.objects.create(
            name="rebinding",
            kind="s3",
            bucket=tiers.bucket,
            endpoint_url=f"http://minio.rebind.example:{listener.port}",
        )
        with pytest.raises(StorageError) as refused:
            store_for(location).check()
        assert str(refused.value) == (
            "storage location rebinding: refused: minio.rebind.example resolves to 127.0.0.1, a loopback address;"
            " list minio.rebind.example in STORAGE_ALLOWED_HOSTS to allow it"
        )
        assert len(asked) >= 2  # checked when the store was made, and again when connecting
        assert not listener.reached()


def test_a_location_whose_endpoint_is_refused_now_sends_nothing(tiers, settings):
    """Saved before the rule, by hand, or a name that now resolves inside: every use refuses it."""
    with listening() as listener:
        location = StorageLocation.objects.create(
            name="inside", kind="s3", bucket=tiers.bucket, endpoint_url=f"http://127.0.0.1:{listener.port}"
        )
        with pytest.raises(StorageError, match=r"^storage location inside: refused: 127\.0\.0\.1 resolves to"):
            store_for(location).check()
        assert not listener.reached()


def test_a_bucket_given_as_an_access_point_arn_is_refused(client, sam, tiers):
    """botocore would send an ARN's requests to <name>-<account>.<endpoint host>, a host of the ARN's."""
    client.force_login(sam)
    arn = "arn:aws:s3:us-east-1:123456789012:accesspoint/x"
    response = add_location(client, name="arn", kind="s3", bucket=arn, endpoint_url=tiers.server.endpoint)
    assert response.context["adminform"].form.errors["bucket"] == [
        "refused: the bucket must be a bucket's name (letters, digits, dots, hyphens), not an ARN or a path"
    ]
    made = StorageLocation.objects.create(name="arn", kind="s3", bucket=arn, endpoint_url=tiers.server.endpoint)
    with pytest.raises(StorageError, match="^storage location arn: refused: the bucket must be"):
        store_for(made).check()


def test_an_endpoint_typed_in_the_admin_is_reached_directly_never_through_the_environments_proxy(
    client, sam, tiers, settings, monkeypatch
):
    """A proxy would resolve and connect where the connection guard cannot look."""
    with listening() as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        settings.STORAGE_ALLOWED_HOSTS = ["localhost"]
        client.force_login(sam)
        port = tiers.server.endpoint.rsplit(":", 1)[1]
        response = add_location(
            client, name="direct", kind="s3", bucket=tiers.bucket, endpoint_url=f"http://localhost:{port}"
        )
        assert response.status_code == 302, response.content.decode()[:2000]  # reached moto, and checked
        assert not proxy.reached(0.3)


def test_a_lock_wait_of_no_seconds_stops_the_start(settings, db):
    env = portal_env(settings, BACKUP_LOCK_WAIT="0")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "manage.py", "check"], env=env, capture_output=True, text=True, cwd=root)
    assert done.returncode != 0 and "BACKUP_LOCK_WAIT=0: say how many seconds" in done.stderr
