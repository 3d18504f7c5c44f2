"""Restores and restore tests whose worker died: failed where everyone sees it, and what they had
made removed, so that a half-restored copy of production is never taken for a restore.

A worker killed mid-restore (django-q2's timeout, a crash, a reboot) would otherwise leave its
row "running" for ever, its request "running", and its database or cluster behind. Alive means
what it means for backup runs (backups.runner): a heartbeat every HEARTBEAT_EVERY seconds
(runner.beating) and, on the host that runs it, a pid that still exists.

Databases are removed from any host (they are reached through their server's DSN); a cluster
directory only on the host whose disk holds it: every point-in-time restore first removes those
of its host (remove_leftovers), and so does the monitor's pass on its own.
"""

import logging
import shutil
import socket
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from backupportal import conditions, journal
from backupportal.lib.pgdatadir import process_alive
from backups.binaries import pg_ctl
from backups.runner import ORPHAN_AFTER
from restores.models import RestoreRequest, RestoreRun, RestoreTest
from restores.pitr_extract import empty
from restores.targetdb import RestoreFailed, database_exists, dropped

HOST = socket.gethostname()
ACTOR = "job:orphans"

log = logging.getLogger(__name__)


def fail_orphans():
    """Fail the dead restores and restore tests, settle their requests, remove what they left
    on this host. Returns the restores and tests failed."""
    failed = [*_dead_restores(), *_dead_tests(), *_tests_never_started()]
    _settle_requests()
    remove_leftovers()
    return failed


def why_dead(row, now=None):
    """Why `row` (a running restore or test) is taken for dead; "" while it lives."""
    beat = row.heartbeat_at or row.started_at
    if row.pid and (row.host or HOST) == HOST and not process_alive(row.pid):
        return f"the process running it (pid {row.pid}) died"
    if (now or timezone.now()) - beat > ORPHAN_AFTER:
        return f"no heartbeat since {timezone.localtime(beat):%Y-%m-%d %H:%M:%S}"
    return ""


def _dead_restores():
    failed = []
    for restore in RestoreRun.objects.filter(status=RestoreRun.Status.RUNNING).select_related("server", "into_server"):
        if not (why := why_dead(restore)):
            continue
        # Claimed by the update: a process that finishes meanwhile keeps its own outcome.
        if RestoreRun.objects.filter(pk=restore.pk, status=RestoreRun.Status.RUNNING).update(
            status=RestoreRun.Status.FAILED, finished_at=timezone.now(), error=f"interrupted: {why}"[:2000]
        ):
            _settle_restore(restore, why)
            failed.append(restore)
    return failed


def _settle_restore(restore, why):
    """The failed run's line says what became of what it made; journaled as any failed restore."""
    error = f"interrupted: {why}; {_remove_made(restore)}"
    RestoreRun.objects.filter(pk=restore.pk).update(error=error[:2000], left=restore.left)
    restore.error, restore.status = error, RestoreRun.Status.FAILED
    journal.record(
        "pitr_failed" if restore.kind == RestoreRun.Kind.PITR else "restore_failed",
        actor=ACTOR,
        obj=restore,
        server=restore.server.name,
        outcome="failed",
        error=error,
        into=restore.into_database or restore.into_datadir,
    )


def _remove_made(restore):
    """Remove what `restore` had made (its `left`, emptied when done); one clause saying what became of it."""
    made = restore.left or {}
    if restore.kind == RestoreRun.Kind.REPLACE and made.get("database"):
        return _settle_replace(restore, made)
    if made.get("database"):
        left = dropped(restore.into_server, made["database"])
        restore.left = made if left else {}
        return left or f"the database {made['database']} it was restoring into was dropped"
    if made.get("datadir"):
        if (restore.host or HOST) != HOST:
            return f"its cluster in {made['datadir']} is stopped and removed on {restore.host} by the next PITR there"
        return remove_datadir(restore)
    return "it had made nothing yet"


