"""What the benchmark builds before it measures: clusters, datasets, the portal, pgBackRest.

Everything lives in one work directory (removed at the end): throwaway clusters from
backupportal.lib.pgcluster, a portal with its own SQLite catalog and settings, and a
pgBackRest repository with encryption on. Nothing touches the machine's own PostgreSQL.
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backupportal.lib import sampledata  # noqa: E402
from backupportal.lib.osuser import as_db_user, chown_to_db_user  # noqa: E402
from backupportal.lib.pgcluster import Cluster  # noqa: E402
from backupportal.lib.pgdatadir import pg_bin  # noqa: E402

DB = "reliabilitymaldives"
SMALL_DB = "reliabilitymaldives_small"
# Every bench cluster's settings: a gigabyte loads and restores without a checkpoint every few seconds.
TUNED = {"shared_buffers": "256MB", "max_wal_size": "2GB", "checkpoint_timeout": "15min"}
PGBENCH_DB = "pgbench"
# The strategy's gpg settings (key derivation kept by the portal too).
S2K = "--s2k-cipher-algo AES256 --s2k-digest-algo SHA512 --s2k-mode 3 --s2k-count 65011712"


class Workspace:
    """The work directory and what lives in it."""

    def __init__(self, parent=None):
        self.root = Path(tempfile.mkdtemp(prefix="bp-bench-", dir=parent or "/var/tmp"))
        self.root.chmod(0o755)  # the postgres user must reach the clusters, the spool and the repo
        for name in ("pg", "pgbackrest", "walcp", "walcpsync", "spool"):
            (self.root / name).mkdir()
            chown_to_db_user(self.root / name)
        # Root's, as the portal makes it: the clusters under it are postgres's, their parents not
        # (a PITR refuses a place whose parents postgres could change, and stages its WAL there).
        (self.root / "sandboxes").mkdir(mode=0o711)
        for name in ("portal", "files", "gnupg"):
            (self.root / name).mkdir(mode=0o700)
        self.passphrase = self.root / "portal" / "passphrase"
        self.passphrase.write_text(secrets.token_urlsafe(24) + "\n")
        self.passphrase.chmod(0o600)
        self.clusters = []

    def cluster(self, template, **settings):
        c = Cluster.create(base_dir=self.root / "pg", template=template, settings=settings)
        c.start()
        self.clusters.append(c)
        return c

    def destroy(self):
        if getattr(self, "portal", None) is not None:
            self.portal.close()  # its resident process first: it holds the catalog open
        for c in self.clusters:
            try:
                c.destroy()
            except Exception as e:  # noqa: BLE001 - clean up as much as we can
                print(f"bench: could not remove {c}: {e}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------- datasets


def positive(kind):
    """An argparse type: a number above zero, or a one-line refusal that says so."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number above zero")
        return value

    return parse


def output_file(text):
    """An argparse type: a file in a directory that exists, refused before anything is built (the
    report is written at the end, after the whole run)."""
    folder = Path(text).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{folder} is not a directory this user can write into: make it first")
    return text


def load_strategy(cluster, dbname, scale):
    cluster.create_database(dbname)
    with cluster.connect(dbname) as conn:
        size = sampledata.create_scaled(conn, scale)
        conn.execute("CHECKPOINT")
    return size


