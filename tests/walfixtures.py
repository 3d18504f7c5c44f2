"""Fixtures for the WAL and PITR tests (a pytest plugin: `pytest_plugins = ["tests.walfixtures"]`)."""

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from backupportal.lib.pgcluster import stop_left_running
from tests.helpers import restore_dir, stop_restored


@pytest.fixture
def wal_spool(settings):
    """A spool the postgres OS user can reach (pytest's tmp_path is closed to it)."""
    root = Path(tempfile.mkdtemp(prefix="bp-walspool-"))
    root.chmod(0o755)
    settings.WAL_SPOOL = root
    settings.WAL_WAIT_SECONDS = 30
    yield root
    remove_spool(root)


def remove_spool(root, seconds=10):
    """The spool, gone. A cluster the test started before asking for the spool is stopped after
    it, and its archive command may still be writing into the spool meanwhile: a segment written
    while rmtree walked the tree left a directory behind (seen once on a slow machine). Once the
    spool's own directory is gone, nothing makes it again: the archive command writes into it, never
    makes it (backups.archive_wal)."""
    deadline = time.monotonic() + seconds
    while True:
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


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


@pytest.fixture
def sandbox_root(settings):
    """SANDBOX_ROOT of its own, so the test can see what is left in it; running clusters stopped after."""
    root = Path(tempfile.mkdtemp(prefix="bp-sandboxes-"))
    root.chmod(0o755)
    settings.SANDBOX_ROOT = root
    yield root
    for pid_file in list(root.glob("*/postmaster.pid")):
        stop_left_running(pid_file.parent)
    shutil.rmtree(root, ignore_errors=True)
