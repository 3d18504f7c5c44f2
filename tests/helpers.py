"""The tests' shared helpers, in one place: test modules import them from here, never from one
another (fixtures stay in conftest.py and walfixtures.py).

WAL and PITR: push or pull archiving on real throwaway clusters; users, servers, commands and
processes; backups, copies and faults; the monitor's mail; every page and action of the portal.
"""

import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from io import StringIO
from pathlib import Path

import psycopg
from django.core.management import CommandError, call_command
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from backupportal.lib import sampledata
from backupportal.lib.osuser import as_db_user
from backupportal.models import JournalEntry
from backups import walingest, walspool
from backups.models import BackupRun, ChangeRequest, Server, Verification
from backups.receiver import Receiver
from restores.models import DrDrill, RestoreRequest, RestoreRun, RestoreTest
from watching.models import Alert, EvidencePack, MaintenanceTask


def run_command(*args):
    """A management command's --json result (exit status included), whatever it exits with."""
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command(*args, "--json", stdout=out, stderr=err)
    except SystemExit as e:
        code = e.code
    except CommandError as e:  # what manage.py prints as one line on stderr, exiting 1
        code = 1
        err.write(str(e))
    lines = out.getvalue().strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    result["_exit"], result["_stderr"] = code, err.getvalue()
    return result


def enable_push(cluster, name="maldives"):
    """What a DBA does: run archivecommand, paste its lines into postgresql.conf, restart."""
    out = StringIO()
    call_command("archivecommand", name, stdout=out)
    lines = [line for line in out.getvalue().splitlines() if line and not line.startswith("#")]
    with open(cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("\n# pasted from manage.py archivecommand\n" + "\n".join(lines) + "\n")
    cluster.restart()
    return lines


def switch_wal(cluster):
    """Force a segment switch; returns the name of the segment just completed."""
    return cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]


def wait_for(predicate, timeout=20, what="condition", every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_archived(cluster, name, timeout=20):
    """Until PostgreSQL's archiver reports `name` (or a later one) archived."""

    def done():
        row = cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
        return row is not None and row[:24] >= name

    wait_for(done, timeout, f"{name} to be archived")


def restore_dir():
    """An empty directory for a restored cluster, somewhere the postgres user can reach."""
    parent = Path(tempfile.mkdtemp(prefix="bp-restore-"))
    parent.chmod(0o755)
    return parent / "data"


def stop_restored(datadir):
    """Stop a cluster a restore left running, and remove it."""
    from backupportal.lib.pgcluster import stop_left_running

    stop_left_running(datadir)
    shutil.rmtree(Path(datadir).parent, ignore_errors=True)


def rows(port, query, dbname="reliabilitymaldives"):

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, autocommit=True) as conn:
        return conn.execute(query).fetchall()


# --- Sandbox clusters of restore requests. ---


def ask_sandbox(client, user, server, target_time="", run=None):
    client.force_login(user)
    return client.post(
        reverse("restore-request-new"),
        {
            "server": server.pk,
            "backup_run": run.pk if run else "",
            "target_time": target_time,
            "destination": "sandbox_cluster",
            "reason": "what did the table look like before the bad deploy?",
        },
    )


def base_backup():
    from backups.models import BackupRun

    result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "succeeded", result
    return BackupRun.objects.get(pk=result["id"])


