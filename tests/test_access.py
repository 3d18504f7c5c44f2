"""Every page, as an anonymous visitor, an Auditor, a Sysadmin and a DBA: exactly the access of
DESIGN.md's role table. The expectations are written out here, not derived from the code."""

import pytest
from django.contrib import admin
from django.urls import reverse

from backupportal.models import JournalEntry
from tests.helpers import (
    ACTIONS,
    DEMO_PASSWORD,
    FORMS,
    OWN_ACCOUNT,
    PUBLIC,
    TOKEN_ONLY,
    make_user,
    named_patterns,
    portal_urls,
    post_data,
)

# Models each role may add and change in the admin (the rest it may only view).
EDITABLE = {
    "DBA": {"backups.backupschedule", "restores.drdrill"},
    "Sysadmin": {"backups.server", "backups.storagelocation", "restores.drdrill", "watching.alertchannel"},
    "Auditor": set(),
}
# GET pages only some roles may open (the rest: 403).
RESTRICTED_PAGES = {
    "restore-request-new": {"DBA"},
    "evidence": {"DBA", "Auditor"},
    "evidence-make": {"DBA", "Auditor"},
    "evidence-pack": {"DBA", "Auditor"},
    "evidence-zip": {"DBA", "Auditor"},
    "evidence-sig": {"DBA", "Auditor"},
}
# Pages that send every reader on to another page (evidence-make without a period: to the form).
REDIRECTS = {"journal-object", "evidence-make"}
# Pages every role reads.
READ = {
    "dashboard",
    "coverage",
    "server",
    "server-retention",
    "run",
    "run-progress",
    "verification",
    "verification-progress",
    "journal",
    "journal-export",
    "journal-verify",
    "journal-entry",
    "drills",
    "drill",
    "drill-report",
    "maintenance",
    "restore-requests",
    "changes",
    "restore-request",
    "restore-progress",
    "restore-test",
    "restore-test-progress",
    "alerts",
    "alert",
    "two-factor",
    "two-factor-enrol",
    "two-factor-codes",
    "key-custody",
}
ROLES = ["DBA", "Sysadmin", "Auditor"]


def admin_urls(catalog):
    """(model label, page, url) for every registered ModelAdmin."""
    urls = []
    for model in admin.site._registry:
        info = model._meta.app_label, model._meta.model_name
        label = f"{info[0]}.{info[1]}"
        obj = catalog.get(model)
        urls.append((label, "changelist", reverse("admin:{}_{}_changelist".format(*info))))
        urls.append((label, "add", reverse("admin:{}_{}_add".format(*info))))
        if obj is not None:
            urls.append((label, "change", reverse("admin:{}_{}_change".format(*info), args=[obj.pk])))
            urls.append((label, "delete", reverse("admin:{}_{}_delete".format(*info), args=[obj.pk])))
    return urls


def test_every_portal_page_is_covered_by_the_matrix(catalog):
    names = set(named_patterns()) - PUBLIC
    pages = READ | set(ACTIONS) | set(RESTRICTED_PAGES) | set(FORMS) | REDIRECTS | TOKEN_ONLY
    assert names == pages, "a new page needs a line in this test"


