#!/usr/bin/env python3
"""`make demo`: the portal protecting a sample database, on http://127.0.0.1:8000, in one command.

Setup (idempotent: a second run reuses everything it made): a passphrase file and a journal key
(0600) under var/, migrate, a PostgreSQL cluster under var/demo/ holding a sample
`reliabilitymaldives` database, registered as server "maldives", the users alice and bob (DBA),
charlie (Auditor) and sam (Sysadmin) with generated passwords, and a first logical backup.
Then a django-q2 worker (qcluster) and gunicorn run until Ctrl-C stops them and the cluster.

    scripts/demo.py [--port 8000]     set up, then serve            (make demo)
    scripts/demo.py --setup-only      set up, stop the cluster, exit (the tests)
    scripts/demo.py --stop            stop a demo left running       (make demo-stop)

The demo is self-contained: it sets every variable that says where the portal writes or what
it connects to, so a .env or a DATABASE_URL meant for production never points the demo there.
Run it with the project's venv python (`make demo` does).
"""

import argparse
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from backupportal.lib import sampledata  # noqa: E402
from backupportal.lib.osuser import DB_OS_USER, as_db_user, os_actor  # noqa: E402
from backupportal.lib.pgcluster import Cluster, ClusterError  # noqa: E402
from backupportal.lib.pgdatadir import pg_bin  # noqa: E402

SERVER = "maldives"
DBNAME = "reliabilitymaldives"
USERS = [("alice", "DBA"), ("bob", "DBA"), ("charlie", "Auditor"), ("sam", "Sysadmin")]
SIZES = {
    "demo": {"users": 1000, "audit_logs": 20000, "financial_records": 10000},
    "small": {"users": 100, "audit_logs": 1000, "financial_records": 500},
}
# How long a child gets to stop after SIGTERM before it is killed.
STOP_GRACE_S = 20


class DemoError(Exception):
    """What went wrong and what to do, in one line."""


class Paths:
    """Where the demo keeps its things: all under VAR_DIR (default var/)."""

    def __init__(self, var):
        self.var = Path(var).absolute()
        self.demo = self.var / "demo"
        self.state = self.demo / "running.json"
        self.cluster_pointer = self.demo / "cluster-datadir"
        self.passphrase = self.var / "backup-passphrase"
        self.journal_key = self.var / "journal.key"
        self.passwords = self.var / "demo-passwords.txt"
        self.web_log = self.demo / "web.log"
        self.worker_log = self.demo / "worker.log"
        # SANDBOX_ROOT's default: the clusters that approved point-in-time restores leave running.
        self.sandboxes = self.var / "sandboxes"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="the web server's port on 127.0.0.1")
    parser.add_argument("--setup-only", action="store_true", help="set up, then stop the cluster and exit")
    parser.add_argument("--stop", action="store_true", help="stop a demo left running in the background")
    parser.add_argument("--size", choices=SIZES, default="demo", help="rows in the sample database")
    args = parser.parse_args(argv)
    paths = Paths(os.environ.get("VAR_DIR") or BASE_DIR / "var")
    try:
        if args.stop:
            return stop_background(paths)
        refuse_if_running(paths)
        check_prerequisites()
        if not args.setup_only:
            _check_port_free(args.port)
        configure(paths, args.port)
        cluster = set_up(paths, SIZES[args.size])
        if args.setup_only:
            cluster.stop()
            print_logins(paths, None, cluster)
            return 0
        return serve(paths, cluster, args.port)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the sample cluster is stopped", file=sys.stderr)
        return 130


def say(message):
    print(f"demo: {message}", flush=True)


# ------------------------------------------------------------------------ set-up


def check_prerequisites():
    """The system packages the demo needs, each named by its Debian package."""
    bindir = pg_bin()
    for tool in ("initdb", "pg_ctl", "pg_dump", "pg_dumpall"):
        if not (bindir / tool).is_file():
            raise DemoError(
                f"{tool} not found in {bindir}: apt-get install postgresql-15 (or set PG_BIN to the bin directory)"
            )
    if shutil.which("gpg") is None:
        raise DemoError("gpg not found: apt-get install gnupg")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(DB_OS_USER)
        except KeyError:
            raise DemoError(
                f"no {DB_OS_USER!r} OS user to run PostgreSQL as: apt-get install postgresql-15 creates it"
            ) from None
        if shutil.which("runuser") is None:
            raise DemoError("runuser not found: apt-get install util-linux")


