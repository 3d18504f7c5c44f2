"""The portal in a real browser: Debian's chromium driven by Playwright, against a running portal
(gunicorn) with a real django-q2 worker (qcluster) and a real PostgreSQL cluster."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from io import StringIO
from pathlib import Path

import pytest

from backupportal.lib.osuser import free_port
from tests.chromium import chromium
from tests.helpers import DEMO_PASSWORD, descendants, make_user, portal_env

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def browser_cluster(pg_base_dir, pg_template):
    """One sample cluster for the module: loading it is the slow part of each test."""
    from backupportal.lib.pgcluster import Cluster
    from tests.helpers import load_sample

    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    cluster.start()
    load_sample(cluster, users=200, audit_logs=2000, financial_records=1000)
    yield cluster
    cluster.destroy()


@pytest.fixture
def server(browser_cluster, db):
    from tests.helpers import register

    yield register(browser_cluster)
    for (name,) in browser_cluster.execute("SELECT datname FROM pg_database WHERE datname LIKE 'restored%'"):
        browser_cluster.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


class PortalUrl(str):
    """The running portal's base URL; .worker is its qcluster process."""

    worker = None


@pytest.fixture
def portal(settings, server, passphrase_file, backup_root):
    """gunicorn serving the portal and a qcluster worker, both on this test's database."""
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop shares this thread with the ORM
    port = free_port()
    env = portal_env(settings, Q_SYNC="0", DEBUG="false", SECURE_SSL_REDIRECT="false", WHITENOISE_USE_FINDERS="true")
    logs = Path(settings.VAR_DIR) / f"browser-{port}"
    logs.mkdir(exist_ok=True)
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2", "backupportal.wsgi"],
        cwd=ROOT,
        env=env,
        stdout=open(logs / "web.log", "w"),
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=env,
        stdout=open(logs / "worker.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = PortalUrl(f"http://127.0.0.1:{port}")
    url.worker = worker
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/login/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or web.poll() is not None:
                raise AssertionError("the portal did not start: " + (logs / "web.log").read_text()[-2000:]) from None
            time.sleep(0.2)
    yield url
    for proc in (web, worker):
        proc.terminate()
    for proc in (web, worker):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser():
    with chromium() as b:
        yield b


def log_in(browser, url, username, width=1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(20000)
    page.goto(url + "/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", DEMO_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")
    return page


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def assert_fits_a_tablet(page, width=768):
    """No sideways scrolling at a tablet's width: wide tables scroll inside their own cards."""
    page.set_viewport_size({"width": width, "height": 1000})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{page.url} is {overflow}px wider than a {width}px tablet"


def test_a_dba_backs_up_now_and_watches_it_succeed(portal, browser, db):
    make_user("alice", "DBA")
    page = log_in(browser, portal, "alice")
    page.click("text=maldives")
    page.click("button:has-text('Back up now (logical)')")
    page.wait_for_url("**/runs/*/")
    # The page follows the run by itself until it succeeds.
    page.wait_for_selector("#run-status:has-text('succeeded')", timeout=120000)
    assert "sha256" in page.content()
    assert_fits_a_tablet(page)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(portal + "/")
    shot(page, "dashboard")
    page.click("text=maldives")
    shot(page, "server-page")
    assert_fits_a_tablet(page)
    shot(page, "server-page-tablet")
    for path in ["/", "/restores/", "/journal/", "/alerts/", "/drills/", "/maintenance/"]:
        page.goto(portal + path)
        assert_fits_a_tablet(page)


def test_one_dba_requests_a_restore_another_approves_and_it_finishes(portal, browser, db, settings):
    from django.core.management import call_command

    from backups.models import BackupRun

    make_user("alice", "DBA")
    make_user("bob", "DBA")
    call_command("backup", "maldives", stdout=StringIO())
    run = BackupRun.objects.get(status="succeeded")

    page = log_in(browser, portal, "alice")
    page.goto(portal + "/restores/")
    page.click("a:has-text('Request a restore')")
    page.wait_for_url("**/restores/new/")
    page.select_option("select[name=server]", label="maldives")
    page.select_option("select[name=backup_run]", value=str(run.pk))
    page.select_option("select[name=destination]", value="new_database")
    page.fill("input[name=target_database]", "restored_in_browser")
    page.fill("textarea[name=reason]", "checking last night's import")
    page.click("button:has-text('Send the request')")
    page.wait_for_selector("text=another DBA must approve it")
    request_url = page.url
    assert page.query_selector("#approve") is None  # never one's own
    page.close()

    page = log_in(browser, portal, "bob")
    page.goto(request_url)
    page.click("#approve")
    page.wait_for_selector("#request-status:has-text('Succeeded')", timeout=120000)
    shot(page, "restore-request")


def test_an_auditor_finds_no_action_buttons(portal, browser, server):
    from backups.models import BackupRun

    make_user("charlie", "Auditor")
    run = BackupRun.objects.create(server=server, kind="logical", status="failed", error="example")
    page = log_in(browser, portal, "charlie")
    for path in ["/", "/servers/maldives/", f"/runs/{run.pk}/", "/restores/"]:
        page.goto(portal + path)
        assert page.query_selector("main button") is None, path
        assert "Request a restore" not in page.content()
    response = page.goto(portal + "/restores/new/")
    assert response.status == 403
    assert "Traceback" not in page.content()


def test_a_dba_runs_a_restore_test_and_its_page_follows_it_until_it_passes(portal, browser, db):
    from django.core.management import call_command

    make_user("alice", "DBA")
    call_command("backup", "maldives", stdout=StringIO())
    page = log_in(browser, portal, "alice")
    page.goto(portal + "/servers/maldives/")
    page.click("button:has-text('Run a restore test')")
    page.wait_for_url("**/restoretests/*/")
    assert page.text_content("#run-status") in ("queued", "restoring", "checking", "cleaning up", "passed")
    # The page polls the test's progress and shows the end by itself: no manual reload.
    page.wait_for_selector("#run-status:has-text('passed')", timeout=120000)
    assert "row counts of every table" in page.content() and "Measured RTO" in page.content()
    shot(page, "restore-test")


@contextmanager
def paused(process):
    """The worker and its children stopped (SIGSTOP), so the page is seen waiting before it moves."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def post_as_page(page, url):
    """A POST with the page's session and CSRF token, as a hand-made form would send it."""
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    return page.request.post(url, headers={"X-CSRFToken": token}, max_redirects=0)


def test_a_dba_verifies_a_run_and_the_page_follows_it_to_verified(portal, browser, db):
    from django.core.management import call_command

    from backups.models import BackupRun

    make_user("alice", "DBA")
    make_user("charlie", "Auditor")
    call_command("backup", "maldives", stdout=StringIO())
    run = BackupRun.objects.get(status="succeeded")

    page = log_in(browser, portal, "alice")
    page.goto(portal + run.get_absolute_url())
    with paused(portal.worker):
        page.click("#verify")
        page.wait_for_url("**/verifications/*/")
        page.wait_for_selector("#verify-status:has-text('queued')")
        assert "queued as" in page.inner_text(".messages")
    # The worker takes it up: the page follows it by itself until the verdict.
    page.wait_for_selector("#verify-status:has-text('verified')", timeout=60000)
    copies = run.copies.count()
    assert page.inner_text("#verify-copies") == str(copies)
    assert page.inner_text("#verify-bytes") not in ("", "0 bytes")
    assert page.query_selector_all("text=ok") and "Traceback" not in page.content()
    shot(page, "verification")
    assert_fits_a_tablet(page)
    verification_url = page.url

    page = log_in(browser, portal, "charlie")
    page.goto(portal + run.get_absolute_url())
    assert page.query_selector("#verify") is None and page.query_selector("main button") is None
    page.goto(verification_url)  # an auditor may watch one
    assert page.inner_text("#verify-status") == "verified"
    response = post_as_page(page, portal + f"/runs/{run.pk}/verify/")
    assert response.status == 403 and "CSRF" not in response.text()
    assert run.verifications.count() == 1


# --- The Content-Security-Policy in a real browser: the portal's pages and the admin run with no
# violation, the drill report's Print button works from its static script, and an injected
# inline script is refused.

# Before any script of the page: count the violations the browser reports, and record a print.
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
window.print = () => { window.__printed = true; };
"""


def test_pages_run_under_the_policy_and_inline_script_is_refused(portal, browser, server):
    from restores.models import DrDrill

    dora = make_user("dora", "DBA")
    drill = DrDrill.objects.create(title="Annual drill", logged_by=dora, server=server)
    page = log_in(browser, portal, "dora")
    page.add_init_script(WATCH)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    for path in [
        "/",
        f"/servers/{server.name}/",
        "/journal/",
        "/drills/new/",
        f"/drills/{drill.pk}/",
        "/admin/",
        f"/admin/restores/drdrill/{drill.pk}/change/",
    ]:
        page.goto(portal + path)
        page.wait_for_load_state("load")
        assert page.evaluate("window.__violations") == [], path
    page.goto(portal + f"/drills/{drill.pk}/report/")
    page.click("button[data-print]")
    assert page.evaluate("window.__printed") is True  # the static print.js ran
    assert errors == []

    # An inline script that made it into a page (say, by an injection) does not run.
    page.evaluate("""() => {
        const s = document.createElement("script");
        s.textContent = "window.__injected = true";
        document.body.appendChild(s);
    }""")
    page.wait_for_function("window.__violations.length > 0")
    assert page.evaluate("window.__injected") is None
    assert any(v.startswith("script-src") for v in page.evaluate("window.__violations"))
