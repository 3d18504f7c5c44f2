"""Tests of the throwaway-cluster harness against real PostgreSQL servers."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from backupportal.lib.osuser import as_db_user
from backupportal.lib.pgcluster import Cluster, ClusterError
from backupportal.lib.pgdatadir import pg_bin

REPO_ROOT = Path(__file__).resolve().parent.parent


def server_major() -> int:
    """Major version of the binaries in pg_bin() ("postgres (PostgreSQL) 15.20" -> 15)."""
    out = subprocess.run(
        [str(pg_bin() / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"\(PostgreSQL\) (\d+)", out.stdout).group(1))


def process_tree(pid: int) -> set[int]:
    """``pid`` and its direct children (the postmaster's backends and workers)."""
    pids = {pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            pids.add(int(entry.name))
    return pids


def live(pid: int) -> bool:
    """True when /proc shows ``pid`` as a process that is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def pg_ctl_status(cluster: Cluster) -> int:
    """Exit status of ``pg_ctl status`` (0 running, 3 not running, 4 no data directory)."""
    argv = as_db_user([str(pg_bin() / "pg_ctl"), "status", "-D", str(cluster.datadir)])
    return subprocess.run(argv, check=False, capture_output=True, cwd="/").returncode


def test_cluster_accepts_connection_and_query(pg_cluster):
    major = server_major()
    assert major >= 15
    [(version, user)] = pg_cluster.execute("SELECT version(), current_user")
    assert version.startswith(f"PostgreSQL {major}.")
    assert user == "postgres"
    # The DSN is usable as is, by libpq and anything else that takes a URI.
    with psycopg.connect(pg_cluster.dsn()) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
    assert pg_cluster.dsn("some db") == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/some%20db"
    assert pg_cluster.execute("CREATE TABLE t (i int)") == []


def test_wal_and_server_settings(pg_cluster):
    def show(name):
        return pg_cluster.execute("SELECT current_setting(%s)", (name,))[0][0]

    assert show("wal_level") == "replica"
    assert show("wal_segment_size") == "1MB"
    assert pg_cluster.execute("SELECT setting, unit FROM pg_settings WHERE name = 'wal_segment_size'") == [
        (str(1024 * 1024), "B")
    ]
    assert show("listen_addresses") == "127.0.0.1"
    assert show("port") == str(pg_cluster.port)
    assert show("archive_mode") == "off"
    assert show("fsync") == "on"
    assert show("password_encryption") == "scram-sha-256"
    assert show("max_wal_senders") == "5"
    assert show("unix_socket_directories") == str(pg_cluster.socket_dir)
    [(encoding,)] = pg_cluster.execute(
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'postgres'"
    )
    assert encoding == "UTF8"


def test_second_cluster_from_template_is_fast_and_independent(pg_cluster, pg_template, pg_base_dir):
    started = time.monotonic()
    other = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    try:
        other.start()
        elapsed = time.monotonic() - started
        # initdb takes about a second here; copy + start takes a fraction of that.
        assert elapsed < 10, f"copying the template and starting took {elapsed:.1f}s"

        assert other.port != pg_cluster.port
        assert other.datadir != pg_cluster.datadir
        [(sysid_a,)] = pg_cluster.execute("SELECT system_identifier FROM pg_control_system()")
        [(sysid_b,)] = other.execute("SELECT system_identifier FROM pg_control_system()")
        assert sysid_a == sysid_b  # copies of one initdb share it; data is still separate:

        pg_cluster.execute("CREATE TABLE only_in_first (i int)")
        other.create_database("only_in_second")
        assert other.execute("SELECT to_regclass('only_in_first')") == [(None,)]
        assert pg_cluster.execute("SELECT 1 FROM pg_database WHERE datname = 'only_in_second'") == []
        assert other.execute("SELECT current_database()", dbname="only_in_second") == [("only_in_second",)]

        other.stop()
        assert pg_cluster.execute("SELECT count(*) FROM only_in_first") == [(0,)]
    finally:
        other.destroy()


def test_stop_leaves_no_server_process(pg_cluster):
    pid = pg_cluster.postmaster_pid()
    assert pid is not None
    assert live(pid)
    tree = process_tree(pid)
    assert len(tree) > 1, "a running postmaster has background workers"
    assert pg_ctl_status(pg_cluster) == 0

    pg_cluster.stop()

    assert not pg_cluster.is_running()
    assert pg_ctl_status(pg_cluster) == 3
    assert [p for p in tree if live(p)] == []
    assert not (pg_cluster.datadir / "postmaster.pid").exists()
    pg_cluster.stop()  # stopping a stopped cluster is not an error

    pg_cluster.start()
    assert pg_cluster.execute("SELECT 1") == [(1,)]


def test_destroy_removes_directory_and_stops(pg_template, pg_base_dir):
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    base = cluster.base_dir
    assert base.parent == pg_base_dir
    assert (cluster.datadir / "PG_VERSION").is_file()
    cluster.start()
    pid = cluster.postmaster_pid()

    cluster.destroy()

    assert not base.exists()
    assert not live(pid)
    cluster.destroy()  # idempotent


def test_context_manager_starts_and_destroys(pg_template, pg_base_dir):
    with Cluster.create(base_dir=pg_base_dir, template=pg_template) as cluster:
        assert cluster.is_running()
        assert cluster.execute("SELECT 42") == [(42,)]
        base = cluster.base_dir
    assert not base.exists()


def test_password_role_over_tcp(pg_cluster):
    pg_cluster.create_role("alice", password="right horse battery")
    [(verifier,)] = pg_cluster.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'")
    assert verifier.startswith("SCRAM-SHA-256$")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg_cluster.connect(user="alice", password="wrong")
    with pytest.raises(psycopg.OperationalError):
        pg_cluster.connect(user="alice")  # no password at all

    with pg_cluster.connect(user="alice", password="right horse battery") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)

    # The superuser needs no password over TCP on 127.0.0.1 (the harness relies on it).
    with pg_cluster.connect(user="postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_configure_quotes_values_and_restart_applies_them(pg_cluster):
    name = "it's a \\ test"
    pg_cluster.configure(cluster_name=name, work_mem="8MB", log_min_messages="warning")
    pg_cluster.restart()
    assert pg_cluster.execute("SELECT current_setting('cluster_name'), current_setting('work_mem')") == [(name, "8MB")]
    # None removes our setting: back to the server default after a reload.
    pg_cluster.configure(work_mem=None)
    pg_cluster.reload()
    deadline = time.monotonic() + 10
    while pg_cluster.execute("SHOW work_mem") != [("4MB",)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg_cluster.execute("SHOW work_mem") == [("4MB",)]
    with pytest.raises(ValueError, match="not a setting name"):
        pg_cluster.configure(**{"bad name; DROP": 1})


def test_start_failure_raises_with_log_tail(pg_template, pg_base_dir):
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template, settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(ClusterError) as excinfo:
            cluster.start(timeout=30)
        message = str(excinfo.value)
        assert "server log" in message
        assert "shared_buffers" in message  # the server's own complaint, from the log
        assert not cluster.is_running()
    finally:
        cluster.destroy()


def listen_on(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_taken_port_is_replaced_when_we_chose_it(pg_template, pg_base_dir):
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    squatter = listen_on(cluster.port)
    try:
        taken = cluster.port
        cluster.start()
        assert cluster.port != taken
        assert cluster.execute("SHOW port") == [(str(cluster.port),)]
    finally:
        squatter.close()
        cluster.destroy()


def test_taken_port_is_an_error_when_the_caller_fixed_it(pg_template, pg_base_dir):
    squatter = listen_on(0)
    port = squatter.getsockname()[1]
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template, port=port)
    try:
        with pytest.raises(ClusterError, match="port in use"):
            cluster.start(timeout=30)
        assert cluster.port == port
    finally:
        squatter.close()
        cluster.destroy()


def test_unreachable_base_dir_is_refused_with_a_clear_error():
    if os.geteuid() != 0:
        pytest.skip("only root can make a directory the postgres user cannot reach")
    # Like pytest's tmp_path as root: a subdirectory of a 0700 root-owned directory.
    private = Path(tempfile.mkdtemp(prefix="bp-pg-private-"))
    try:
        inner = private / "tmp_path"
        inner.mkdir(mode=0o777)
        with pytest.raises(ClusterError, match="cannot traverse"):
            Cluster.create(base_dir=inner)
        assert list(inner.iterdir()) == []
    finally:
        shutil.rmtree(private)


def test_process_exit_stops_its_clusters_but_a_forked_child_does_not(pg_template, pg_base_dir):
    """The atexit hook stops what this process started, and only in this process."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from backupportal.lib.pgcluster import Cluster
        cluster = Cluster.create(base_dir={str(pg_base_dir)!r}, template={str(pg_template)!r})
        cluster.start()
        child = os.fork()
        if child == 0:
            sys.exit(0)  # runs atexit hooks in the child: they must leave the server alone
        os.waitpid(child, 0)
        assert cluster.is_running(), "a forked child's exit stopped the parent's cluster"
        print(cluster.postmaster_pid(), cluster.base_dir)
        # exit without stop() or destroy()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    pid_text, base = proc.stdout.split()
    try:
        assert not live(int(pid_text)), "the server outlived the process that started it"
    finally:
        Cluster(Path(base) / "data").destroy()
