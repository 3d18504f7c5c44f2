"""Nothing is cut off: at a laptop's 1366 px and a tablet's 768 px, with long names, long errors
and long notes, no element that hides its overflow holds more than it shows, every container
that scrolls sideways shows that it does, and at 1366 px the columns that matter (who, what,
the outcome, the error) are in view without scrolling."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.conftest import make_user
from tests.test_browser import browser, browser_cluster, log_in, portal, server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LONG_NAME = "maldives-production-primary-" + "x" * 34  # 62: names are at most 63 characters
# An error as PostgreSQL and the tools write them: long, partly without spaces.
LONG_ERROR = (
    "pg_restore: error: could not execute query: ERROR:  relation "
    + "public.a_table_with_a_very_long_name_" * 6
    + " does not exist; /var/lib/backupportal/backups/"
    + "segment/" * 20
)
LONG_NOTE = "The NAS copy was slower than expected because the link was saturated by the nightly sync. " * 6

# What the browser measures on a page: elements hiding overflow that is there, containers that
# scroll without showing it, and whether the page itself scrolls sideways.
MEASURE = """() => {
  const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
    (el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : "");
  const hidden = [], unmarked = [];
  for (const el of document.querySelectorAll("body *")) {
    if (!el.clientWidth) continue;  // inline boxes have no scroll width of their own
    if (el.scrollWidth <= el.clientWidth + 1) continue;
    const x = getComputedStyle(el).overflowX;
    if (x === "hidden" || x === "clip") hidden.push(name(el));
    if ((x === "auto" || x === "scroll") && !getComputedStyle(el).backgroundImage.includes("gradient")) unmarked.push(name(el));
  }
  return {hidden, unmarked, sideways: document.documentElement.scrollWidth - window.innerWidth};
}"""

# The headers of a table whose right edge lies beyond what its container shows.
OUT_OF_VIEW = """(wanted) => {
  const out = [];
  for (const th of document.querySelectorAll("table.list th")) {
    if (!wanted.includes(th.textContent.trim())) continue;
    let box = th.closest(".card") || document.body;
    if (th.getBoundingClientRect().right > box.getBoundingClientRect().right + 1) out.push(th.textContent.trim());
  }
  return out;
}"""

# The selectors whose elements scroll sideways at all: the dashboard's panel and legend must not.
FITS = """(selectors) => selectors.filter((s) =>
  [...document.querySelectorAll(s)].some((el) => el.scrollWidth > el.clientWidth + 1))"""

# Page -> the column headers that must be in view at 1366 px.
MUST_SHOW = {
    "journal": ["Who", "Action", "Server", "Outcome", "Details"],
    "alerts": ["Since", "Last seen", "Resolved", "Mail"],
    "restore": ["Status", "Notes"],
    "coverage": ["Database", "Gaps"],
}


@pytest.fixture
def long_catalog(server):  # noqa: F811
    """Rows with long names, errors and notes on every page a DBA reads daily."""
    from backupportal import journal
    from backups.models import BackupRun, Database, Server
    from restores.models import DrDrill, RestoreRequest, RestoreRun, RestoreTest
    from watching.models import Alert, MaintenanceTask

    dora = make_user("dora", "DBA")
    other = Server.objects.create(name=LONG_NAME, dsn="postgresql://postgres@127.0.0.1:1/" + "d" * 60)
    now = timezone.now()
    failed = BackupRun.objects.create(server=other, kind="logical", status="failed", error=LONG_ERROR, finished_at=now)
    # A database that cannot be backed up, named as long as PostgreSQL allows: a gap with a long why.
    Database.objects.create(server=other, name="x" * 63, state="unreachable", problem=LONG_ERROR[:500])
    good = BackupRun.objects.create(
        server=server, kind="logical", status="succeeded", size=123456789, sha256="a" * 64, finished_at=now
    )
    request = RestoreRequest.objects.create(
        server=server,
        backup_run=good,
        destination="new_database",
        target_database="restored_" + "z" * 50,
        reason=LONG_NOTE,
        requested_by=dora,
    )
    restore = RestoreRun.objects.create(
        kind="logical", server=server, backup_run=good, request=request, status="failed", error=LONG_ERROR
    )
    restore.notes = LONG_NOTE + "\n" + LONG_ERROR
    restore.save()
    test = RestoreTest.objects.create(server=server, backup_run=good, status="failed", error=LONG_ERROR)
    Alert.objects.create(condition="backup_failed", subject=f"server:{LONG_NAME}", server=other, message=LONG_ERROR)
    drill = DrDrill.objects.create(title="Annual drill: " + LONG_NOTE[:120], logged_by=dora, server=other)
    drill.steps.update(notes=LONG_NOTE, who="dora")
    # Something for each of its page's charts to draw.
    BackupRun.objects.create(
        server=other, kind="logical", status="succeeded", size=5 * 2**20, started_at=now, finished_at=now
    )
    RestoreTest.objects.create(server=other, status="passed", duration_s=0.6, started_at=now, finished_at=now)
    # Overdue, and a request by another DBA: both wait for dora on the dashboard.
    overdue = now.date() - timedelta(days=3)
    MaintenanceTask.objects.update_or_create(kind="weekly_verify", completed_at=None, defaults={"due_on": overdue})
    RestoreRequest.objects.create(
        server=other,
        destination="new_database",
        target_database="restored_" + "y" * 50,
        reason=LONG_NOTE,
        requested_by=make_user("erin", "DBA"),
    )
    for _ in range(3):
        journal.record(
            "backup_failed", actor="job:backup", obj=failed, server=LONG_NAME, outcome="failed", error=LONG_ERROR
        )
    return {"run": failed, "request": request, "restore": restore, "test": test, "drill": drill, "other": other}


def pages(objects):
    return {
        "dashboard": "/",
        "server": f"/servers/{objects['other'].name}/",
        "run": f"/runs/{objects['run'].pk}/",
        "restore": f"/restores/{objects['request'].pk}/",
        "restore test": f"/restoretests/{objects['test'].pk}/",
        "alerts": "/alerts/",
        "journal": "/journal/",
        "drills": "/drills/",
        "drill": f"/drills/{objects['drill'].pk}/",
        "maintenance": "/maintenance/",
        "coverage": "/coverage/",
    }


@pytest.mark.parametrize("width", [1366, 768])
def test_nothing_is_cut_off_and_what_scrolls_shows_it(portal, browser, long_catalog, width):  # noqa: F811
    page = log_in(browser, portal, "dora", width=width)
    problems = []
    for label, path in pages(long_catalog).items():
        response = page.goto(portal + path)
        assert response.status == 200, (label, path, response.status)
        found = page.evaluate(MEASURE)
        if found["hidden"]:
            problems.append(f"{label}: cut off in {found['hidden']}")
        if found["unmarked"]:
            problems.append(f"{label}: scrolls without showing it in {found['unmarked']}")
        if found["sideways"] > 0:
            problems.append(f"{label}: the page is {found['sideways']} px wider than the window")
        if label == "dashboard":
            # A request to decide, an alert to acknowledge, a task overdue: the panel is not empty.
            assert page.locator("#waiting li").count() >= 3
            wide = page.evaluate(FITS, ["#waiting", "#waiting li", "#storage p.legend"])
            if wide:
                problems.append(f"dashboard: {wide} wider than they show at {width} px")
        if width == 1366 and label in MUST_SHOW:
            out = page.evaluate(OUT_OF_VIEW, MUST_SHOW[label])
            if out:
                problems.append(f"{label}: {out} out of view at {width} px")
    assert problems == []
