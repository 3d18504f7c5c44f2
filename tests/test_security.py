"""Security: CSRF on every state-changing view, sessions that expire, and secrets that never show."""

import logging
from io import StringIO

from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from backupportal.models import JournalEntry
from backups.models import BackupRun
from tests.helpers import DEMO_PASSWORD, DSN_PASSWORD, portal_urls, post_data


def server_form(server, **changes):
    """The admin's server change form as a browser posts it, with `changes` applied."""
    data = {
        "name": server.name,
        "dsn": server.dsn,
        "pg_bin": "",
        "archiving": "none",
        "enabled": "on",
        "rpo_minutes": 15,
        "rto_critical_minutes": 240,
        "rto_full_minutes": 480,
        "logical_retention_days": 30,
        "base_retention_days": 30,
        "wal_retention_days": 7,
        "incremental_retention_days": 7,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": 0,
        "retention_floor": 3,
        "critical_tables": '["users"]',
        "shrink_threshold_pct": 20,
        "sandbox": "",
    }
    return data | changes


def test_every_state_changing_view_refuses_a_post_without_csrf_token(catalog, alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    for name, method, url in portal_urls(catalog):
        if method == "post":
            assert client.post(url, post_data(name, catalog)).status_code == 403, url
    server = catalog["server"]
    assert client.post(reverse("admin:backups_backupschedule_add"), {}).status_code == 403
    assert (
        client.post(
            reverse("admin:backups_server_changelist"), {"action": "back_up_now", "_selected_action": [server.pk]}
        ).status_code
        == 403
    )
    assert not BackupRun.objects.exclude(pk=catalog["run"].pk).exists()


def test_the_login_form_needs_a_csrf_token(db):
    client = Client(enforce_csrf_checks=True)
    assert client.post(reverse("login"), {"username": "x", "password": "y"}).status_code == 403


def test_sessions_expire(settings, catalog, alice):
    assert settings.SESSION_COOKIE_AGE <= 12 * 3600 and settings.SESSION_EXPIRE_AT_BROWSER_CLOSE
    client = Client()
    client.post(reverse("login"), {"username": "alice", "password": DEMO_PASSWORD})
    assert client.get(reverse("dashboard")).status_code == 200
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    Session.objects.update(expire_date=timezone.now())
    response = client.get(reverse("dashboard"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_no_secret_in_the_journal_logs_admin_pages_or_errors(
    client, caplog, sam, alice, secret_server, sample_cluster, passphrase_file, backup_root
):
    passphrase = passphrase_file.read_text().strip()
    caplog.set_level(logging.DEBUG)
    out, err = StringIO(), StringIO()
    call_command("backup", "maldives", "--json", stdout=out, stderr=err)
    run = BackupRun.objects.get()
    # A failing run too: its error message must not carry the password either.
    sample_cluster.stop()
    try:
        call_command("backup", "maldives", "--json", stdout=out, stderr=err)
    except SystemExit:
        pass
    failed = BackupRun.objects.get(status="failed")
    assert "connection refused" in failed.error
    sample_cluster.start()

    texts = [out.getvalue(), err.getvalue(), caplog.text, failed.error, str(run.details)]
    texts += [str(e.details) + e.object_repr for e in JournalEntry.objects.all()]
    client.force_login(sam)
    for url in [
        reverse("admin:backups_server_change", args=[secret_server.pk]),
        reverse("admin:backups_server_changelist"),
        reverse("admin:backups_backuprun_change", args=[run.pk]),
        reverse("admin:backupportal_journalentry_changelist"),
    ]:
        texts.append(client.get(url).content.decode())
    client.force_login(alice)
    for url in [reverse("server", args=["maldives"]), reverse("run", args=[failed.pk]), reverse("dashboard")]:
        texts.append(client.get(url).content.decode())
    for text in texts:
        assert DSN_PASSWORD not in text
        assert passphrase not in text


def test_the_admin_never_renders_the_stored_password(client, sam, secret_server):
    client.force_login(sam)
    page = client.get(reverse("admin:backups_server_change", args=[secret_server.pk])).content.decode()
    assert 'name="new_password"' in page and DSN_PASSWORD not in page


def test_a_sysadmin_changes_the_password_without_seeing_it_and_the_journal_says_only_that(
    client, sam, secret_server, sample_cluster
):
    sample_cluster.execute("ALTER ROLE backup_user PASSWORD 'Rotated-Secret-2'")
    client.force_login(sam)
    data = server_form(secret_server, new_password="Rotated-Secret-2")
    response = client.post(reverse("admin:backups_server_change", args=[secret_server.pk]), data)
    assert response.status_code == 302, response.content.decode()[:2000]
    secret_server.refresh_from_db()
    assert secret_server.password == "Rotated-Secret-2"
    entry = JournalEntry.objects.filter(action="server_changed").latest("id")
    assert entry.details["credentials_changed"] is True and "Rotated-Secret-2" not in str(entry.details)


def test_a_wrong_password_in_the_admin_is_refused_with_one_line(client, sam, secret_server):
    client.force_login(sam)
    data = server_form(secret_server, new_password="wrong-one")
    response = client.post(reverse("admin:backups_server_change", args=[secret_server.pk]), data)
    assert response.status_code == 200
    assert b"password authentication failed for user backup_user" in response.content
    assert b"wrong-one" not in response.content
    secret_server.refresh_from_db()
    assert secret_server.password == DSN_PASSWORD


def test_artifacts_and_their_directories_are_private(server, passphrase_file, backup_root):
    call_command("backup", "maldives", stdout=StringIO())
    run = BackupRun.objects.get()
    artifact = backup_root / run.key
    assert artifact.stat().st_mode & 0o077 == 0
    assert artifact.parent.stat().st_mode & 0o077 == 0


def test_no_page_of_a_logged_in_user_is_kept_by_the_browser_or_a_proxy(client, catalog, alice):
    """Found by review: the dashboard, the journal and the servers' pages (DSNs, restore reasons)
    came without Cache-Control: Back after logout, or a shared cache, showed them again."""
    client.force_login(alice)
    for url in (reverse("dashboard"), reverse("journal"), reverse("alerts"), reverse("server", args=["maldives"])):
        response = client.get(url)
        assert response.status_code == 200 and response["Cache-Control"] == "no-store, private", url
