"""Every page, as an anonymous visitor, an Auditor, a Sysadmin and a DBA: exactly the access of
DESIGN.md's role table. The expectations are written out here, not derived from the code."""

import pytest
from django.contrib import admin
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from backupportal.models import JournalEntry
from backups.models import Verification
from restores.models import DrDrill, RestoreRequest, RestoreRun, RestoreTest
from tests.conftest import DEMO_PASSWORD, make_user
from watching.models import Alert, MaintenanceTask

# Models each role may add and change in the admin (the rest it may only view).
EDITABLE = {
    "DBA": {"backups.backupschedule", "restores.drdrill"},
    "Sysadmin": {"backups.server", "backups.storagelocation", "restores.drdrill"},
    "Auditor": set(),
}
# POST actions of the portal and who may do them.
ACTIONS = {
    "backup-now": {"DBA"},
    "verify-run": {"DBA"},
    "alert-acknowledge": {"DBA", "Sysadmin"},
    "restore-test-now": {"DBA"},
    "schedule-edit": {"DBA"},
    "critical-tables-edit": {"DBA"},
    "restore-request-approve": {"DBA"},
    "restore-request-reject": {"DBA"},
    "sandbox-remove": {"DBA"},
}
# GET pages only some roles may open (the rest: 403).
RESTRICTED_PAGES = {
    "restore-request-new": {"DBA"},
}
# Pages whose form only some roles get: both the GET and the POST need the right.
FORMS = {
    "drill-new": {"DBA", "Sysadmin"},
    "drill-edit": {"DBA", "Sysadmin"},
    "drill-step": {"DBA", "Sysadmin"},
    "maintenance-complete": {"DBA", "Sysadmin"},
}
# Pages that send every reader on to another page.
REDIRECTS = {"journal-object"}
# Pages every role reads.
READ = {
    "dashboard",
    "server",
    "run",
    "run-progress",
    "verification",
    "verification-progress",
    "journal",
    "journal-export",
    "journal-entry",
    "drills",
    "drill",
    "drill-report",
    "maintenance",
    "restore-requests",
    "restore-request",
    "restore-progress",
    "restore-test",
    "restore-test-progress",
    "alerts",
    "alert",
}
# The documented exception to the login: Prometheus reads /metrics with METRICS_TOKEN, nobody else.
TOKEN_ONLY = {"metrics"}
ROLES = ["DBA", "Sysadmin", "Auditor"]


def portal_urls(catalog):
    """(name, method, url) for every named pattern outside the admin."""
    drill, entry = catalog[DrDrill], catalog[JournalEntry]
    request, restore = catalog[RestoreRequest], catalog[RestoreRun]
    args = {
        "server": [catalog["server"].name],
        "backup-now": [catalog["server"].name],
        "restore-test-now": [catalog["server"].name],
        "schedule-edit": [catalog["server"].name],
        "critical-tables-edit": [catalog["server"].name],
        "run": [catalog["run"].pk],
        "run-progress": [catalog["run"].pk],
        "verify-run": [catalog["run"].pk],
        "verification": [catalog[Verification].pk],
        "verification-progress": [catalog[Verification].pk],
        "journal-entry": [entry.pk],
        "journal-object": [entry.pk],
        "drill": [drill.pk],
        "drill-edit": [drill.pk],
        "drill-report": [drill.pk],
        "drill-step": [drill.pk, "assessment"],
        "maintenance-complete": [catalog[MaintenanceTask].pk],
        "restore-request": [request.pk],
        "restore-request-approve": [request.pk],
        "restore-request-reject": [request.pk],
        "restore-progress": [restore.pk],
        "sandbox-remove": [restore.pk],
        "restore-test": [catalog[RestoreTest].pk],
        "restore-test-progress": [catalog[RestoreTest].pk],
        "alert": [catalog[Alert].pk],
        "alert-acknowledge": [catalog[Alert].pk],
    }
    urls = []
    for name in named_patterns():
        if name in ("login", "logout") or name in TOKEN_ONLY:
            continue
        url = reverse(name, args=args.get(name, []))
        if name not in ACTIONS:
            urls.append((name, "get", url))
        if name in ACTIONS or name in FORMS:
            urls.append((name, "post", url))
    return urls


def post_data(name, catalog):
    """A valid POST for each action: the roles allowed must get through to the redirect."""
    from django.utils import timezone

    drill = catalog[DrDrill]
    later = timezone.localtime(drill.started_at + timezone.timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M")
    declared = timezone.localtime(drill.started_at).strftime("%Y-%m-%dT%H:%M")
    return {
        "backup-now": {"kind": "logical"},
        "drill-new": {"title": "Annual drill", "started_at": declared},
        "drill-edit": {"title": "drill, renamed", "started_at": declared, "lessons_learned": "keep the runbook"},
        "drill-step": {"who": "alice", "started_at": later, "outcome": "ok"},
        "maintenance-complete": {"evidence": f"restore_test:{catalog[RestoreTest].pk}"},
        "schedule-edit": {"job": "logical", "cron": "0 2 * * *", "enabled": "on"},
        "critical-tables-edit": {"tables": ""},  # none: checked without reaching the server
        "alert-acknowledge": {"note": "seen, on it"},
    }.get(name, {"kind": "logical"})


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
    """Every POST, to every portal page and every admin page, whatever it would do."""
    client.force_login(make_user("audrey", "Auditor"))
    count = JournalEntry.objects.count()
    for _name, _method, url in portal_urls(catalog):
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
