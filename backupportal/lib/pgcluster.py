"""Throwaway PostgreSQL clusters for tests, the demo and the benchmarks.

Production code never imports this harness: what both need (the database OS user, a free
port, the one pg_ctl wrapper) is in backupportal.lib.osuser; the files of a throwaway cluster
(pg_bin, initdb, the template, our settings file) are in backupportal.lib.pgdatadir.

This module starts real PostgreSQL servers (never mocks): ``initdb`` once into a
*template* data directory, then copy that template for every cluster, which is
much faster than running ``initdb`` again.

It uses only the standard library and psycopg, and must never import Django:
the demo and the benchmarks use it without a configured Django project.

Layout of a cluster made by :meth:`Cluster.create`::

    <base_dir>/              private directory (mkdtemp), owned by the db user
        .bp-pgcluster        marker: this base dir was made here and may be rm -rf'd
        data/                the data directory (PGDATA)
        data/pgcluster.conf  settings this module owns, included from postgresql.conf
        run/                 unix_socket_directories (private, so no socket clashes)
        postgres.log         server log (pg_ctl -l)

Running as root: ``initdb`` and ``postgres`` refuse to run as root, so every
server-side program is run as the ``postgres`` OS user through
``runuser -u postgres --`` and every directory the server touches is chowned to
that user. The parent of a base directory must be traversable by ``postgres``;
pytest's ``tmp_path`` (under ``/tmp/pytest-of-root``, mode 0700) is not, so
callers should let this module make its own directory with ``base_dir=None``
(the system temp dir) or pass a directory made by ``tempfile.mkdtemp`` and
chowned with :func:`chown_to_db_user`.

Access rules (pg_hba.conf): the ``postgres`` superuser is trusted over the
socket and over TCP on 127.0.0.1; every other role must authenticate with
SCRAM over TCP, so "wrong password" can be tested for real.

Clean-up: :meth:`Cluster.destroy` always stops the server before removing its
files, and an ``atexit`` hook stops every cluster this process started and
left running. Nothing can run after SIGKILL, so a killed process can leave a
server behind (its directories are named ``bp-pg-*`` under the temp dir).
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Self

import psycopg
from psycopg import sql

from backupportal.lib.osuser import chown_to_db_user, free_port, pg_ctl
from backupportal.lib.pgdatadir import (
    CONF_FILE,
    SUPERUSER,
    ClusterError,
    copy_template,
    ensure_include,
    initdb,
    make_base_dir,
    pg_bin,
    process_alive,
    render,
    wait_gone,
    write_as_db_user,
)

__all__ = ["Cluster", "ClusterError", "stop_all", "stop_left_running"]

#: Marker written into base directories this module created (see destroy()).
MARKER_FILE = ".bp-pgcluster"

#: How often start() picks a new port when the chosen one was taken meanwhile.
PORT_RETRIES = 3

# Lines of the server log that mean "the TCP port is already in use".
_PORT_IN_USE = re.compile(r"could not bind IPv4 address|Address already in use|could not create any TCP/IP sockets")

# A setting name as postgresql.conf accepts it (custom settings contain a dot).
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


# ---------------------------------------------------------------------- clean-up


# Clusters started by this process and not yet stopped, by id(). Strong references
# on purpose: a cluster object dropped while running must still be stopped at exit.
_running: dict[int, Cluster] = {}
_running_lock = threading.Lock()


def stop_all() -> None:
    """Stop every cluster this process started that is still running.

    Registered with atexit. Clusters are only stopped by the process that
    started them: a forked child (multiprocessing, django-q2 workers) that
    exits must not stop its parent's servers.
    """
    with _running_lock:
        clusters = list(_running.values())
    for cluster in clusters:
        if cluster._started_by_pid != os.getpid():
            continue
        try:
            cluster._stop_hard()
        except Exception as exc:  # noqa: BLE001 - report it and go on with the others
            print(f"pgcluster: could not stop {cluster}: {exc}", file=sys.stderr)


atexit.register(stop_all)


def stop_left_running(datadir) -> None:
    """Stop (immediate) a server that something else left running in ``datadir``: a restore's."""
    if (Path(datadir) / "postmaster.pid").exists():
        pg_ctl(pg_bin() / "pg_ctl", datadir, "stop", "-m", "immediate", "-w")