def configure(paths, port):
    """The demo's settings, in the environment before Django reads them (children inherit them)."""
    paths.var.mkdir(parents=True, exist_ok=True)
    paths.demo.mkdir(exist_ok=True)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "backupportal.settings",
            "VAR_DIR": str(paths.var),
            "DATABASE_URL": f"sqlite:///{paths.var / 'portal.sqlite3'}",
            "Q_BROKER_URL": "",
            "DEBUG": "false",
            # Plain http on 127.0.0.1, as DESIGN.md says: production keeps the redirect on.
            "SECURE_SSL_REDIRECT": "false",
            # Its users are made with printed passwords and no authenticator; production keeps it on.
            "REQUIRE_2FA": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SITE_URL": f"http://127.0.0.1:{port}",
            "BACKUP_ROOT": str(paths.var / "backups"),
            "WAL_ROOT": str(paths.var / "backups" / "wal"),
            # PostgreSQL's archive program (run as postgres) writes here: beside the cluster
            # when the checkout is out of its reach.
            "WAL_SPOOL": str((paths.var if _reachable_by_db_user(paths.var) else _fallback_parent()) / "walspool"),
            "NAS_ROOT": "",
            "S3_BUCKET": "",
            "BACKUP_PASSPHRASE_FILE": str(paths.passphrase),
            "GPG_RECIPIENTS": "",
            "GNUPGHOME": str(paths.var / "gnupg"),
            "JOURNAL_KEY_FILE": str(paths.journal_key),
            "JOURNAL_HEAD_FILE": str(paths.var / "journal.head"),
            "EMAIL_URL": "consolemail://",
            "ALERT_EMAILS": "",
        }
    )


def set_up(paths, sizes):
    """Everything but the long-running servers; returns the sample cluster, running."""
    private_file(paths.passphrase, secrets.token_urlsafe(32))
    private_file(paths.journal_key, secrets.token_hex(32))

    import django

    django.setup()
    from django.core.management import call_command

    say(f"migrating the portal's database ({paths.var / 'portal.sqlite3'})")
    call_command("migrate", interactive=False, verbosity=0)
    # It holds password hashes and the servers' credentials.
    os.chmod(paths.var / "portal.sqlite3", 0o600)
    cluster = sample_cluster(paths, sizes)
    register(cluster)
    users(paths)
    first_backup()
    archive_wal(cluster)
    first_backup(kind="base")
    return cluster


