"""The suite leaves nothing behind: no process, no temporary directory, no test database.

At the start of the session every process the suite starts is marked (an environment
variable that children inherit) and the session gets a temporary directory of its own,
which tempfile and TMPDIR point at; at the end, after every fixture was torn down, whatever
is still running or left in it fails the run, by name, and is then removed so that the next
run starts clean. Two sessions on one machine never touch each other's files or processes.
tests/conftest.py calls start() and finish().

Processes started with a cleaned environment (PostgreSQL under runuser, tools given
child_env) do not carry the mark: they are recognised by a command line that names the
session's temporary directory.
"""

import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest

MARK = "BP_TEST_SESSION"
PREFIX = "bp-"  # every temporary directory the suite makes starts with it
_start = {}


def start(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker works in the session its controller started (mark and TMPDIR inherited)
    # pytest's own tmp_path root stays where pytest keeps it (it cleans up after itself): the
    # gpg homes under it must keep their agent's socket path short (108 bytes at most).
    session.config._tmp_path_factory.getbasetemp()
    os.environ[MARK] = uuid.uuid4().hex
    _start["pids"] = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    # One an earlier run left is not this run's; one dropped and made again has a new oid.
    _start["databases"] = set(_test_databases())
    session_dir = tempfile.mkdtemp(prefix=f"{PREFIX}session-")
    # Like /tmp itself: PostgreSQL (as postgres) and tools run as nobody inherit TMPDIR.
    os.chmod(session_dir, 0o1777)
    os.environ["TMPDIR"] = tempfile.tempdir = _start["dir"] = session_dir


def finish(session):
    if not _start or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    stop_gpg_agents()
    new_dirs = _temp_entries()
    processes = _leftover_processes()
    databases = _leftover_databases()
    problems = [f"process {pid} ({name}) still running" for pid, name in processes]
    problems += [f"temporary directory {path} left behind" for path in new_dirs]
    problems += [f"test database {name} left on the portal's PostgreSQL" for name in databases]
    _clean_up(processes)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["", "The suite left these behind (removed now; fix the test that made them):"]
        lines += [f"  {p}" for p in problems]
        (reporter.write_line if reporter else print)("\n".join(lines))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def stop_gpg_agents():
    """gpg starts an agent per home directory that outlives it: stop the ones this session started.

    Stopping them is the teardown of the test's gpg home, not a leftover; gpgconf is the way
    gpg documents for it, and a home already removed leaves an agent that only a signal ends.
    """
    for pid, name in _marked_processes():
        if name == "gpg-agent":
            _kill(pid)
    # Those gpg started with child_env carry no mark: the agents of the session's own homes
    # (their command line names the home) are that teardown too, not something left running.
    for pid, name in _leftover_processes():
        if name == "gpg-agent":
            _kill(pid)


def _temp_entries():
    """What the suite made in its directory (browser profiles and the like aside)."""
    return sorted(str(p) for p in Path(_start["dir"]).glob(f"{PREFIX}*"))


def _own_var_dir():
    return os.environ.get("VAR_DIR", "")


def _proc_text(pid, what):
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid):
    state = _proc_text(pid, "stat").rsplit(")", 1)[-1].split()[:1]
    return bool(state) and state[0] != "Z"


def _marked_processes():
    mark = f"{MARK}={os.environ.get(MARK)}"
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me or int(entry.name) in _start["pids"]:
            continue
        pid = int(entry.name)
        if mark in _proc_text(pid, "environ").split(" ") and _alive(pid):
            yield pid, _proc_text(pid, "comm").strip()


def _leftover_processes():
    found = dict(_marked_processes())
    dirs = (_start["dir"],) + ((_own_var_dir(),) if _own_var_dir() else ())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in _start["pids"] or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        cmdline = _proc_text(pid, "cmdline")
        if any(d in cmdline for d in dirs) and _alive(pid):
            found.setdefault(pid, _proc_text(pid, "comm").strip())
    return sorted(found.items())


def _leftover_databases():
    """Test databases this run made that pytest-django could not drop (a session still open)."""
    return [name for oid, name in _test_databases() if (oid, name) not in _start["databases"]]


def _test_databases():
    """(oid, name) of the portal's test databases on its PostgreSQL: test_NAME, test_NAME_gw0...
    ([] on SQLite)."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return []
    import psycopg

    try:
        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", connect_timeout=5) as conn:
            rows = conn.execute("SELECT oid, datname FROM pg_database").fetchall()
    except psycopg.Error:
        return []
    name = url.rsplit("/", 1)[1].split("?")[0]
    # test_NAME, or test_NAME_gw0, test_NAME_gw1... under pytest-xdist
    return [(oid, db) for oid, db in rows if db == f"test_{name}" or db.startswith(f"test_{name}_gw")]


def _kill(pid):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if not _alive(pid):
            return


def _clean_up(processes):
    for pid, _ in processes:
        _kill(pid)
    shutil.rmtree(_start["dir"], ignore_errors=True)
