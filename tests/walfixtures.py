"""Fixtures for the WAL and PITR tests (a pytest plugin: `pytest_plugins = ["tests.walfixtures"]`)."""

import shutil
import tempfile
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