def private_file(path, content):
    """A secret file with mode 0600, made once and kept: backups need the same passphrase later."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise DemoError(f"{path} can be read by others (mode {mode:o}): chmod 600 {path}")
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content + "\n")
    say(f"created {path} (mode 0600)")


def sample_cluster(paths, sizes):
    """The sample cluster: made once under var/demo/, started, filled on first use."""
    datadir = _recorded_datadir(paths)
    if datadir is None:
        parent = paths.demo if _reachable_by_db_user(paths.demo) else _fallback_parent()
        say(f"creating a PostgreSQL cluster under {parent}")
        try:
            cluster = Cluster.create(base_dir=parent, wal_segsize_mb=16)
        except ClusterError as e:
            raise DemoError(f"could not create the sample cluster: {_first_line(e)}") from None
        paths.cluster_pointer.write_text(f"{cluster.datadir}\n")
    else:
        cluster = Cluster(datadir)
    try:
        cluster.start()
    except ClusterError as e:
        raise DemoError(f"could not start the sample cluster: {_first_line(e)} (log: {cluster.logfile})") from None
    say(f"sample cluster running on 127.0.0.1:{cluster.port} ({cluster.datadir})")
    if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DBNAME]):
        cluster.create_database(DBNAME)
    with cluster.connect(DBNAME) as conn:
        filled = conn.execute("SELECT to_regclass('public.financial_records') IS NOT NULL").fetchone()[0]
        if not filled or not conn.execute("SELECT exists(SELECT 1 FROM financial_records)").fetchone()[0]:
            say(f"filling {DBNAME} with sample rows ({', '.join(f'{v} {k}' for k, v in sizes.items())})")
            sampledata.create(conn, **sizes)
    return cluster


def _recorded_datadir(paths):
    try:
        datadir = Path(paths.cluster_pointer.read_text().strip())
    except FileNotFoundError:
        return None
    return datadir if (datadir / "PG_VERSION").is_file() else None


def _reachable_by_db_user(path):
    """Can the postgres OS user enter `path`? Not when the clone lives under /root (0700)."""
    return subprocess.run(as_db_user(["test", "-x", str(path)]), check=False).returncode == 0


def _fallback_parent():
    """A directory postgres can reach, named after this checkout so two clones never share it."""
    tag = hashlib.sha256(str(BASE_DIR).encode()).hexdigest()[:8]
    parent = Path("/var/tmp") / f"backupportal-demo-{tag}"
    parent.mkdir(mode=0o755, exist_ok=True)
    return parent


def register(cluster):
    """Register the sample database as server "maldives", or follow its new port."""
    from django.core.management import CommandError, call_command

    from backupportal import journal
    from backups.models import Server

    dsn = cluster.dsn(DBNAME)
    server = Server.objects.filter(name=SERVER).first()
    if server is None:
        try:
            # The strategy's own four: the tables that must never be empty or shrink.
            call_command("addserver", SERVER, dsn=dsn, critical_tables="users,roles,audit_logs,financial_records")
        except CommandError as e:
            raise DemoError(f"addserver refused the sample database: {e}") from None
    elif server.dsn != dsn:
        # The stored port was taken when the cluster started again, so it has a new one.
        server.dsn = dsn
        server.pg_version = server.probe()
        server.save(update_fields=["dsn", "pg_version"])
        journal.record("server_changed", actor=os_actor(), obj=server, dsn=dsn, reason="the demo cluster moved port")
        say(f"server {SERVER} now at {dsn}")


def users(paths):
    """The demo's users with their roles; passwords generated once, kept only in a 0600 file."""
    from django.contrib.auth.models import Group, User

    from backupportal import journal

    known = read_passwords(paths.passwords)
    logins = []
    for name, role in USERS:
        user = User.objects.filter(username=name).first()
        created = user is None
        if created:
            user = User(username=name, email=f"{name}@reliabilitymaldives.mv")
        password = known.get(name)
        if created or password is None or not user.check_password(password):
            password = secrets.token_urlsafe(12)
            user.set_password(password)
            if not created:
                journal.record("password_reset", actor=os_actor(), obj=user, reason="demo set-up")
        user.is_staff = user.is_active = True
        user.save()
        user.groups.set([Group.objects.get(name=role)])
        if created:
            journal.record("user_created", actor=os_actor(), obj=user, role=role)
        logins.append((name, role, password))
    write_passwords(paths.passwords, logins)


def read_passwords(path):
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    fields = (line.split() for line in lines if line.strip() and not line.startswith("#"))
    return {f[0]: f[2] for f in fields if len(f) == 3}


def write_passwords(path, logins):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# The demo's logins (made by make demo). user, role, password.\n")
        for login in logins:
            f.write("\t".join(login) + "\n")
    os.replace(tmp, path)