def load_pgbench(cluster, scale):
    cluster.create_database(PGBENCH_DB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    subprocess.run(
        [str(pg_bin() / "pgbench"), "-i", "-q", "-s", str(scale), "-h", cluster.host, "-p", str(cluster.port)]
        + ["-U", "postgres", PGBENCH_DB],
        check=True,
        capture_output=True,
        env=env,
    )
    return db_size(cluster, PGBENCH_DB)


def db_size(cluster, dbname):
    return cluster.execute("SELECT pg_database_size(current_database())", dbname=dbname)[0][0]


def cluster_size(cluster):
    return cluster.execute("SELECT sum(pg_database_size(datname))::bigint FROM pg_database")[0][0]


def compressibility(cluster, dbname):
    """How much the plain SQL dump of the dataset shrinks under zlib level 6 (the issue asks 2-4x)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    dump = subprocess.Popen(
        [str(pg_bin() / "pg_dump"), "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", dbname],
        stdout=subprocess.PIPE,
        env=env,
    )
    z = zlib.compressobj(6)
    raw = compressed = 0
    while chunk := dump.stdout.read(1 << 20):
        raw += len(chunk)
        compressed += len(z.compress(chunk))
    compressed += len(z.flush())
    dump.wait()
    return raw / max(compressed, 1)


# ---------------------------------------------------------------------------- the portal


class Portal:
    """The portal's commands in subprocesses, on a catalog of its own (SQLite) in the workspace."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        var = ws.root / "portal"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(
            DJANGO_SETTINGS_MODULE="backupportal.settings",
            DATABASE_URL=f"sqlite:///{var / 'portal.sqlite3'}",
            VAR_DIR=str(var),
            SECRET_KEY=secrets.token_urlsafe(40),
            BACKUP_ROOT=str(ws.root / "backups"),
            WAL_ROOT=str(ws.root / "backups" / "wal"),
            WAL_SPOOL=str(ws.root / "spool"),
            SANDBOX_ROOT=str(ws.root / "sandboxes"),  # restore tests' clusters: the postgres user must reach them
            BACKUP_PASSPHRASE_FILE=str(ws.passphrase),
            JOURNAL_KEY_FILE=str(var / "journal.key"),
            WAL_WAIT_SECONDS="300",
            PYTHONPATH=str(ROOT),
        )
        self.env.pop("Q_BROKER_URL", None)  # the ORM broker on its own catalog: nothing shared
        self.manage("migrate", "-v", "0")
        self._resident = None

    def resident(self):
        """The portal's process that stays up, as the worker does (bench/resident.py): started at
        the first call, kept for the rest of the run."""
        from .resident import Resident

        if self._resident is None:
            self._resident = Resident(self)
        return self._resident

    def close(self):
        if self._resident is not None:
            self._resident.close()
            self._resident = None

    def argv(self, *args):
        return [sys.executable, str(ROOT / "manage.py"), *args]

    def manage(self, *args):
        proc = subprocess.run(self.argv(*args), env=self.env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def manage_json(self, *args):
        return json.loads(self.manage(*args, "--json").strip().splitlines()[-1])

    def register(self, name, cluster, dbname):
        self.manage("addserver", name, "--dsn", cluster.dsn(dbname))

    def enable_push(self, name, cluster, extra_command=""):
        """archivecommand's lines into the cluster's settings (optionally a second archiver after it)."""
        result = self.manage_json("archivecommand", name)
        command = result["archive_command"]
        if extra_command:
            command = f"{command} && {extra_command}"
        cluster.configure(wal_level="replica", archive_mode="on", archive_command=command, archive_timeout=60)
        cluster.restart()
        return result


# ---------------------------------------------------------------------------- pgBackRest


class PgBackRest:
    """A repository in the workspace with aes-256-cbc encryption, one stanza per cluster."""

    def __init__(self, ws: Workspace, stanzas: dict):
        self.dir = ws.root / "pgbackrest"
        self.conf = self.dir / "pgbackrest.conf"
        self.repo = self.dir / "repo"
        lines = [
            "[global]",
            f"repo1-path={self.repo}",
            "repo1-cipher-type=aes-256-cbc",
            f"repo1-cipher-pass={secrets.token_urlsafe(32)}",
            "repo1-retention-full=2",
            f"log-path={self.dir / 'log'}",
            f"lock-path={self.dir / 'lock'}",
            f"spool-path={self.dir / 'spool'}",
            "log-level-console=warn",
            "log-level-file=off",
            "compress-type=lz4",
            "start-fast=y",
            "process-max=2",
        ]
        for name, cluster in stanzas.items():
            lines += ["", f"[{name}]", f"pg1-path={cluster.datadir}", f"pg1-port={cluster.port}"]
            lines += [f"pg1-socket-path={cluster.socket_dir}"]
        for sub in ("repo", "log", "lock", "spool"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o600)
        chown_to_db_user(self.dir)

    def argv(self, stanza, *args):
        return as_db_user(["pgbackrest", f"--config={self.conf}", f"--stanza={stanza}", *args])

    def run(self, stanza, *args):
        proc = subprocess.run(self.argv(stanza, *args), capture_output=True, text=True, cwd="/")
        if proc.returncode != 0:
            raise RuntimeError(f"pgbackrest {' '.join(args)}: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def archive_command(self, stanza, asynchronous=False):
        extra = " --archive-async" if asynchronous else ""
        return f"pgbackrest --config={self.conf} --stanza={stanza}{extra} archive-push %p"

    def last_backup_size(self, stanza):
        info = json.loads(self.run(stanza, "info", "--output=json"))
        return info[0]["backup"][-1]["info"]["repository"]["delta"]

    def archived_count(self, stanza):
        folder = self.repo / "archive" / stanza
        return sum(1 for p in folder.rglob("*") if len(p.name) > 24 and p.name[24] == "-" and p.is_file())


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