def running_in(program, root):
    """The pids of `program` (its argv[0]'s end) whose arguments name a path under root."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and argv and argv[0].endswith(program) and any(str(root).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def postgres_running_in(root):
    """Postmasters whose data directory is under root."""
    return running_in(b"postgres", root)


# --- users, servers, commands as a subprocess, the processes they leave ---

DEMO_PASSWORD = "correct horse battery staple 42"


def make_user(username, group=None, superuser=False):
    from django.contrib.auth.models import Group, User

    user = User.objects.create_user(
        username, f"{username}@example.mv", DEMO_PASSWORD, is_staff=True, is_superuser=superuser
    )
    if group:
        user.groups.add(Group.objects.get(name=group))
    return user


def load_sample(cluster, dbname="reliabilitymaldives", **sizes):

    cluster.create_database(dbname)
    with cluster.connect(dbname) as conn:
        sampledata.create(conn, **sizes)


def register(cluster, name="maldives", dbname="reliabilitymaldives"):
    from backups.models import Server

    server = Server(name=name, dsn=cluster.dsn(dbname))
    server.pg_version = server.probe()
    server.save()
    return server


# Distinctive, so a test can prove it never shows up anywhere.
S3_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY-4242"


def portal_env(settings, **extra):
    """The environment for a subprocess (manage.py, a worker) that must share this test's database and files."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        url = f"sqlite:///{db['NAME']}"
    else:
        auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
        url = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=url,
        VAR_DIR=str(settings.VAR_DIR),
        BACKUP_ROOT=str(settings.BACKUP_ROOT),
        WAL_ROOT=str(settings.WAL_ROOT),
        WAL_SPOOL=str(settings.WAL_SPOOL),
        BACKUP_PASSPHRASE_FILE=str(settings.BACKUP_PASSPHRASE_FILE),
        JOURNAL_HEAD_FILE=str(settings.JOURNAL_HEAD_FILE),
        JOURNAL_KEY_FILE=str(settings.JOURNAL_KEY_FILE),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def manage(settings, *args, env=None, **popen):
    """Start `manage.py ARGS` in a subprocess sharing this test's database (`env`: more settings)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, str(root / "manage.py"), *args],
        env=portal_env(settings, **(env or {})),
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def descendants(pid):
    """Every live process below pid (by /proc), for orphan checks."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def child_named(pid, name):
    """The first live process below pid whose program is `name` (pg_dump, gpg...), or None."""
    for child in descendants(pid):
        try:
            if os.path.basename(Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode()) == name:
                return child
        except OSError:
            continue
    return None


def processes_named(name):
    """Live (non-zombie) pids whose command line starts with `name`'s path or name."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and os.path.basename(argv0) == name:
            pids.append(int(entry.name))
    return pids


# --- PITR: a server with pushed WAL and a base backup, and the restore command ---

DB = "reliabilitymaldives"


def write(cluster, sql):
    cluster.execute(sql, dbname=DB)


def archive_some_wal(cluster, tables=3):
    """A few transactions, each in its own archived segment."""
    for i in range(tables):
        write(cluster, f"CREATE TABLE t{i}(x int); INSERT INTO t{i} VALUES ({i})")
        name = switch_wal(cluster)
    wait_archived(cluster, name)
    return name


def push_with_base(cluster, server):
    """Push archiving, a base backup, then a few archived and ingested segments."""
    enable_push(cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    archive_some_wal(cluster)
    walingest.ingest(server)


def pitr(datadir, port, *target):
    """The restore command's PITR of maldives into a new cluster, as run_command returns it."""
    return run_command("restore", "--server", "maldives", *target, "--into-datadir", str(datadir), "--port", str(port))


def pitr_to(datadir, port, moment):
    return pitr(datadir, port, "--target-time", moment.isoformat(sep=" "))


def a_second_later():
    """A target time (whole seconds) after the commits so far and before the next one."""
    time.sleep(1.05)
    moment = timezone.localtime().replace(microsecond=0)
    time.sleep(0.05)
    return moment


def restore_json(*args):
    """The restore command's JSON result, whatever it exits with (a refusal raises CommandError)."""
    out = StringIO()
    try:
        call_command("restore", *args, "--json", stdout=out)
    except SystemExit:
        pass
    return json.loads(out.getvalue().strip().splitlines()[-1])


# --- backups in every tier, and corrupting them ---


def flip_byte(data: bytes, at=-100) -> bytes:
    data = bytearray(data)
    data[at] ^= 0xFF
    return bytes(data)


def good_backup():
    result = backup_json()
    assert result["status"] == "succeeded", result
    return result, BackupRun.objects.get(pk=result["id"])


def verify_json(*args):
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("verify", *args, "--json", stdout=out, stderr=err)
    except SystemExit as e:
        code = e.code
    return code, json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


# --- the archive command as PostgreSQL runs it ---


def archive_as_postgres(server, source, name):
    """Run the printed archive_command exactly as PostgreSQL does: `sh -c` as postgres, %p and %f filled in."""
    command = walspool.archive_command(server).replace("%p", shlex.quote(str(source))).replace("%f", name)
    return subprocess.run(as_db_user(["sh", "-c", command]), capture_output=True, text=True, cwd="/")


# --- pull archiving ---


def pull(server):
    server.archiving = Server.Archiving.PULL
    server.save(update_fields=["archiving"])
    return Receiver(server, log=lambda line: None, poll=0.1)


def slot_active(cluster, server):
    got = cluster.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [server.replication_slot])
    return got and got[0][0]


# --- a byte flipped in a file ---


