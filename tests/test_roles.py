"""Every page needs one of the three roles; approval needs a DBA, superuser or not; 403s are one
log line; every response carries a Content-Security-Policy without inline scripts.

The pages are walked from the URL resolver and the admin's registry, not from a list written
here: a page added later is covered without touching this file."""

import logging
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib import admin
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.urls.converters import IntConverter, PathConverter, SlugConverter, StringConverter, UUIDConverter

from backupportal.models import JournalEntry
from restores.models import RestoreRequest
from tests.helpers import make_user

# The public pages: the login, and /metrics, which answers its bearer token only.
PUBLIC = {"login", "metrics", "oidc-login", "oidc-callback"}
# The way out, open to anyone logged in; and one's own second factor, which shows nothing of the
# portal (a superuser without a role enrols there before the admin opens).
WAY_OUT = {"logout"} | {
    "two-factor",
    "two-factor-start",
    "two-factor-enrol",
    "two-factor-confirm",
    "two-factor-recovery",
    "two-factor-codes",
    "two-factor-verify",
}


def _sample(converter, catalog):
    """A value for one URL parameter: the catalog's own objects, so that a page let through
    by mistake would show a real server's name and DSN."""
    if isinstance(converter, IntConverter):
        return 1
    if isinstance(converter, SlugConverter):
        return "assessment"  # a drill step's name
    if isinstance(converter, UUIDConverter):
        return "00000000-0000-0000-0000-000000000001"
    if isinstance(converter, StringConverter | PathConverter):
        return catalog["server"].name
    raise AssertionError(f"no sample value for {type(converter).__name__}: add one here")


def resolver_urls(catalog, resolver=None, prefix=""):
    """(view name, url) for every pattern of the portal outside the admin, parameters filled."""
    resolver = resolver or get_resolver()
    for p in resolver.url_patterns:
        if isinstance(p, URLResolver):
            if p.namespace != "admin":
                yield from resolver_urls(catalog, p, prefix)
        elif isinstance(p, URLPattern) and p.name:
            kwargs = {k: _sample(c, catalog) for k, c in getattr(p.pattern, "converters", {}).items()}
            yield p.name, reverse(p.name, kwargs=kwargs)


def admin_urls(catalog):
    """The admin's index and every registered model's changelist, add and change pages."""
    yield reverse("admin:index")
    for model in admin.site._registry:
        info = model._meta.app_label, model._meta.model_name
        yield reverse("admin:{}_{}_changelist".format(*info))
        yield reverse("admin:{}_{}_add".format(*info))
        obj = catalog.get(model) or model._default_manager.first()
        if obj is not None:
            yield reverse("admin:{}_{}_change".format(*info), args=[obj.pk])


def assert_no_role_page(response, catalog, what):
    page = response.content.decode()
    assert response.status_code == 403, (what, response.status_code)
    assert "none of the portal's roles" in page, what
    server = catalog["server"]
    assert server.name not in page and server.dsn not in page, what


def test_every_url_of_the_resolver_is_walked(catalog):
    names = {name for name, _url in resolver_urls(catalog)}
    assert {"dashboard", "server", "restore-request-approve", "drill-step", "journal-export"} <= names
    assert len(list(admin_urls(catalog))) > 3 * 10


def test_a_user_with_no_role_gets_a_page_saying_so_on_every_page_and_action(client, catalog):
    nobody = make_user("nora")  # logged in, staff, but in no group
    client.force_login(nobody)
    count = JournalEntry.objects.count()
    for name, url in resolver_urls(catalog):
        if name in PUBLIC | WAY_OUT:
            continue
        assert_no_role_page(client.get(url), catalog, ("GET", url))
        assert_no_role_page(client.post(url, {"kind": "logical", "note": "x"}), catalog, ("POST", url))
    for url in admin_urls(catalog):
        assert_no_role_page(client.get(url), catalog, ("GET", url))
        assert_no_role_page(client.post(url, {"name": "x"}), catalog, ("POST", url))
    assert JournalEntry.objects.count() == count  # nothing was done
    assert catalog[RestoreRequest].status == "pending"


def test_the_login_page_stays_public_and_metrics_keep_their_token(client, catalog, settings):
    assert client.get(reverse("login")).status_code == 200
    client.force_login(make_user("nora"))
    settings.METRICS_TOKEN = "t0ken-for-prometheus"
    assert client.get(reverse("metrics")).status_code == 401
    assert client.get(reverse("metrics"), headers={"Authorization": "Bearer t0ken-for-prometheus"}).status_code == 200
    assert client.get(reverse("login")).status_code == 200
    assert client.post(reverse("logout")).status_code == 302  # the way out stays open


