"""A change request is approved by what its approver reads: the target as it was named when it was
asked for. A target renamed since (a Sysadmin renames a server or a location at once) is refused at
approval, so that a request asked under another name cannot be approved for production."""

from django.urls import reverse

from backupportal.models import JournalEntry
from backups.models import ChangeRequest, StorageLocation
from tests.adminform_helpers import admin_form_data
from tests.helpers import register


def rename(client, server, name):
    url = reverse("admin:backups_server_change", args=[server.pk])
    response = client.post(url, admin_form_data(client, url, name=name))
    assert response.status_code == 302, response.content.decode()[:2000]
    server.refresh_from_db()
    assert server.name == name


def test_a_server_renamed_after_its_request_is_not_disabled_under_the_old_name(client, pg_cluster, sam, alice):
    """Sam renames production 'scratch', asks to disable 'scratch', and names it back: Alice reads
    'Disable a server (scratch)' and must not disable production by approving it."""
    production = register(pg_cluster, name="maldives", dbname="postgres")
    client.force_login(sam)
    rename(client, production, "scratch")
    url = reverse("admin:backups_server_change", args=[production.pk])
    data = admin_form_data(client, url, enabled=None, change_reason="scratch box is retired")
    assert client.post(url, data).status_code == 302
    change = ChangeRequest.objects.get(kind=ChangeRequest.Kind.DISABLE_SERVER)
    assert change.target_repr == "scratch"
    rename(client, production, "maldives")

    client.force_login(alice)
    page = client.get(reverse("changes")).content.decode()
    assert "now maldives: reject it and ask again" in page  # what she reads beside "scratch"
    response = client.post(reverse("change-approve", args=[change.pk]), follow=True)
    production.refresh_from_db()
    assert production.enabled, "production was disabled by a request asked for as 'scratch'"
    change.refresh_from_db()
    assert change.state == ChangeRequest.State.PENDING
    text = response.content.decode()
    assert "scratch" in text and "maldives" in text and "ask again" in text
    assert not JournalEntry.objects.filter(action="change_approved").exists()

    # Rejected, it is asked for again under the name it has: that one is approved.
    assert client.post(reverse("change-reject", args=[change.pk])).status_code == 302
    client.force_login(sam)
    data = admin_form_data(client, url, enabled=None, change_reason="production moves to the new cluster")
    assert client.post(url, data).status_code == 302
    again = ChangeRequest.objects.pending().get(kind=ChangeRequest.Kind.DISABLE_SERVER)
    assert again.target_repr == "maldives"
    client.force_login(alice)
    client.post(reverse("change-approve", args=[again.pk]))
    production.refresh_from_db()
    assert not production.enabled


def test_a_location_renamed_after_its_retirement_was_asked_for_is_not_retired(client, sam, alice, tmp_path):
    nas = StorageLocation.objects.create(name="nas", kind="nas", path=str(tmp_path))
    StorageLocation.objects.filter(pk=nas.pk).update(name="nas-scratch")  # as the admin renames it
    nas.refresh_from_db()
    change = ChangeRequest.open(ChangeRequest.Kind.RETIRE_LOCATION, nas, sam, "the scratch NAS goes back")
    StorageLocation.objects.filter(pk=nas.pk).update(name="nas")
    client.force_login(alice)
    client.post(reverse("change-approve", args=[change.pk]))
    nas.refresh_from_db()
    change.refresh_from_db()
    assert nas.enabled and change.state == ChangeRequest.State.PENDING


def test_a_name_swapped_between_two_servers_still_shows_where_the_change_applies(client, pg_cluster, sam, alice):
    """Left by the fix above: Sam renames production 'scratch' and the real scratch server
    'old-scratch', asks to disable 'scratch' and leaves the names so. The names match at approval;
    what Alice can still read is the address the change applies to: production's, not scratch's."""
    production = register(pg_cluster, name="maldives", dbname="postgres")
    scratch = register(pg_cluster, name="scratch", dbname="postgres")
    scratch.dsn = "postgresql://postgres@scratch.example:6543/postgres"
    scratch.save(update_fields=["dsn"])
    type(scratch).objects.filter(pk=scratch.pk).update(name="old-scratch")  # as the admin renames it
    client.force_login(sam)
    rename(client, production, "scratch")
    url = reverse("admin:backups_server_change", args=[production.pk])
    data = admin_form_data(client, url, enabled=None, change_reason="scratch box is retired")
    assert client.post(url, data).status_code == 302
    change = ChangeRequest.objects.get(kind=ChangeRequest.Kind.DISABLE_SERVER)

    client.force_login(alice)
    page = client.get(reverse("changes")).content.decode()
    row = page[page.index(f'id="change-{change.pk}"') :]
    row = row[: row.index("</tr>")]
    assert f"at {production.destination}" in row and "scratch.example" not in row, row
