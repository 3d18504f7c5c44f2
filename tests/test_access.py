"""Every page, as an anonymous visitor, an Auditor, a Sysadmin and a DBA: exactly the access of
DESIGN.md's role table. The expectations are written out here, not derived from the code."""

import pytest
from django.contrib import admin
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from backupportal.models import Alert, JournalEntry, MaintenanceTask
from backups.models import BackupCopy, BackupRun, BackupSchedule, Server, StorageLocation, WalSegment
from restores.models import DrDrill, RestoreRequest, RestoreRun, RestoreTest
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
    "alert-acknowledge": {"DBA", "Sysadmin"},
}
# The documented exception to the login: Prometheus reads /metrics with METRICS_TOKEN, nobody else.
TOKEN_ONLY = {"metrics"}
ROLES = ["DBA", "Sysadmin", "Auditor"]


@pytest.fixture
def catalog(db, settings, tmp_path):
    """One row of every model, so that every detail page has something to show."""
    from django.utils import timezone

    settings.BACKUP_ROOT = tmp_path
    StorageLocation.sync_from_settings()
    owner = make_user("owner", "DBA")
    server = Server.objects.create(
        name="maldives", dsn="postgresql://postgres@127.0.0.1:1/reliabilitymaldives", pg_version=150004
    )
    schedule = BackupSchedule.objects.create(server=server, job="logical", cron="0 2 * * *")
    run = BackupRun.objects.create(
        server=server, kind="logical", status="succeeded", size=10, sha256="a" * 64, finished_at=timezone.now()
    )
    location = StorageLocation.objects.get(name="primary")
    copy = BackupCopy.objects.create(run=run, location=location, key="k", size=10, sha256="a" * 64, status="ok")
    segment = WalSegment.objects.create(
        server=server, timeline=1, name="000000010000000000000001", size=1, sha256="b" * 64, archived_at=timezone.now()
    )
    request = RestoreRequest.objects.create(
        server=server, backup_run=run, destination="new_database", target_database="x", reason="r", requested_by=owner
    )
    restore = RestoreRun.objects.create(kind="logical", server=server, backup_run=run)
    test = RestoreTest.objects.create(server=server, backup_run=run, status="passed")
    drill = DrDrill.objects.create(title="drill", logged_by=owner)
    alert = Alert.objects.create(condition="backup_failed", subject="server:maldives", server=server, message="m")
    task = MaintenanceTask.objects.create(kind="weekly_verify", due_at=timezone.now())
    from backupportal import journal

    entry = journal.record("test", actor="owner")
    objects = [server, schedule, run, location, copy, segment, request, restore, test, drill, alert, task, entry]
    return {type(o): o for o in objects} | {"server": server, "run": run}


def portal_urls(catalog):
    """(name, method, url) for every named pattern outside the admin."""
    args = {
        "server": [catalog["server"].name],
        "backup-now": [catalog["server"].name],
        "run": [catalog["run"].pk],
        "run-progress": [catalog["run"].pk],
        "alert": [catalog[Alert].pk],
        "alert-acknowledge": [catalog[Alert].pk],
    }
    urls = []
    for name in named_patterns():
        if name in ("login", "logout") or name in TOKEN_ONLY:
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
    assert names == {"dashboard", *ACTIONS, *TOKEN_ONLY, "server", "run", "run-progress", "alerts", "alert"}, (
        "a new page needs a line in this test"
    )


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
        response = getattr(client, method)(url, {"kind": "logical", "note": "seen"} if method == "post" else None)
        if method == "get":
            assert response.status_code == 200, (role, url)
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