def flip_byte_in(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- an unprivileged worker and the catalog's files ---

UNPRIVILEGED = "nobody"  # root ignores file modes: only an unprivileged worker meets a read-only directory


@contextmanager
def lent_to(user, *paths):
    """Chown `paths` to `user` for the block; their owners are put back after."""
    entry = pwd.getpwnam(user)
    before = [(path, os.stat(path)) for path in paths]
    try:
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        yield
    finally:
        for path, st in before:
            os.chown(path, st.st_uid, st.st_gid)


def catalog_files():
    """What an unprivileged worker must write to reach the catalog: a SQLite file and its directory (journal files)."""
    from django.db import connection

    if not connection.settings_dict["ENGINE"].endswith("sqlite3"):
        return []  # PostgreSQL: reached over TCP
    name = Path(connection.settings_dict["NAME"])
    return [name.parent, name]


def worker_home(settings, passphrase_file, user):
    """The worker's own private directory: its passphrase file (its own, 0600), gpg home, journal key."""
    home = Path(tempfile.mkdtemp(prefix="bp-worker-"))
    (home / "passphrase").write_text(passphrase_file.read_text())
    (home / "passphrase").chmod(0o600)
    key = Path(settings.JOURNAL_KEY_FILE)
    if key.exists():
        shutil.copy(key, home / "journal.key")
        (home / "journal.key").chmod(0o600)
    entry = pwd.getpwnam(user)
    for path in [home, *home.iterdir()]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return home


def manage_as(user, settings, home, *args):
    """manage.py ARGS run by `user` (runuser), with the worker's own home of worker_home()."""
    root = Path(__file__).resolve().parent.parent
    env = portal_env(
        settings,
        HOME=home,
        VAR_DIR=home,
        GNUPGHOME=home / "gnupg",
        BACKUP_PASSPHRASE_FILE=home / "passphrase",
        JOURNAL_KEY_FILE=home / "journal.key",
        JOURNAL_HEAD_FILE=home / "journal.head",
        PYTHONDONTWRITEBYTECODE=1,
    )
    argv = ["runuser", "-u", user, "--", sys.executable, str(root / "manage.py"), *args]
    return subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=180)


# --- the monitor's mail ---


# The maintenance calendar's own check runs in every pass too, and its strategy review
# (due 2025-12-02) is overdue: test_maintenance.py tests that alert; these tests look at theirs.
def ours():
    """The alerts a test makes: not the maintenance calendar's, nor "does not answer" of a server
    that is in the catalog only (watching.monitor.check_reachable: tests/test_monitor.py)."""
    return Alert.objects.exclude(
        condition__in=[Alert.Condition.MAINTENANCE_OVERDUE, Alert.Condition.SERVER_UNREACHABLE]
    )


def mails(smtp):
    return [
        m for m in smtp.messages if not any(s in m["Subject"] for s in ("Maintenance task overdue", "does not answer"))
    ]


# --- the backup command ---


def backup_json(name="maldives", kind="logical"):
    out = StringIO()
    try:
        call_command("backup", name, "--kind", kind, "--json", stdout=out, stderr=StringIO())
    except SystemExit:
        pass
    return json.loads(out.getvalue().strip().splitlines()[-1])


# --- every page and action of the portal ---

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
    "run-hold": {"DBA"},
    "run-release": {"DBA", "Sysadmin"},
    "run-delete": {"DBA", "Sysadmin"},
    "change-approve": {"DBA", "Sysadmin"},
    "change-reject": {"DBA", "Sysadmin"},
    # One's own second factor: every role (auditors too) manages theirs.
    "two-factor-start": {"DBA", "Sysadmin", "Auditor"},
    "two-factor-confirm": {"DBA", "Sysadmin", "Auditor"},
    "two-factor-recovery": {"DBA", "Sysadmin", "Auditor"},
}


# Pages whose form only some roles get: both the GET and the POST need the right.
FORMS = {
    "drill-new": {"DBA", "Sysadmin"},
    "drill-edit": {"DBA", "Sysadmin"},
    "drill-step": {"DBA", "Sysadmin"},
    "maintenance-complete": {"DBA", "Sysadmin"},
    "two-factor-verify": {"DBA", "Sysadmin", "Auditor"},
}

# The pages of one's own second factor, which an auditor may post to as to the login.
OWN_ACCOUNT = {"two-factor-start", "two-factor-confirm", "two-factor-recovery", "two-factor-verify"}

