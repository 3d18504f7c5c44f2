"""Every page, as an anonymous visitor, an Auditor, a Sysadmin and a DBA: exactly the access of
DESIGN.md's role table. The expectations are written out here, not derived from the code."""

import pytest
from django.contrib import admin
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from backupportal.models import JournalEntry
from restores.models import RestoreRequest, RestoreRun
from tests.conftest import DEMO_PASSWORD, make_user

# Models each role may add and change in the admin (the rest it may only view).
EDITABLE = {
    "DBA": {"backups.backupschedule", "restores.drdrill"},
    "Sysadmin": {"backups.server", "backups.storagelocation", "restores.drdrill"},
    "Auditor": set(),
}
# POST actions of the portal and who may do them.
ACTIONS = {
    "backup-now": {"DBA"},
    "restore-test-now": {"DBA"},
    "schedule-edit": {"DBA"},
    "restore-request-approve": {"DBA"},
    "restore-request-reject": {"DBA"},
}
# GET pages only some roles may open (the rest: 403).
RESTRICTED_PAGES = {
    "restore-request-new": {"DBA"},
}
ROLES = ["DBA", "Sysadmin", "Auditor"]
POST_DATA = {"kind": "logical", "job": "logical", "cron": "0 2 * * *", "enabled": "on"}


def portal_urls(catalog):
    """(name, method, url) for every named pattern outside the admin."""
    request, restore = catalog[RestoreRequest], catalog[RestoreRun]
    args = {
        "server": [catalog["server"].name],
        "backup-now": [catalog["server"].name],
        "restore-test-now": [catalog["server"].name],
        "schedule-edit": [catalog["server"].name],
        "run": [catalog["run"].pk],
        "run-progress": [catalog["run"].pk],
        "restore-request": [request.pk],
        "restore-request-approve": [request.pk],
        "restore-request-reject": [request.pk],
        "restore-progress": [restore.pk],
    }
    urls = []
    for name in named_patterns():
        if name in ("login", "logout"):
            continue
        method = "post" if name in ACTIONS else "get"
        urls.append((name, method, reverse(name, args=args.get(name, []))))
    return urls


def named_patterns(resolver=None, namespace=None):
    resolver = resolver or get_resolver()
    for p in resolver.url_patterns:
        if isinstance(p, URLResolver):
            if p.namespace == "admin":
                continue
            yield from named_patterns(p)
        elif isinstance(p, URLPattern) and p.name:
            yield p.name


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
    names = set(named_patterns()) - {"login", "logout"}
    pages = {"dashboard", "server", "run", "run-progress", "restore-requests", "restore-request", "restore-progress"}
    assert names == pages | set(ACTIONS) | set(RESTRICTED_PAGES), "a new page needs a line in this test"


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
        response = getattr(client, method)(url, POST_DATA if method == "post" else None)
        if method == "get":
            allowed = role in RESTRICTED_PAGES.get(name, {role})
            assert response.status_code == (200 if allowed else 403), (role, url)
        elif role in ACTIONS[name]:
            assert response.status_code == 302, (role, url)
        else:
            assert response.status_code == 403, (role, url)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_exactly_its_admin_access(client, catalog, role):
    client.force_login(make_user(f"user-{role.lower()}", role))
    for label, page, url in admin_urls(catalog):
        response = client.get(url)
        ours = label.split(".")[0] in ("backups", "restores", "backupportal")
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
