"""No input makes a 500: every form of the portal and the admin, as each role, with a real CSRF token.

The forms are found, not listed: every page of the URL resolver and every add, change and list
page of the admin's registry is opened as each role, and each <form> on it is parsed. From the
values and choices the page offers, a plausible submission is built; then one field at a time is
changed to an empty, huge, far-past, far-future, NUL or malformed value and sent. Any response
is fine but an error of the server.

Tasks are queued, not run inline (a valid "Back up now" must not start a real pg_dump per
mutation): the fuzz is about the web's input handling, and the queue is left as a worker finds it.
"""

import re
import time
from html.parser import HTMLParser
from urllib.parse import urlencode, urljoin, urlsplit

import pytest
from django.contrib import admin
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.urls.converters import IntConverter, PathConverter, SlugConverter, StringConverter
from django.utils import timezone

from tests.helpers import make_user

ROLES = ["DBA", "Sysadmin", "Auditor"]
# The 500s this fuzz finds in inputs other engineers own are reported, not fixed here (issue 17).
BUDGET_SECONDS = 300  # 75 forms now (second factor, channels, evidence, change requests)

# Every field gets these; then more by what the field holds.
ANY = [
    ("empty", ""),
    ("NUL", "a\x00b"),
    ("huge number", "99999999999999999999999"),
    ("malformed", "not-a-value"),
]
TEXT = [("huge text", "x" * 20_000), ("malformed JSON", '{"a": [1, '), ("JSON with NUL", '["a\\u0000b"]')]
NUMBER = [("negative", "-1"), ("float overflow", "1e999")]
MOMENT = [
    ("far past", "0001-01-01T00:00"),
    ("far past with offset", "0001-01-01 00:00:00+05:00"),
    ("far past date", "0001-01-01"),
    ("far future", "9999-12-31T23:59"),
    ("far future with offset", "9999-12-31 23:59:59-12:00"),
]
ROW = re.compile(r"-\d+-")
LOOKS_TEMPORAL = re.compile(r"(date|time|_at|_on|from|to)(_\d)?$|^\d{4}-\d\d-\d\d")


def mutations(field):
    """The values one field is tried with: ANY, and more by its kind, its name or its value."""
    kind, name, value = field["kind"], field["name"], field.get("value") or ""
    found = list(ANY)
    if kind in ("text", "textarea", "hidden", "search", "email", "url", "password"):
        found += TEXT
    if kind == "number" or value.lstrip("-").isdigit():
        found += NUMBER
    if kind in ("date", "datetime-local", "time") or LOOKS_TEMPORAL.search(name) or LOOKS_TEMPORAL.search(value):
        found += MOMENT
    if kind == "select":
        # The other choices the page offers, one at a time: the form's other branches.
        found += [(f"choice {v!r}", v) for v, _ in field["options"][:6] if v]
    return found


# Never changed: the token itself, and what only says which button was pressed.
FIXED = {"csrfmiddlewaretoken"}