def archive_wal(cluster):
    """WAL archiving (push), as a DBA sets it up: the lines `archivecommand` prints go into
    postgresql.conf and PostgreSQL restarts. With a base backup, the dashboard shows an achieved
    RPO and a point-in-time restore can be asked for."""
    from io import StringIO

    from django.core.management import CommandError, call_command

    from backups.models import Server

    if Server.objects.get(name=SERVER).archiving != "none":
        return
    say(f"archiving {SERVER}'s WAL (manage.py archivecommand {SERVER}, pasted into postgresql.conf)")
    out = StringIO()
    try:
        call_command("archivecommand", SERVER, stdout=out)
    except CommandError as e:
        raise DemoError(f"archivecommand refused the sample cluster: {e}") from None
    lines = [line for line in out.getvalue().splitlines() if line and not line.startswith("#")]
    with open(cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("\n# pasted from manage.py archivecommand (the demo)\n" + "\n".join(lines) + "\n")
    try:
        cluster.restart()
    except ClusterError as e:
        raise DemoError(f"the sample cluster did not restart with WAL archiving: {_first_line(e)}") from None


def first_backup(kind="logical"):
    """A first backup of each kind, so the dashboard has them to show; later runs reuse them."""
    from django.core.management import CommandError, call_command

    from backups.models import Server

    if Server.objects.get(name=SERVER).latest_good_backup(kind) is not None:
        return
    say(f"taking a first {kind} backup of {SERVER}")
    try:
        call_command("backup", SERVER, kind=kind)
    except CommandError as e:
        raise DemoError(f"the first backup failed: {e}") from None
    except SystemExit:
        raise DemoError("the first backup failed (see above)") from None


def _first_line(error):
    return str(error).strip().splitlines()[0]


# ------------------------------------------------------------------------ serving


def serve(paths, cluster, port):
    """Run the worker and the web server until Ctrl-C (or SIGTERM, SIGHUP), then stop all three."""
    from django.core.management import call_command
    from django.db import connections

    say("collecting static files")
    call_command("collectstatic", interactive=False, verbosity=0)
    connections.close_all()
    # Ctrl-C, kill and a closed terminal all stop the demo in order. (SIGINT explicitly:
    # Python leaves it ignored when the demo was started in the background.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    children = {}
    try:
        children["worker"] = spawn([sys.executable, "manage.py", "qcluster"], paths.worker_log)
        children["web"] = spawn(
            [
                *[sys.executable, "-m", "gunicorn", "backupportal.wsgi:application"],
                *["--bind", f"127.0.0.1:{port}", "--workers", "2", "--access-logfile", "-"],
            ],
            paths.web_log,
        )
        write_state(paths, children, cluster)
        url = f"http://127.0.0.1:{port}/"
        wait_for_web(url + "login/", children["web"], paths.web_log)
        print_logins(paths, url, cluster)
        return watch(children, paths)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        say("stopping the web server, the worker, the sample cluster and any sandbox")
        for name in ("web", "worker"):
            if name in children:
                stop_group(children[name].pid)
        cluster.stop()
        stop_sandboxes(paths)
        stop_gpg_agents(paths)
        paths.state.unlink(missing_ok=True)
        say("stopped")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_port_free(port):
    with socket.socket() as s:
        # As gunicorn binds: connections of a previous run in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(
                f"port {port} on 127.0.0.1 is in use: stop what listens there, or make demo PORT=8001"
            ) from None


def spawn(argv, log):
    """A child in its own session: Ctrl-C reaches only us, and we stop the children in order."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, cwd=BASE_DIR, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_web(url, web, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if web.poll() is not None:
            raise DemoError(f"the web server exited ({web.returncode}): {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise DemoError(f"the web server did not answer {url} within {timeout} s: see {log}")


def watch(children, paths):
    """Wait; if the worker or the web server dies on its own, say so and stop the rest."""
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                log = paths.web_log if name == "web" else paths.worker_log
                print(f"demo: the {name} exited ({child.returncode}): {_tail(log)}", file=sys.stderr)
                return 1
        time.sleep(1)


def _tail(log):
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return f"no log at {log}"
    return (lines[-1] if lines else "(empty log)") + f" (log: {log})"


def print_logins(paths, url, cluster):
    logins = [(n, r, p) for n, (r, p) in _logins(paths).items()]
    print()
    if url:
        print(f"The portal is running at {url}  (Ctrl-C stops it and the sample cluster)")
    else:
        print("The demo is set up; `make demo` starts the portal on http://127.0.0.1:8000/")
    print("Log in as:")
    for name, role, password in logins:
        print(f"    {name:<8} {role:<9} {password}")
    print(f"  (passwords also in {paths.passwords}, mode 0600)")
    print(f"Sample database: psql {cluster.dsn(DBNAME)}   (server {SERVER!r} in the portal)")
    print(f"Backups: {paths.var / 'backups'}, encrypted with the passphrase in {paths.passphrase}")
    if url:
        print(f"Logs: {paths.web_log}, {paths.worker_log}, {cluster.logfile}")
    print(flush=True)


def _logins(paths):
    roles = dict(USERS)
    return {name: (roles[name], pw) for name, pw in read_passwords(paths.passwords).items() if name in roles}


# ------------------------------------------------------------------------ state and stop


def write_state(paths, children, cluster):
    state = {"driver": os.getpid(), "datadir": str(cluster.datadir)}
    state.update({name: child.pid for name, child in children.items()})
    paths.state.write_text(json.dumps(state) + "\n")


def read_state(paths):
    try:
        return json.loads(paths.state.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _is(pid, marker):
    """Is `pid` alive and ours? (Its command line names `marker`: pids are reused.)"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, TypeError):
        return False
    return marker in cmdline


