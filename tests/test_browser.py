"""The portal in a real browser: Debian's chromium driven by Playwright, against a running portal
(gunicorn) with a real django-q2 worker (qcluster) and a real PostgreSQL cluster."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from backupportal.lib.pgcluster import free_port
from tests.conftest import DEMO_PASSWORD, make_user, portal_env

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser_cluster(pg_base_dir, pg_template):
    """One sample cluster for the module: loading it is the slow part of each test."""
    from backupportal.lib.pgcluster import Cluster
    from tests.conftest import load_sample

    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    cluster.start()
    load_sample(cluster, users=200, audit_logs=2000, financial_records=1000)
    yield cluster
    cluster.destroy()


@pytest.fixture
def server(browser_cluster, db):
    from tests.conftest import register

    yield register(browser_cluster)
    for (name,) in browser_cluster.execute("SELECT datname FROM pg_database WHERE datname LIKE 'restored%'"):
        browser_cluster.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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
    url = f"http://127.0.0.1:{port}"
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
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


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


def test_a_dba_backs_up_now_and_watches_it_succeed(portal, browser, db):
    make_user("alice", "DBA")
    page = log_in(browser, portal, "alice")
    page.click("text=maldives")
    page.click("button:has-text('Back up now (logical)')")
    page.wait_for_url("**/runs/*/")
    # The page follows the run by itself until it succeeds.
    page.wait_for_selector("#run-status:has-text('succeeded')", timeout=120000)
    assert "sha256" in page.content()
    page.goto(portal + "/")
    shot(page, "dashboard")
    page.click("text=maldives")
    shot(page, "server-page")
    page.set_viewport_size({"width": 800, "height": 1000})  # a tablet
    shot(page, "server-page-tablet")


def test_one_dba_requests_a_restore_another_approves_and_it_finishes(portal, browser, db, settings):
    from io import StringIO

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
    from io import StringIO

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
    assert "rows in audit_logs" in page.content() and "Measured RTO" in page.content()
    shot(page, "restore-test")