class Forms(HTMLParser):
    """Every <form> of a page: its method, action and fields, as a browser would submit them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms, self.form, self.select, self.textarea = [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.form = {"method": (a.get("method") or "get").lower(), "action": a.get("action") or "", "fields": []}
            self.forms.append(self.form)
        elif self.form is None or a.get("disabled") is not None:
            return
        elif tag == "input" and a.get("name"):
            self.form["fields"].append({"kind": (a.get("type") or "text").lower(), **a})
        elif tag == "button" and a.get("name"):
            self.form["fields"].append({"kind": "button", **a})
        elif tag == "select" and a.get("name"):
            self.select = {"kind": "select", "options": [], **a}
            self.form["fields"].append(self.select)
        elif tag == "option" and self.select is not None:
            self.select["options"].append((a.get("value", ""), "selected" in a))
        elif tag == "textarea" and a.get("name"):
            self.textarea = {"kind": "textarea", "value": "", **a}
            self.textarea_start = True
            self.form["fields"].append(self.textarea)

    def handle_data(self, data):
        if self.textarea is not None:
            if self.textarea_start and data.startswith("\n"):
                data = data[1:]  # as browsers do: the newline right after <textarea> is not content
            self.textarea["value"] += data
            self.textarea_start = False

    def handle_endtag(self, tag):
        if tag == "form":
            self.form = None
        elif tag == "select":
            self.select = None
        elif tag == "textarea":
            self.textarea = None


def plausible(field):
    """A value a person would give the field: what the page shows, else one by its type."""
    kind, value = field["kind"], field.get("value") or ""
    if kind == "select":
        chosen = [v for v, selected in field["options"] if selected and (v or "required" not in field)]
        offered = [v for v, _ in field["options"] if v]
        return chosen or offered[:1] or [""]
    if value or "required" not in field:
        return [value]
    now = timezone.localtime()
    by_type = {
        "number": "1",
        "date": f"{now:%Y-%m-%d}",
        "datetime-local": f"{now:%Y-%m-%dT%H:%M}",
        "email": "dba@example.mv",
        "url": "https://example.mv/",
        "password": "Fuzz-password-42",
    }
    return [by_type.get(kind, "fuzz")]


def submission(form):
    """{name: [values]} of a plausible submission: checked boxes, the first named button."""
    data, button = {}, False
    for field in form["fields"]:
        kind, name = field["kind"], field["name"]
        if kind in ("checkbox", "radio"):
            if "checked" in field:
                data.setdefault(name, []).append(field.get("value", "on"))
        elif kind in ("button", "submit", "image"):
            if not button:
                data[name], button = [field.get("value", "")], True
        elif kind not in ("file", "reset"):
            data.setdefault(name, []).extend(plausible(field))
    return data


def _sample(converter, catalog):
    if isinstance(converter, IntConverter):
        return 1
    if isinstance(converter, SlugConverter):
        return "assessment"
    if isinstance(converter, StringConverter | PathConverter):
        return catalog["server"].name
    raise AssertionError(f"no sample value for {type(converter).__name__}")


def resolver_pages(catalog, resolver=None):
    resolver = resolver or get_resolver()
    for p in resolver.url_patterns:
        if isinstance(p, URLResolver):
            if p.namespace != "admin":
                yield from resolver_pages(catalog, p)
        elif isinstance(p, URLPattern) and p.name and p.name not in ("logout", "metrics"):
            kwargs = {k: _sample(c, catalog) for k, c in getattr(p.pattern, "converters", {}).items()}
            yield reverse(p.name, kwargs=kwargs)


def admin_pages(catalog):
    for model in admin.site._registry:
        info = model._meta.app_label, model._meta.model_name
        yield reverse("admin:{}_{}_changelist".format(*info))
        yield reverse("admin:{}_{}_add".format(*info))
        obj = catalog.get(model) or model._default_manager.first()
        if obj is not None:
            yield reverse("admin:{}_{}_change".format(*info), args=[obj.pk])


class Fuzzer:
    def __init__(self, deadline):
        self.deadline, self.seen, self.errors, self.sent, self.timings = deadline, set(), [], 0, []
        self.valid, self.unaccepted = 0, []  # forms for which a submission they accept was (not) found

    def forms_on(self, client, page):
        response = client.get(page)
        if response.status_code != 200 or "html" not in response.get("Content-Type", ""):
            return []
        parser = Forms()
        parser.feed(response.content.decode())
        return [f for f in parser.forms if "logout" not in f["action"]]

    def fuzz(self, client, who, page):
        for form in self.forms_on(client, page):
            target = urljoin(page, form["action"]) if form["action"] else page
            base = submission(form)
            fields = {}
            for f in form["fields"]:
                # One row of a formset stands for all: steps-0-who, not steps-1-who ... steps-7-who.
                shape = ROW.sub("-N-", f["name"])
                if f["name"] in base and f["name"] not in FIXED and shape not in {ROW.sub("-N-", n) for n in fields}:
                    fields[f["name"]] = f
            key = (urlsplit(target).path, form["method"], tuple(sorted(base)))
            if key in self.seen:
                continue  # the same form, found by another role or on another page
            self.seen.add(key)
            started = time.monotonic()
            if form["method"] == "post":
                base = self.valid_base(client, who, target, base, fields)
            for name, field in fields.items():
                for label, value in mutations(field):
                    if time.monotonic() > self.deadline:
                        self.errors.append(f"the fuzz took longer than {BUDGET_SECONDS} s: make it smaller")
                        return
                    self.send(client, who, form["method"], target, {**base, name: [value]}, name, label)
            self.timings.append((time.monotonic() - started, form["method"], target, len(base)))

    def valid_base(self, client, who, target, base, fields):
        """From the plausible submission towards one the form accepts: one field at a time, try
        the other choices offered (or a value for an empty field) and keep what leaves fewer
        errors on the page. Mutations then start from a submission that reaches the save."""
        errors = error_count(self.send(client, who, "post", target, base, "(as offered)", ""))
        for name, field in fields.items():
            if errors == 0:
                break
            for value in alternatives(field, base[name]):
                trial = {**base, name: [value]}
                found = error_count(self.send(client, who, "post", target, trial, name, f"trying {value!r}"))
                if found < errors:
                    base, errors = trial, found
                    break
        if errors == 0:
            self.valid += 1
        else:
            self.unaccepted.append(f"{who} {target}")
        return base

    def send(self, client, who, method, url, data, field, label):
        self.sent += 1
        try:
            # A savepoint per request: on PostgreSQL an error would end the test's transaction.
            with transaction.atomic():
                if method == "post":
                    response = client.post(url, data)
                else:
                    response = client.get(urlsplit(url).path + "?" + urlencode(data, doseq=True))
        except Exception as e:  # the test client re-raises what the view raised: that is the 500
            self.errors.append(f"{who} {method.upper()} {url} {field}={label}: {type(e).__name__}: {e}"[:400])
            return None
        if response.status_code >= 500:
            self.errors.append(f"{who} {method.upper()} {url} {field}={label}: HTTP {response.status_code}")
        return response


def error_count(response):
    """0 when the form was accepted (a redirect), else the errors shown on the page."""
    if response is None or response.status_code >= 400:
        return float("inf")
    if 300 <= response.status_code < 400:
        return 0
    page = response.content.decode()
    return page.count('class="errorlist') + page.count('class="error"') or float("inf")


def alternatives(field, current):
    """Other values a person could give the field: the other choices, or one for an empty field."""
    if field["kind"] == "select":
        return [v for v, _ in field["options"][:6] if v and [v] != current]
    if field["kind"] in ("checkbox", "radio", "button", "submit", "hidden") or any(current):
        return []
    return plausible({**field, "required": ""})


@pytest.fixture
def queued_tasks(monkeypatch):
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", False)


def test_no_form_input_makes_a_server_error(catalog, queued_tasks):
    fuzzer = Fuzzer(time.monotonic() + BUDGET_SECONDS)
    anonymous = Client(enforce_csrf_checks=True)
    fuzzer.fuzz(anonymous, "anonymous", reverse("login"))
    for role in ROLES:
        client = Client(enforce_csrf_checks=True)
        client.force_login(make_user(f"fuzz-{role.lower()}", role))
        for page in [*resolver_pages(catalog), *admin_pages(catalog)]:
            fuzzer.fuzz(client, role, page)
    for seconds, method, target, fields in sorted(fuzzer.timings, reverse=True)[:10]:
        print(f"fuzz: {seconds:6.1f} s {method} {target} ({fields} fields)")  # where the time goes, with -s
    print(f"fuzz: {fuzzer.sent} requests, {len(fuzzer.seen)} forms, {fuzzer.valid} accepted a submission")
    print("fuzz: no accepted submission found for", ", ".join(fuzzer.unaccepted))
    assert fuzzer.sent > 1000  # the forms were found and sent
    assert not fuzzer.errors, f"{len(fuzzer.errors)} server errors:\n" + "\n".join(fuzzer.errors)


# The inputs of issue 17, item 7, each answered by a form error that names the problem.


def test_a_drill_started_in_the_year_1_gets_a_form_error(client, catalog):
    from restores.models import DrDrill

    client.force_login(make_user("dora", "DBA"))
    drill = catalog[DrDrill]
    for url in (reverse("drill-new"), reverse("drill-edit", args=[drill.pk])):
        response = client.post(url, {"title": "Year one", "started_at": "0001-01-01T00:00"})
        assert response.status_code == 200, url
        assert "The year 1 is out of range" in response.context["form"].errors["started_at"][0], url
    assert not DrDrill.objects.filter(title="Year one").exists()


def test_a_drill_naming_a_restore_run_beyond_any_integer_gets_a_form_error(client, catalog):
    client.force_login(make_user("sam-too", "Sysadmin"))
    started = timezone.localtime().strftime("%Y-%m-%dT%H:%M")
    response = client.post(
        reverse("drill-new"), {"title": "t", "started_at": started, "restore_runs": "99999999999999999999999"}
    )
    assert response.status_code == 200
    assert "is not a valid value" in response.context["form"].errors["restore_runs"][0]


def test_a_sandbox_request_for_the_year_1_gets_a_form_error(client, catalog):
    from restores.models import RestoreRequest

    client.force_login(make_user("dora", "DBA"))
    count = RestoreRequest.objects.count()
    response = client.post(
        reverse("restore-request-new"),
        {
            "server": catalog["server"].pk,
            "destination": "sandbox_cluster",
            "target_time": "0001-01-01 00:00:00+05:00",
            "reason": "fuzz",
        },
    )
    assert response.status_code == 200
    assert "The year 1 is out of range" in response.context["form"].errors["target_time"][0]
    assert RestoreRequest.objects.count() == count


def test_a_nul_in_a_filter_or_a_search_is_refused_in_one_line(client, catalog):
    client.force_login(make_user("carol", "Auditor"))
    for url in (reverse("alerts"), reverse("journal"), reverse("admin:backups_backuprun_changelist")):
        for query in ("server=a%00b", "q=%00", "a%00=1"):
            response = client.get(f"{url}?{query}")
            assert response.status_code == 400, (url, query)
            assert response.content.decode().count("\n") == 1 and "NUL character" in response.content.decode()


def test_an_acknowledgement_note_with_a_nul_is_refused_with_a_message(client, catalog):
    from watching.models import Alert

    alert = catalog[Alert]
    client.force_login(make_user("dora", "DBA"))
    response = client.post(reverse("alert-acknowledge", args=[alert.pk]), {"note": "on it\x00"}, follow=True)
    assert "NUL character" in response.content.decode()
    alert.refresh_from_db()
    assert alert.state == "open"


def test_a_filter_out_of_range_is_refused_in_one_line(client, catalog):
    from django.db import connection

    client.force_login(make_user("carol", "Auditor"))
    for url in (
        reverse("admin:backups_backuprun_changelist") + "?created_at__gte=0001-01-01",
        reverse("admin:backupportal_journalentry_changelist") + "?at__gte=0001-01-01+00:00:00",
    ):
        response = client.get(url)
        if connection.vendor == "postgresql":
            assert response.status_code == 200, url  # PostgreSQL holds the year 1: the list, filtered
            continue
        assert response.status_code == 400, url  # SQLite's driver overflows shifting it to UTC
        assert response.content.decode().count("\n") == 1 and "out of range" in response.content.decode()


def test_a_nul_in_a_name_in_the_address_or_a_schedule_job_is_refused_not_a_500(client, catalog):
    server = catalog["server"]
    client.force_login(make_user("dora", "DBA"))
    for path in (f"/servers/{server.name}%00x/", "/servers/a%00b/critical-tables/"):
        response = client.get(path)
        assert response.status_code == 400, path
        assert "NUL character" in response.content.decode()
    edit = reverse("schedule-edit", args=[server.name])
    for job in ("logical\x00", "no such job", ""):
        response = client.post(edit, {"job": job, "cron": "0 1 * * *", "enabled": "on"})
        assert response.status_code == 404, job