MARKERS = {"driver": "demo.py", "web": "gunicorn", "worker": "qcluster"}


def refuse_if_running(paths):
    state = read_state(paths)
    if state and _is(state.get("driver"), MARKERS["driver"]):
        raise DemoError(f"a demo is already running (pid {state['driver']}): use it, or make demo-stop")
    if any(_is(state.get(name), MARKERS[name]) for name in ("web", "worker")):
        raise DemoError("a demo was left running in the background: make demo-stop first")
    paths.state.unlink(missing_ok=True)


def stop_background(paths):
    """make demo-stop: the driver if it lives (it stops the rest in order), else each part."""
    state = read_state(paths)
    stopped = []
    driver = state.get("driver")
    if _is(driver, MARKERS["driver"]) and driver != os.getpid():
        os.kill(driver, signal.SIGTERM)
        _wait_gone(driver, STOP_GRACE_S * 3)
        stopped.append(f"demo (pid {driver})")
    for name in ("web", "worker"):
        pid = state.get(name)
        if _is(pid, MARKERS[name]):
            stop_group(pid)
            stopped.append(f"{name} (pid {pid})")
    datadir = state.get("datadir") or _recorded_datadir(paths)
    if datadir and Cluster(datadir).is_running():
        Cluster(datadir).stop()
        stopped.append(f"sample cluster ({datadir})")
    stopped += [f"sandbox ({datadir})" for datadir in stop_sandboxes(paths)]
    stopped += [f"gpg-agent ({home})" for home in stop_gpg_agents(paths)]
    paths.state.unlink(missing_ok=True)
    say(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def stop_sandboxes(paths):
    """Stop (never remove) the sandbox clusters of point-in-time restores: the portal shows them
    stopped, and removes them when they expire or a DBA says so. Returns their directories."""
    stopped = []
    for datadir in sorted(paths.sandboxes.iterdir()) if paths.sandboxes.is_dir() else []:
        sandbox = Cluster(datadir)
        if sandbox.is_running():
            sandbox.stop()
            stopped.append(datadir)
    return stopped


def stop_gpg_agents(paths):
    """gpg starts an agent of its own for each key directory the demo's portal used (signing,
    the WAL keys): a daemon outside the demo's process groups. Returns the directories whose
    agent was asked to stop."""
    homes = {p.parent for pattern in ("*/pubring.kbx", "*/*/pubring.kbx") for p in paths.var.glob(pattern)}
    stopped = []
    for home in sorted(homes):
        running = ["gpg-connect-agent", "--homedir", str(home), "--no-autostart", "/bye"]
        if subprocess.run(running, capture_output=True).returncode == 0:
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)
            stopped.append(home)
    return stopped


def stop_group(pid):
    """SIGTERM the child (gunicorn's master, qcluster's sentinel), which stops its own workers;
    then SIGKILL whatever of its process group lingers.

    Only the leader gets SIGTERM: qcluster's workers, signalled directly, leave the sentinel
    waiting for them forever.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_gone(pid, STOP_GRACE_S):
        print(f"demo: pid {pid} did not stop within {STOP_GRACE_S} s: killing it", file=sys.stderr)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_gone(pid, 5)


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child; otherwise just look.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return True
        time.sleep(0.1)
    return False


def _zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


if __name__ == "__main__":
    sys.exit(main())