def _settle_replace(restore, made):
    """Before its swap, production was never touched: the copy goes. After it (one transaction),
    production holds the backup and the previous database is kept: both are said."""
    server, prod, kept = restore.into_server, restore.into_database, made.get("kept_as", "")
    try:
        swapped = bool(kept) and database_exists(server, kept)
    except RestoreFailed as e:
        return f"whether production {prod} was replaced could not be checked ({e}): check {prod} and {kept} by hand"
    if swapped:
        restore.left = {}
        return f"it stopped after its swap: production {prod} holds the backup, the previous database is kept as {kept}"
    left = dropped(server, made["database"])
    restore.left = made if left else {}
    return f"production {prod} is unchanged; " + (left or f"the copy {made['database']} was dropped")


def remove_leftovers():
    """On this host: stop and remove the clusters of restores failed as interrupted (their `left`)."""
    for restore in RestoreRun.objects.filter(status=RestoreRun.Status.FAILED, host=HOST).exclude(left={}):
        if restore.left.get("datadir"):
            said = remove_datadir(restore)
            log.info("restore #%s: %s", restore.pk, said)


def remove_datadir(restore):
    """Stop the cluster a dead restore started (if it did) and remove its directory (empty it, a
    directory the DBA gave); the clause saying so, or what is left."""
    datadir = Path(restore.left["datadir"])
    try:
        if (datadir / "postmaster.pid").exists():
            pg_ctl(datadir, "stop", "-m", "immediate", "-w")  # its PG_VERSION says which pg_ctl
        if restore.left.get("created"):
            shutil.rmtree(datadir, ignore_errors=True)
        elif datadir.exists():
            empty(datadir)
    except Exception as e:  # noqa: BLE001 - said on the run; the next sweep tries again
        return f"its cluster in {datadir} could not be removed ({type(e).__name__}: {e}): remove it by hand"
    RestoreRun.objects.filter(pk=restore.pk).update(left={})
    restore.left = {}
    return f"its cluster in {datadir} was stopped and removed"


def _dead_tests():
    failed = []
    for test in RestoreTest.objects.filter(status=RestoreTest.Status.RUNNING, pid__isnull=False):
        if why := why_dead(test):
            if _fail_test(test, f"interrupted: {why}"):
                failed.append(test)
    return failed


def _tests_never_started():
    """A test a DBA asked for whose task the broker lost (or no worker takes) would run for ever."""
    limit = timezone.now() - timedelta(seconds=settings.QUEUED_RUN_TIMEOUT)
    failed = []
    for test in RestoreTest.objects.filter(status=RestoreTest.Status.RUNNING, pid__isnull=True, started_at__lt=limit):
        waited = int((timezone.now() - test.started_at).total_seconds() // 60)
        why = f"queued for {waited} minutes and never started: is the restore worker (manage.py qcluster) running?"
        if _fail_test(test, why):
            failed.append(test)
    return failed


def _fail_test(test, why):
    """Failed, only while still running; its scratch databases dropped (a test drops its copy
    when it ends: one there now was left by the dead one)."""
    now = timezone.now()
    if not RestoreTest.objects.filter(pk=test.pk, status=RestoreTest.Status.RUNNING).update(
        status=RestoreTest.Status.FAILED, finished_at=now, phase="", error=why[:2000]
    ):
        return False
    left = []
    for restore in (
        test.restores.filter(kind=RestoreRun.Kind.LOGICAL).exclude(into_database="").select_related("into_server")
    ):
        left += [said] if (said := dropped(restore.into_server, restore.into_database)) else []
    test.error = "; ".join([why, *left])[:2000]
    checks = [{"name": "restore", "ok": False, "detail": test.error}]
    RestoreTest.objects.filter(pk=test.pk).update(error=test.error, checks=checks)
    journal.record(
        "restore_test_failed",
        actor=ACTOR,
        obj=test,
        server=test.server.name,
        outcome="failed",
        monthly=test.monthly,
        kind=test.kind,
        error=test.error,
    )
    conditions.changed("restore_test_failed", server=test.server)
    return True


def _settle_requests():
    """A request left running by a dead restore takes its run's outcome (its run was failed above)."""
    for request in RestoreRequest.objects.filter(status=RestoreRequest.Status.RUNNING):
        newest = request.runs.order_by("-created_at").first()
        if newest is None or not newest.done:
            continue
        ok = newest.succeeded
        RestoreRequest.objects.filter(pk=request.pk, status=RestoreRequest.Status.RUNNING).update(
            status=RestoreRequest.Status.SUCCEEDED if ok else RestoreRequest.Status.FAILED
        )
