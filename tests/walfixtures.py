"""Fixtures for the WAL and PITR tests (a pytest plugin: `pytest_plugins = ["tests.walfixtures"]`)."""

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .walhelpers import restore_dir, stop_restored

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def wal_spool(settings):
    """A spool the postgres OS user can reach (pytest's tmp_path is closed to it)."""
    root = Path(tempfile.mkdtemp(prefix="bp-walspool-"))
    root.chmod(0o755)
    settings.WAL_SPOOL = root
    settings.WAL_WAIT_SECONDS = 30
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def restored():
    """Data directories of restored clusters, stopped and removed after the test."""
    made = []

    def make():
        made.append(restore_dir())
        return made[-1]

    yield make
    for datadir in made:
        stop_restored(datadir)


class PortalCLI:
    """The portal as a separate process (manage.py), on its own SQLite file: for kill tests."""

    def __init__(self, var: Path):
        self.var = var
        passphrase = var / "passphrase"
        passphrase.write_text("s3cret-Passphrase-for-cli-tests\n")
        passphrase.chmod(0o600)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PG"))},
            "DJANGO_SETTINGS_MODULE": "backupportal.settings",
            "VAR_DIR": str(var),
            "DATABASE_URL": f"sqlite:///{var}/portal.sqlite3",
            "BACKUP_ROOT": str(var / "backups"),
            "WAL_ROOT": str(var / "wal"),
            "WAL_SPOOL": str(var / "spool"),
            "BACKUP_PASSPHRASE_FILE": str(passphrase),
            "GNUPGHOME": str(var / "gnupg"),
            "SECURE_SSL_REDIRECT": "false",
        }

    def argv(self, *args):
        return [sys.executable, str(REPO / "manage.py"), *args]

    def run(self, *args, check=True):
        proc = subprocess.run(self.argv(*args), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def popen(self, *args):
        return subprocess.Popen(
            self.argv(*args), env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def query(self, sql, params=()):
        with sqlite3.connect(self.var / "portal.sqlite3") as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture(scope="session")
def migrated_portal(pg_base_dir):
    """A migrated portal database file, made once per session and copied by each test."""
    var = Path(tempfile.mkdtemp(prefix="bp-portal-template-"))
    PortalCLI(var).run("migrate", "-v0")
    yield var / "portal.sqlite3"
    shutil.rmtree(var, ignore_errors=True)


@pytest.fixture
def portal_cli(migrated_portal):
    var = Path(tempfile.mkdtemp(prefix="bp-portal-"))
    var.chmod(0o755)  # the postgres user reaches the spool through it
    shutil.copyfile(migrated_portal, var / "portal.sqlite3")
    cli = PortalCLI(var)
    cli.run("migrate", "-v0")  # nothing to apply: it points the storage locations at this test's directories
    yield cli
    shutil.rmtree(var, ignore_errors=True)