# Open without a login: the login itself, and single sign-on's way there and back (404 until
# OIDC_RP_CLIENT_ID is set).
PUBLIC = {"login", "logout", "oidc-login", "oidc-callback"}


# The documented exception to the login: Prometheus reads /metrics with METRICS_TOKEN, nobody else.
TOKEN_ONLY = {"metrics"}


def portal_urls(catalog):
    """(name, method, url) for every named pattern outside the admin."""
    drill, entry = catalog[DrDrill], catalog[JournalEntry]
    request, restore = catalog[RestoreRequest], catalog[RestoreRun]
    args = {
        "server": [catalog["server"].name],
        "server-retention": [catalog["server"].name],
        "backup-now": [catalog["server"].name],
        "restore-test-now": [catalog["server"].name],
        "schedule-edit": [catalog["server"].name],
        "critical-tables-edit": [catalog["server"].name],
        "run": [catalog["run"].pk],
        "run-progress": [catalog["run"].pk],
        "verify-run": [catalog["run"].pk],
        "run-hold": [catalog["run"].pk],
        "run-release": [catalog["run"].pk],
        "run-delete": [catalog["run"].pk],
        "change-approve": [catalog[ChangeRequest].pk],
        "change-reject": [catalog[ChangeRequest].pk],
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
        "evidence-pack": [catalog[EvidencePack].pk],
        "evidence-zip": [catalog[EvidencePack].pk],
        "evidence-sig": [catalog[EvidencePack].pk],
    }
    urls = []
    for name in named_patterns():
        if name in PUBLIC or name in TOKEN_ONLY:
            continue
        url = reverse(name, args=args.get(name, []))
        if name not in ACTIONS:
            urls.append((name, "get", url))
        if name in ACTIONS or name in FORMS:
            urls.append((name, "post", url))
    return urls


def post_data(name, catalog):
    """A valid POST for each action: the roles allowed must get through to the redirect."""

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
        "run-hold": {"reason": "case 2026-1"},
        "run-release": {"reason": "the case is closed"},
        "run-delete": {"reason": "restored into prod by mistake"},
        "two-factor-confirm": {"otp_token": "000000"},  # wrong, or nothing pending: back to the form
        "two-factor-verify": {"otp_token": "000000"},
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


# --- secrets ---

DSN_PASSWORD = "Dsn-Secret-7f3a9"


def stop_gpg_agent(home):
    """The agent gpg starts for a home's private key (the signing key) outlives gpg and, started
    with child_env, carries no session mark: stopped the way gpg documents."""
    if Path(home).is_dir():
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False)


# --- Where a refused connection must not arrive. ---


class Listener:
    """A TCP port on 127.0.0.1 that listens and never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.port = self.socket.getsockname()[1]

    def reached(self, wait=0.5):
        """Whether anything connected within `wait` seconds."""
        self.socket.settimeout(wait)
        try:
            self.socket.accept()[0].close()
        except TimeoutError:
            return False
        return True


@contextmanager
def listening():
    listener = Listener()
    try:
        yield listener
    finally:
        listener.socket.close()


def rebinding(monkeypatch, host, first="93.184.215.14", then="127.0.0.1"):
    """DNS rebinding: `host` resolves to `first` once, to `then` afterwards. Returns the list of
    times it was asked."""
    real, asked = socket.getaddrinfo, []

    def resolve(name, port, *args, **kwargs):
        if name != host:
            return real(name, port, *args, **kwargs)
        asked.append(name)
        address = first if len(asked) == 1 else then
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return asked


@contextmanager
def database_moved_away(cluster, name="moved"):
    """A database whose directory base/OID is a symbolic link to another disk; its oid."""
    cluster.execute(f"CREATE DATABASE {name}")
    cluster.execute("CREATE TABLE m AS SELECT 1 AS x", dbname=name)
    (oid,) = cluster.execute(f"SELECT oid FROM pg_database WHERE datname = '{name}'")[0]
    home = cluster.datadir / "base" / str(oid)
    elsewhere = Path(tempfile.mkdtemp(prefix="bp-otherdisk-")) / str(oid)
    elsewhere.parent.chmod(0o755)
    cluster.stop()
    shutil.move(home, elsewhere)
    home.symlink_to(elsewhere)
    cluster.start()
    try:
        yield oid
    finally:
        cluster.stop()
        home.unlink()
        shutil.move(elsewhere, home)
        shutil.rmtree(elsewhere.parent)
        cluster.start()