# ----------------------------------------------------------------------- cluster


class Cluster:
    """A throwaway PostgreSQL cluster: data directory, port, private socket dir.

    Create one with :meth:`create` (from a :meth:`template` for speed), then
    :meth:`start` it, or use it as a context manager (``__enter__`` starts,
    ``__exit__`` destroys). The superuser is ``postgres``; TCP listens on
    127.0.0.1 only.
    """

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(self, datadir, port: int | None = None, bin_dir=None):
        """Wrap the data directory ``datadir`` (nothing is written until start/configure).

        The base directory is ``datadir``'s parent: the socket directory and the
        log file live there. ``port`` defaults to the one in our settings file
        if present, else a free port. An explicit ``port`` is never changed by
        start(); a chosen one is replaced when found taken. ``bin_dir`` is the directory of the
        binaries that run it (another major version's); default pg_bin().
        """
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self.datadir = Path(datadir).absolute()
        self.base_dir = self.datadir.parent
        self.socket_dir = self.base_dir / "run"
        self.logfile = self.base_dir / "postgres.log"
        self.conf_file = self.datadir / CONF_FILE
        self._settings: dict[str, str] = self._read_settings()
        self._port_fixed = port is not None
        if port is None:
            stored = self._settings.get("port")
            port = int(stored) if stored and stored.isdigit() else free_port()
        self.port = int(port)
        self._started_by_pid: int | None = None

    @property
    def bin_dir(self) -> Path:
        """Where this cluster's programs are (initdb, pg_ctl, and the matching client tools)."""
        return self._bin_dir or pg_bin()

    def __repr__(self) -> str:
        return f"<Cluster {self.datadir} port={self.port}>"

    # ---------------------------------------------------------------- creation

    @classmethod
    def template(cls, base_dir=None, wal_segsize_mb: int = 1, bin_dir=None) -> Path:
        """``initdb`` once into a new directory under ``base_dir``; return the data directory.

        Pass the result as ``template=`` to :meth:`create`. The template is
        never started; the caller removes it (its parent directory) when done.
        """
        base = make_base_dir(base_dir, "bp-pg-template-")
        datadir = base / "data"
        initdb(datadir, wal_segsize_mb, cwd=base, bin_dir=bin_dir)
        return datadir

    @classmethod
    def create(
        cls,
        base_dir=None,
        template=None,
        wal_segsize_mb: int = 1,
        port: int | None = None,
        settings: dict | None = None,
        bin_dir=None,
    ) -> Cluster:
        """A new, stopped cluster in a private directory under ``base_dir`` (default: temp dir).

        With ``template`` (a stopped data directory from :meth:`template`) the
        data directory is copied, not initdb'd; ``wal_segsize_mb`` is then the
        template's and the argument is ignored. ``settings`` are applied on top
        of the defaults with :meth:`configure`. ``bin_dir``: binaries of another major version
        (the template must be of that version too).
        """
        base = make_base_dir(base_dir, "bp-pg-")
        try:
            datadir = base / "data"
            if template is not None:
                copy_template(Path(template), datadir)
            else:
                initdb(datadir, wal_segsize_mb, cwd=base, bin_dir=bin_dir)
            (base / MARKER_FILE).write_text("made by backupportal.lib.pgcluster; removed by destroy()\n")
            cluster = cls(datadir, port=port, bin_dir=bin_dir)
            cluster._prepare()
            cluster._apply(
                listen_addresses=cls.host,
                port=cluster.port,
                unix_socket_directories=str(cluster.socket_dir),
                wal_level="replica",
                max_wal_senders=5,
                archive_mode="off",
                shared_buffers="32MB",
                max_connections=50,
                logging_collector=False,
                password_encryption="scram-sha-256",
                # Shown in process titles ("postgres: bp-pg-xxxx: checkpointer").
                cluster_name=base.name,
                # Leave fsync and synchronous_commit at their defaults: durability
                # tests (crash, PITR) must see what a real server does.
            )
            if settings:
                cluster.configure(**settings)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        return cluster

    def _prepare(self) -> None:
        """Make sure the socket dir exists and postgresql.conf includes our file."""
        if not self.socket_dir.is_dir():
            self.socket_dir.mkdir(mode=0o700)
            chown_to_db_user(self.socket_dir)
        ensure_include(self.datadir)

    # ---------------------------------------------------------------- settings

    def configure(self, **settings) -> None:
        """Set (or, with value None, remove) server settings in our include file.

        Values: bool -> on/off, int -> number, str -> quoted string (so sizes
        and times are strings: ``shared_buffers="64MB"``). Names with a dot go
        through ``**{"auto_explain.log_min_duration": 0}``. The file is
        rewritten at once; most settings need :meth:`reload` or
        :meth:`restart` to take effect. A port set here is the caller's
        choice: start() will not replace it when it is taken.
        """
        self._apply(**settings)
        if settings.get("port") is not None:
            self.port = int(settings["port"])
            self._port_fixed = True

    def _apply(self, **settings) -> None:
        """Update our settings and rewrite the include file."""
        for name, value in settings.items():
            if not _SETTING_NAME.match(name):
                raise ValueError(f"not a setting name: {name!r}")
            if value is None:
                self._settings.pop(name, None)
            else:
                self._settings[name] = render(value)
        lines = ["# Written by backupportal.lib.pgcluster; Cluster.configure() rewrites it."]
        lines += [f"{name} = {value}" for name, value in self._settings.items()]
        write_as_db_user(self.conf_file, "\n".join(lines) + "\n", mode=0o600)

    def _read_settings(self) -> dict[str, str]:
        """Our include file as {name: rendered value} (empty when absent)."""
        result: dict[str, str] = {}
        try:
            text = self.conf_file.read_text()
        except FileNotFoundError:
            return result
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            name, value = line.split("=", 1)
            result[name.strip()] = value.strip()
        return result

    def _set_port(self, port: int) -> None:
        """Change the port we chose (not one the caller fixed)."""
        self.port = port
        self._apply(port=port)

    # --------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60) -> None:
        """Start the server (pg_ctl -w) and wait until a TCP connection succeeds.

        If the port turned out to be taken and we chose it, pick another free
        port and try again (:data:`PORT_RETRIES` times). Failures raise
        :class:`ClusterError` with the server log tail.
        """
        if self.is_running():
            return
        self._prepare()
        if self._settings.get("port") != str(self.port):
            self._apply(port=self.port)
        for attempt in range(PORT_RETRIES + 1):
            log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
            deadline = time.monotonic() + timeout
            proc = self._pg_ctl(
                "start", "-w", "-t", str(int(timeout)), "-l", str(self.logfile), cwd=self.base_dir, timeout=timeout + 30
            )
            if proc.returncode == 0:
                self._register()
                self._wait_for_connection(deadline)
                return
            new_log = self._log_since(log_offset)
            if self.is_running():
                # pg_ctl gave up waiting but the postmaster lives: do not leave it behind.
                self._register()
                self.stop(mode="immediate")
            port_taken = _PORT_IN_USE.search(new_log) is not None
            if port_taken and not self._port_fixed and attempt < PORT_RETRIES:
                self._set_port(free_port())
                continue
            raise ClusterError(
                f"could not start PostgreSQL in {self.datadir} on port {self.port}"
                f"{' (port in use)' if port_taken else ''}: "
                f"{(proc.stdout + proc.stderr).strip()}\n--- server log ---\n{self.log_tail()}"
            )

    def _wait_for_connection(self, deadline: float) -> None:
        last_error: Exception | None = None
        while True:
            try:
                with self.connect(connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"PostgreSQL in {self.datadir} started but refuses connections on "
                    f"{self.host}:{self.port}: {last_error}\n--- server log ---\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server (pg_ctl stop -m mode); nothing happens if it is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode: {mode!r}")
        if not self.is_running():
            self._unregister()
            return
        proc = self._pg_ctl(
            "stop",
            "-w",
            "-t",
            str(int(timeout)),
            "-m",
            mode,
            cwd=self.base_dir if self.base_dir.is_dir() else Path("/"),
            timeout=timeout + 30,
        )
        if proc.returncode != 0 and self.is_running():
            raise ClusterError(
                f"could not stop PostgreSQL in {self.datadir}: {(proc.stdout + proc.stderr).strip()}"
                f"\n--- server log ---\n{self.log_tail()}"
            )
        self._unregister()

    def restart(self, timeout: float = 60) -> None:
        """Stop (fast) and start again; picks up every changed setting."""
        self.stop()
        self.start(timeout=timeout)

    def reload(self) -> None:
        """Tell the server to re-read its configuration files (pg_ctl reload)."""
        proc = self._pg_ctl("reload", cwd=self.base_dir, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"could not reload PostgreSQL in {self.datadir}: {(proc.stdout + proc.stderr).strip()}")

    def _pg_ctl(self, *args, cwd, timeout):
        """PG_BIN's pg_ctl on this cluster (osuser.pg_ctl, the one wrapper); a timeout is a ClusterError."""
        try:
            return pg_ctl(self.bin_dir / "pg_ctl", self.datadir, *args, cwd=cwd, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"pg_ctl {args[0]} did not finish within {timeout}s in {self.datadir}") from exc

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, from postmaster.pid, or None."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def is_running(self) -> bool:
        """True when a live postmaster holds this data directory."""
        return self.postmaster_pid() is not None

    def _stop_hard(self) -> None:
        """Stop by any means: fast, then immediate, then SIGKILL the postmaster."""
        try:
            self.stop(mode="fast")
        except ClusterError:
            try:
                self.stop(mode="immediate")
            except ClusterError:
                pid = self.postmaster_pid()
                if pid is not None:
                    # Backends exit on their own once the postmaster is gone.
                    os.kill(pid, signal.SIGKILL)
                    wait_gone(pid, 30)
                self._unregister()

    def destroy(self) -> None:
        """Stop the server (whatever it takes), then remove its files.

        The whole base directory goes when this module created it (marker file
        present); for a data directory made elsewhere only the data directory,
        socket directory and log file go, never the parent directory.
        """
        self._stop_hard()
        if (self.base_dir / MARKER_FILE).exists():
            doomed = [self.base_dir]
        else:
            doomed = [self.datadir, self.socket_dir]
            self.logfile.unlink(missing_ok=True)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                raise ClusterError(f"could not remove {path}")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    def _register(self) -> None:
        self._started_by_pid = os.getpid()
        with _running_lock:
            _running[id(self)] = self

    def _unregister(self) -> None:
        with _running_lock:
            _running.pop(id(self), None)

    # ---------------------------------------------------------------- clients

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """libpq URI, e.g. ``postgresql://postgres@127.0.0.1:54321/postgres``."""
        quote = functools.partial(urllib.parse.quote, safe="")
        return f"postgresql://{quote(user)}@{self.host}:{self.port}/{quote(dbname)}"

    def connect(self, dbname: str = "postgres", **kw) -> psycopg.Connection:
        """psycopg connection over TCP, autocommit on; ``kw`` overrides (user, password, ...)."""
        params = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
            "autocommit": True,
            "connect_timeout": 10,
        }
        params.update(kw)
        return psycopg.connect(**params)

    def execute(self, query, params=None, dbname: str = "postgres") -> list[tuple]:
        """Run one statement on a fresh connection; its rows, or [] when it returns none."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE name (quoted as an identifier)."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        self.execute(query)

    def create_role(
        self,
        name: str,
        password: str | None = None,
        superuser: bool = False,
        login: bool = True,
    ) -> None:
        """CREATE ROLE; the server stores ``password`` as a SCRAM verifier.

        Utility statements take no bind parameters, so the password is sent as
        a client-side quoted literal (not logged: log_statement is off).
        """
        query = sql.SQL("CREATE ROLE {} WITH {} {}").format(
            sql.Identifier(name),
            sql.SQL("LOGIN" if login else "NOLOGIN"),
            sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
        )
        if password is not None:
            query += sql.SQL(" PASSWORD {}").format(sql.Literal(password))
        self.execute(query)

    # ------------------------------------------------------------------- logs

    def log_tail(self, n: int = 50) -> str:
        """Last ``n`` lines of the server log ('' when there is none yet)."""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def _log_since(self, offset: int) -> str:
        try:
            with self.logfile.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