def test_anonymous_visitors_get_the_login_page_everywhere(client, catalog):
    for _name, method, url in portal_urls(catalog):
        response = getattr(client, method)(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url
    for _label, _page, url in admin_urls(catalog):
        response = client.get(url)
        assert response.status_code == 302 and "login" in response["Location"], url
    assert client.get(reverse("login")).status_code == 200


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_exactly_its_portal_access(client, catalog, role):
    client.force_login(make_user(f"user-{role.lower()}", role))
    for name, method, url in portal_urls(catalog):
        response = getattr(client, method)(url, post_data(name, catalog) if method == "post" else None)
        if method == "get" and name in FORMS:
            assert response.status_code == (200 if role in FORMS[name] else 403), (role, url)
        elif method == "get":
            allowed = role in RESTRICTED_PAGES.get(name, {role})
            expected = 302 if name in REDIRECTS else 200
            assert response.status_code == (expected if allowed else 403), (role, url)
        elif role in ACTIONS.get(name, FORMS.get(name, ())):
            assert response.status_code == 302, (role, url, response.content[-2000:])
        else:
            assert response.status_code == 403, (role, url)


def test_an_auditor_gets_403_on_every_change_anywhere(client, catalog):
    """Every POST, to every portal page and every admin page, whatever it would do (but their own
    second factor, as their own password)."""
    client.force_login(make_user("audrey", "Auditor"))
    count = JournalEntry.objects.count()
    for name, _method, url in portal_urls(catalog):
        if name in OWN_ACCOUNT:
            continue
        if name == "evidence-make":  # their one POST (with the CSRF token): here a form it refuses
            assert client.post(url, {"title": "x", "kind": "logical"}).status_code == 400, url
            continue
        assert client.post(url, {"title": "x", "kind": "logical"}).status_code == 403, url
    for _label, _page, url in admin_urls(catalog):
        assert client.post(url, {"post": "yes", "action": "delete_selected"}).status_code == 403, url
    assert JournalEntry.objects.count() == count  # nothing happened


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_exactly_its_admin_access(client, catalog, role):
    client.force_login(make_user(f"user-{role.lower()}", role))
    for label, page, url in admin_urls(catalog):
        response = client.get(url)
        ours = label.split(".")[0] in ("backups", "restores", "watching", "backupportal")
        if not ours:
            # django-q2's admin can run any callable; auth's holds the users: superusers only.
            assert response.status_code == 403, (role, url)
        elif page in ("changelist", "change"):
            assert response.status_code == 200, (role, url)  # change pages are read-only without the right
        elif page == "add":
            assert response.status_code == (200 if label in EDITABLE[role] else 403), (role, url)
        elif page == "delete":
            assert response.status_code == 403, (role, url)  # nobody deletes history from the portal


@pytest.mark.parametrize("role", ROLES)
def test_only_editable_models_accept_a_change(client, catalog, role):
    client.force_login(make_user(f"user-{role.lower()}", role))
    for label, page, url in admin_urls(catalog):
        if page != "change" or label.split(".")[0] not in ("backups", "restores", "backupportal"):
            continue
        response = client.post(url, {})
        if label in EDITABLE[role]:
            assert response.status_code == 200, (role, url)  # the form, re-shown with its errors
        else:
            assert response.status_code == 403, (role, url)


def test_the_journal_cannot_be_changed_even_by_a_superuser(client, catalog):
    client.force_login(make_user("root-user", superuser=True))
    entry = catalog[JournalEntry]
    assert client.post(reverse("admin:backupportal_journalentry_change", args=[entry.pk]), {}).status_code == 403
    assert client.get(reverse("admin:backupportal_journalentry_delete", args=[entry.pk])).status_code == 403
    assert client.get(reverse("admin:backupportal_journalentry_add")).status_code == 403


@pytest.mark.parametrize("role", [None, *ROLES])
def test_metrics_answer_the_token_only_never_a_login(client, catalog, settings, role):
    if role:
        client.force_login(make_user(f"user-{role.lower()}", role))
    url = reverse("metrics")
    settings.METRICS_TOKEN = ""
    assert client.get(url).status_code == 404  # no token configured: no metrics for anyone
    settings.METRICS_TOKEN = "t0ken-for-prometheus"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer t0ken-for-prometheus"}).status_code == 200


def test_a_login_works_and_shows_the_role(client, catalog):
    make_user("dora", "DBA")
    response = client.post(reverse("login"), {"username": "dora", "password": DEMO_PASSWORD}, follow=True)
    assert response.status_code == 200
    assert b"dora" in response.content and b"DBA" in response.content


def test_failed_logins_are_journaled_and_locked_out(client, catalog):
    make_user("eve", "DBA")
    for _ in range(5):
        client.post(reverse("login"), {"username": "eve", "password": "wrong"}, REMOTE_ADDR="10.0.0.9")
    response = client.post(reverse("login"), {"username": "eve", "password": DEMO_PASSWORD}, REMOTE_ADDR="10.0.0.9")
    assert response.status_code in (403, 429)
    assert JournalEntry.objects.filter(action="login_failed", actor="eve").count() >= 5
    assert not JournalEntry.objects.filter(action="login", actor="eve").exists()


def test_attempts_the_login_limits_refuse_add_one_journal_line_per_address(client, catalog, settings):
    """Each refused attempt checks no password: a flood of them must not grow the journal for ever."""
    settings.LOGIN_ADDRESS_LIMIT = 3
    statuses = [
        client.post(reverse("login"), {"username": f"x{n}", "password": "wrong"}, REMOTE_ADDR="10.0.0.7").status_code
        for n in range(10)
    ]
    assert statuses[:3] == [200] * 3 and set(statuses[3:]) == {429}
    failed = JournalEntry.objects.filter(action="login_failed", details__address="10.0.0.7")
    assert failed.count() == 4 and failed.filter(details__refused=True).count() == 1
    client.post(reverse("login"), {"username": "y", "password": "wrong"}, REMOTE_ADDR="10.0.0.8")
    assert JournalEntry.objects.filter(action="login_failed", details__address="10.0.0.8").count() == 1


def test_no_changelist_filters_on_a_sealed_secret(client, catalog):
    """?password_sealed__startswith= would read a sealed secret out a character at a time."""
    client.force_login(make_user("audrey", "Auditor"))
    for url in (
        reverse("admin:backups_server_changelist") + "?password_sealed__startswith=aesgcm1",
        reverse("admin:watching_alertchannel_changelist") + "?secret_sealed__startswith=a",
    ):
        assert client.get(url).status_code == 400, url
    assert client.get(reverse("admin:backups_server_changelist") + "?archiving__exact=none").status_code == 200


def test_x_forwarded_proto_counts_only_from_a_trusted_proxy(client, catalog, settings):
    """Without a proxy in front, a client on plain http claiming https is still redirected."""
    settings.SECURE_SSL_REDIRECT = True
    settings.TRUSTED_PROXIES = ["10.0.0.5"]
    claimed = {"HTTP_X_FORWARDED_PROTO": "https"}
    response = client.get(reverse("login"), REMOTE_ADDR="10.0.0.9", **claimed)
    assert response.status_code == 301 and response["Location"].startswith("https://")
    assert client.get(reverse("login"), REMOTE_ADDR="10.0.0.5", **claimed).status_code == 200
    # The README's TLS proxy on this host, in front of gunicorn on 127.0.0.1: believed unlisted.
    settings.TRUSTED_PROXIES = []
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert client.get(reverse("login"), REMOTE_ADDR=local, **claimed).status_code == 200, local
