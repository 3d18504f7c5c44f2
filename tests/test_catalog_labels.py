"""The catalogs (Django's admin) read as the portal does: its colours, its navigation, plain labels."""

from django.urls import reverse

from tests.conftest import make_user


def test_the_catalogs_use_the_portals_look_and_plain_labels(client, db):
    client.force_login(make_user("sam", "Sysadmin"))
    index = client.get(reverse("admin:index")).content.decode()
    assert "css/admin.css" in index and 'href="/"' in index and "Journal</a>" in index
    assert "DR drills" in index and "WAL segments" in index
    assert "Dr drills" not in index and "Wal segments" not in index
    server_form = client.get(reverse("admin:backups_server_add")).content.decode()
    assert "Shrink threshold (%)" in server_form and "Shrink threshold pct" not in server_form
