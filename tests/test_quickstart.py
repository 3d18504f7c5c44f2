"""The README's Quick start: the embedded default needs no service, production passes
`check --deploy`, and the demo sets itself up, serves the portal and stops on Ctrl-C.

Everything runs in subprocesses with an environment built here, so the CI's DATABASE_URL
never reaches them. (The demo also overrides a .env; `manage.py` would read one, so the
tests of the defaults skip when a .env lies beside it.)
"""

import http.cookiejar
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from backupportal.lib.osuser import free_port
from backupportal.lib.pgcluster import Cluster
from backupportal.lib.pgdatadir import pg_bin
from tests.chromium import chromium
from tests.helpers import running_in

BASE_DIR = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, str(BASE_DIR / "scripts" / "demo.py")]


def manage(*args, env):
    return subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), *args],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows(db, query, params=()):
    with sqlite3.connect(db) as conn:
        return conn.execute(query, params).fetchall()


def mode(path):
    return Path(path).stat().st_mode & 0o777


no_dotenv = pytest.mark.skipif((BASE_DIR / ".env").exists(), reason="a .env beside manage.py sets the defaults")


@no_dotenv
def test_the_portal_runs_with_no_service_at_all(tmp_path):
    env = {"VAR_DIR": str(tmp_path)}  # no DATABASE_URL, no Q_BROKER_URL, nothing else

    migrated = manage("migrate", env=env)
    checked = manage("check", env=env)

    assert migrated.returncode == 0, migrated.stderr
    assert checked.returncode == 0, checked.stderr
    assert "System check identified no issues" in checked.stdout
    db = tmp_path / "portal.sqlite3"
    assert rows(db, "SELECT count(*) FROM django_migrations WHERE app = 'backups'")[0][0] >= 1
    assert {name for (name,) in rows(db, "SELECT name FROM auth_group")} == {"DBA", "Sysadmin", "Auditor"}
    # django-q2's ORM broker keeps its queue in the same database.
    assert rows(db, "SELECT name FROM sqlite_master WHERE name = 'django_q_ormq'")
    assert mode(tmp_path / "secret_key") == 0o600


@no_dotenv
def test_a_command_starts_without_djangos_system_checks(tmp_path):
    """They import the URLconf and every view before each command: half a second of every start
    of a command (a PITR's, a backup's), measured; `manage.py check` still runs them."""
    env = {"VAR_DIR": str(tmp_path)}
    assert manage("migrate", env=env).returncode == 0
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(BASE_DIR / "manage.py"), "verify", "999999"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "unknown run #999999" in done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert "backups.models.runs" in imported and not imported & {"backups.views", "restores.views", "watching.views"}


def production_env(tmp_path, **extra):
    return {
        "VAR_DIR": str(tmp_path),
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "backups.reliabilitymaldives.mv",
        "DEBUG": "false",
        **extra,
    }


@no_dotenv
def test_production_settings_pass_check_deploy(tmp_path):
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNING" not in result.stderr


@no_dotenv
def test_a_key_derivation_below_the_strategys_fails_check_deploy(tmp_path):
    env = production_env(tmp_path, GPG_S2K_COUNT="65536")  # what the test settings use, for speed

    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)

    assert result.returncode != 0
    assert "backups.W001" in result.stderr and "GPG_S2K_COUNT is 65536" in result.stderr


@no_dotenv
def test_plain_http_as_in_the_demo_fails_check_deploy(tmp_path):
    env = production_env(tmp_path, SECURE_SSL_REDIRECT="false")

    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)

    assert result.returncode != 0
    assert "security.W008" in result.stderr  # SECURE_SSL_REDIRECT off


def test_env_example_documents_every_setting_and_changes_nothing():
    settings_py = (BASE_DIR / "backupportal" / "settings.py").read_text()
    read = set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z0-9_]+)"', settings_py))
    read |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z0-9_]+)"', settings_py))
    read |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # boto3 reads them
    lines = (BASE_DIR / ".env.example").read_text().splitlines()
    documented = {m.group(1) for line in lines if (m := re.match(r"#([A-Z0-9_]+)=", line))}

    assert "DATABASE_URL" in read and "VAR_DIR" in read  # the patterns above still find them
    assert read - documented == set()
    assert all(line.startswith("#") for line in lines if line.strip())  # copied to .env, it sets nothing