def test_a_superuser_without_a_role_keeps_the_admin_but_not_the_portal(client, catalog):
    root = make_user("root-user", superuser=True)
    client.force_login(root)
    assert_no_role_page(client.get(reverse("dashboard")), catalog, "dashboard")
    assert_no_role_page(client.get(reverse("server", args=["maldives"])), catalog, "server")
    assert client.get(reverse("admin:django_q_schedule_changelist")).status_code == 200
    assert client.get(reverse("admin:auth_user_changelist")).status_code == 200


def test_each_role_still_reads_the_dashboard(client, catalog):
    for role in ("DBA", "Sysadmin", "Auditor"):
        client.force_login(make_user(f"user-{role.lower()}", role))
        assert client.get(reverse("dashboard")).status_code == 200, role


@pytest.mark.parametrize("role", [None, "Sysadmin", "Auditor"])
def test_a_superuser_who_is_not_a_dba_cannot_approve_or_reject(client, catalog, role):
    request = catalog[RestoreRequest]
    root = make_user("root-user", role, superuser=True)
    client.force_login(root)
    for action in ("restore-request-approve", "restore-request-reject"):
        response = client.post(reverse(action, args=[request.pk]), {"note": "looks fine"})
        assert response.status_code == 403, (role, action)
    request.refresh_from_db()
    assert request.status == "pending" and request.decided_by is None


def test_the_model_refuses_a_superusers_approval_and_ones_own(catalog):
    from django.core.exceptions import PermissionDenied

    request = catalog[RestoreRequest]
    with pytest.raises(PermissionDenied, match="Only a DBA"):
        request.approve(make_user("root-user", superuser=True))
    with pytest.raises(PermissionDenied, match="Only a DBA"):
        request.reject(make_user("sam-root", "Sysadmin", superuser=True))
    with pytest.raises(PermissionDenied, match="your own"):
        request.approve(request.requested_by)  # "owner" is a DBA, and the author
    request.refresh_from_db()
    assert request.status == "pending"


def test_a_dba_who_is_also_superuser_approves_anothers_request_but_never_their_own(client, catalog):
    from django_q.models import OrmQ

    request = catalog[RestoreRequest]
    client.force_login(request.requested_by)
    assert client.post(reverse("restore-request-approve", args=[request.pk])).status_code == 403
    dba_root = make_user("dba-root", "DBA", superuser=True)
    client.force_login(dba_root)
    page = client.get(reverse("restore-request", args=[request.pk])).content.decode()
    assert 'id="reject"' in page  # the buttons are shown to the DBA who may decide
    OrmQ.objects.all().delete()
    response = client.post(reverse("restore-request-reject", args=[request.pk]), {"note": "not now"})
    assert response.status_code == 302
    request.refresh_from_db()
    assert request.status == "rejected" and request.decided_by == dba_root


def test_a_403_is_logged_in_one_line_without_a_traceback(client, catalog):
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(logging.Formatter("%(levelname)s %(message)s").format(record))

    handler = Collect()
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    try:
        client.force_login(make_user("carol", "Auditor"))
        response = client.post(reverse("backup-now", args=["maldives"]), {"kind": "logical"})
        assert response.status_code == 403
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and "Traceback" not in lines[0]
    assert "/servers/maldives/backup/" in lines[0] and "user=carol" in lines[0]
    assert "Auditors read the portal and change nothing." in lines[0]


def test_every_response_carries_a_csp_that_allows_no_inline_script(client, catalog):
    client.force_login(make_user("dora", "DBA"))
    for url in (reverse("dashboard"), reverse("login"), reverse("admin:index"), "/no-such-page/"):
        policy = client.get(url).headers.get("Content-Security-Policy", "")
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["script-src"] == "'self'", url
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, url
        assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'", url


INLINE = [
    (re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I), "an inline <script>"),
    (re.compile(r"\son[a-z]+\s*=", re.I), "an inline event handler"),
    (re.compile(r"javascript:", re.I), "a javascript: URL"),
    (re.compile(r"<style|\sstyle\s*=", re.I), "an inline style"),
]


def test_no_template_holds_inline_script_or_style():
    for path in sorted(Path(settings.BASE_DIR, "templates").rglob("*.html")):
        text = path.read_text()
        for pattern, what in INLINE:
            assert not pattern.search(text), f"{path}: {what}; move it to a file under static/"
