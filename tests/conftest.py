"""Shared pytest fixtures.

PostgreSQL: real throwaway clusters from backupportal.lib.pgcluster (never mocks).
initdb runs once per session into a template data directory; every cluster
fixture copies that template, starts it and destroys it afterwards.

Everything lives under one session directory made with tempfile.mkdtemp and
chowned to the ``postgres`` OS user: pytest's own tmp_path is under a 0700
root directory that ``postgres`` cannot reach when the tests run as root.
tempfile honours TMPDIR: ``TMPDIR=/dev/shm pytest`` puts the clusters on tmpfs,
which is much faster where creating files on disk is slow (the template holds
about a thousand files).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from backupportal.lib.pgcluster import Cluster, chown_to_db_user, stop_all


@pytest.fixture(scope="session")
def pg_base_dir():
    """Session directory that holds the template and every cluster; removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="bp-pg-session-"))
    os.chmod(base, 0o700)
    chown_to_db_user(base)
    yield base
    # A test that made its own Cluster and forgot to destroy it must not leave a
    # server running on a deleted data directory: stop everything first.
    stop_all()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_base_dir):
    """Path of a stopped, initdb'd data directory (1 MB WAL segments) to copy."""
    return Cluster.template(base_dir=pg_base_dir, wal_segsize_mb=1)


def _running_cluster(pg_base_dir, pg_template):
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_cluster(pg_base_dir, pg_template):
    """A running throwaway cluster for one test (superuser ``postgres``, trust on 127.0.0.1)."""
    yield from _running_cluster(pg_base_dir, pg_template)


@pytest.fixture(scope="module")
def pg_cluster_module(pg_base_dir, pg_template):
    """A running throwaway cluster shared by the tests of one module."""
    yield from _running_cluster(pg_base_dir, pg_template)