def test_readme_quick_start_is_two_make_targets_and_works_marks_only_real_commands():
    from django.core.management import get_commands

    readme = (BASE_DIR / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    makefile = (BASE_DIR / "Makefile").read_text()
    working = re.findall(r"^manage\.py (\w+) .*\bWorks\b", readme, flags=re.MULTILINE)

    assert quick_start.split("\n") == ["", "make demo", "make test", ""]
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert working and set(working) <= set(get_commands())


# --- The demo -----------------------------------------------------------------------------


def demo_env(var):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "VAR_DIR": str(var), "LANG": "C.UTF-8"}
    # The demo collects the static files: into its own var/, not the checkout's staticfiles/, which
    # every other test's WhiteNoise reads (a file replaced under it failed a page test in CI).
    env["STATIC_ROOT"] = str(var / "static")
    if os.environ.get("PG_BIN"):
        env["PG_BIN"] = os.environ["PG_BIN"]
    return env


def read_logins(var):
    lines = (var / "demo-passwords.txt").read_text().splitlines()
    return {f[0]: (f[1], f[2]) for f in (line.split("\t") for line in lines if not line.startswith("#"))}


def recorded_cluster(var):
    return Cluster(Path((var / "demo" / "cluster-datadir").read_text().strip()))


@pytest.fixture(scope="module")
def demo_var():
    """A var/ directory in which the demo's set-up ran once (small data)."""
    var = Path(tempfile.mkdtemp(prefix="bp-demo-"))
    os.chmod(var, 0o755)  # the postgres OS user reaches the cluster under var/demo/
    result = subprocess.run(
        [*DEMO, "--setup-only", "--size", "small"],
        env=demo_env(var),
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (var / "setup.out").write_text(result.stdout)
    yield var
    if (var / "demo" / "cluster-datadir").exists():
        recorded_cluster(var).destroy()
    shutil.rmtree(var, ignore_errors=True)


def test_the_demo_setup_registers_a_sample_server_with_users_and_a_first_backup(demo_var):
    db = demo_var / "portal.sqlite3"
    out = (demo_var / "setup.out").read_text()

    for secret in ("backup-passphrase", "journal.key", "demo-passwords.txt", "portal.sqlite3"):
        assert mode(demo_var / secret) == 0o600, secret
    cluster = recorded_cluster(demo_var)
    assert cluster.datadir.is_relative_to(demo_var / "demo")
    assert not cluster.is_running()  # --setup-only stops it

    logins = read_logins(demo_var)
    assert {name: role for name, (role, _) in logins.items()} == {
        "alice": "DBA",
        "bob": "DBA",
        "charlie": "Auditor",
        "sam": "Sysadmin",
    }
    users = dict(
        rows(
            db,
            "SELECT u.username, g.name FROM auth_user u JOIN auth_user_groups ug ON ug.user_id = u.id "
            "JOIN auth_group g ON g.id = ug.group_id",
        )
    )
    assert users == {name: role for name, (role, _) in logins.items()}
    hashes = dict(rows(db, "SELECT username, password FROM auth_user"))
    for name, (_, password) in logins.items():
        assert password in out  # printed once at the end...
        assert PBKDF2PasswordHasher().verify(password, hashes[name])  # ...and the login works
        assert password not in json.dumps(rows(db, "SELECT * FROM backupportal_journalentry"))

    (dsn, critical) = rows(
        db,
        "SELECT s.dsn, d.critical_tables FROM backups_server s JOIN backups_database d ON d.server_id = s.id "
        "WHERE s.name = 'maldives' AND d.name = 'reliabilitymaldives'",
    )[0]
    assert dsn == cluster.dsn("reliabilitymaldives")
    # The strategy's four, passed explicitly: a server registered without them has none.
    assert json.loads(critical) == ["public.users", "public.roles", "public.audit_logs", "public.financial_records"]
    runs = rows(db, "SELECT kind, status, key, size FROM backups_backuprun ORDER BY id")
    # A logical backup, and a base backup of the cluster that archives its WAL: the dashboard
    # shows an achieved RPO, and a point-in-time restore can be asked for from the start.
    assert [(kind, status) for kind, status, _, _ in runs] == [("logical", "succeeded"), ("base", "succeeded")]
    assert rows(db, "SELECT archiving FROM backups_server") == [("push",)]
    conf = (cluster.datadir / "postgresql.conf").read_text()
    assert "archive_mode = on" in conf and "archive_command = " in conf
    actions = {a for (a,) in rows(db, "SELECT action FROM backupportal_journalentry")}
    assert {"server_added", "user_created"} <= actions

    # The backup is a real one: gpg with the demo's passphrase, then pg_restore, read it.
    dump = demo_var / "backups" / runs[0][2]
    gpg = subprocess.run(
        ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--homedir", str(demo_var / "gnupg")]
        + ["--passphrase-file", str(demo_var / "backup-passphrase"), "--decrypt", str(dump)],
        capture_output=True,
        check=True,
    )
    listing = subprocess.run(
        [str(pg_bin() / "pg_restore"), "--list"], input=gpg.stdout, capture_output=True, check=True
    ).stdout.decode()
    assert "TABLE DATA public financial_records" in listing


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def log_in(base, username, password):
    """A browser's login: the form, its CSRF token, the POST; returns the opener and the page."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = opener.open(base + "login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    data = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "username": username, "password": password})
    response = opener.open(urllib.request.Request(base + "login/", data=data.encode(), headers={"Referer": base}))
    return opener, response.url, response.read().decode()


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def point_in_time_restore_in_a_browser(base, logins):
    """Alice asks for the sample database as it was a moment ago, in a sandbox cluster; Bob
    approves; the page follows the restore until it succeeds. Returns the sandbox's directory."""
    moment = datetime.now(UTC).isoformat(sep=" ", timespec="seconds")
    with chromium() as browser:
        page = browser_log_in(browser, base, "alice", logins)
        page.goto(base + "restores/new/")
        page.select_option("select[name=server]", label="maldives")
        page.select_option("select[name=destination]", value="sandbox_cluster")
        page.fill("input[name=target_time]", moment)
        page.fill("textarea[name=reason]", "what did financial_records hold a minute ago?")
        page.click("button:has-text('Send the request')")
        page.wait_for_selector("text=another DBA must approve it")
        request_url = page.url

        page = browser_log_in(browser, base, "bob", logins)
        page.goto(request_url)
        page.click("#approve")
        page.wait_for_selector("#request-status:has-text('Succeeded')", timeout=240000)
        page.reload()
        assert "sandbox running" in page.inner_text(".restore-run")
        datadir = page.inner_text(".restore-run").split("a new cluster in ", 1)[1].split(",", 1)[0]
    return Path(datadir.strip())


def browser_log_in(browser, base, username, logins):
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.set_default_timeout(30000)
    page.goto(base + "login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", logins[username][1])
    page.click("button[type=submit]")
    page.wait_for_url(base)
    return page


def test_the_demo_serves_the_portal_and_ctrl_c_stops_everything(demo_var):
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    datadir_before = recorded_cluster(demo_var).datadir
    logins = read_logins(demo_var)
    with open(demo_var / "serve.out", "w") as out:
        demo = subprocess.Popen(
            [*DEMO, "--size", "small", "--port", str(port)],
            env=demo_env(demo_var),
            cwd=BASE_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "The portal is running" in (demo_var / "serve.out").read_text(), 120, "the demo to serve")
        state = json.loads((demo_var / "demo" / "running.json").read_text())

        opener, landed, page = log_in(base, "alice", logins["alice"][1])
        assert landed == base and "maldives" in page and "DBA" in page
        css = re.search(r'href="(/static/[^"]+\.css)"', page).group(1)
        assert opener.open(base + css.lstrip("/")).status == 200  # whitenoise, collected files
        with pytest.raises(urllib.error.HTTPError) as missing:
            opener.open(base + "no-such-page/")
        assert missing.value.code == 404 and b"Traceback" not in missing.value.read()  # DEBUG is off

        # A second run reused the cluster, the users and the first backup.
        assert recorded_cluster(demo_var).datadir == datadir_before
        assert read_logins(demo_var) == logins
        assert len(rows(demo_var / "portal.sqlite3", "SELECT id FROM backups_backuprun")) == 2  # logical, base

        # The headline from the start: a point-in-time restore into a sandbox, asked for by one
        # DBA and approved by the other in a browser, runs and leaves a cluster for them.
        sandbox = point_in_time_restore_in_a_browser(base, logins)
        assert Cluster(sandbox).is_running()

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=90) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
    for name in ("web", "worker"):
        assert not alive(state[name]), f"the {name} (pid {state[name]}) outlived Ctrl-C"
    assert not recorded_cluster(demo_var).is_running()
    assert not Cluster(sandbox).is_running()  # stopped, kept: the portal removes it when it expires
    assert not (demo_var / "demo" / "running.json").exists()
    assert not answers(base + "login/")
    assert running_in(b"gpg-agent", demo_var) == []  # found by review: the signing key's agent outlived the demo
