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
import os
import socket
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from backupportal import conditions, journal
from backupportal.lib.osuser import remove_tree
from backups.binaries import pg_ctl
from backups.runner import ORPHAN_AFTER, alive, minutes
from restores import pitr_staging
from restores.models import RestoreRequest, RestoreRun, RestoreTest
from restores.pitr_extract import empty, give_back
from restores.targetdb import RestoreFailed, dropped, dropped_roles

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
    """Why `row` (a running restore or test) is taken for dead; "" while it lives. On its own
    host its process decides: alive (and no newer than the row), it lives whatever its heartbeat
    (a paused machine, a beat thread gone); elsewhere only the heartbeat tells."""
    if row.pid and (row.host or HOST) == HOST:
        if alive(row.pid) and started_by(row.pid, row.started_at):
            return ""
        return f"the process running it (pid {row.pid}) died"
    beat = row.heartbeat_at or row.started_at
    if (now or timezone.now()) - beat > ORPHAN_AFTER:
        return f"no heartbeat since {timezone.localtime(beat):%Y-%m-%d %H:%M:%S}"
    return ""


def started_by(pid, moment):
    """Was process `pid` started by `moment` (not a later one given the same pid)? True when it
    cannot be told (a /proc this user may not read)."""
    try:
        since_boot = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    started = boot + since_boot / os.sysconf("SC_CLK_TCK")
    return started <= moment.timestamp() + 2  # /proc's boot time is to the second


def _dead_restores():
    failed = []
    for restore in RestoreRun.objects.filter(status=RestoreRun.Status.RUNNING).select_related("server", "into_server"):
        if not (why := why_dead(restore)):
            continue
        # Claimed by the update: a process that finishes meanwhile keeps its own outcome, and
        # one still alive can record nothing more (RestoreRun.leaves refuses: it stops).
        if RestoreRun.objects.filter(pk=restore.pk, status=RestoreRun.Status.RUNNING).update(
            status=RestoreRun.Status.FAILED, finished_at=timezone.now(), error=f"interrupted: {why}"[:2000]
        ):
            restore.refresh_from_db(fields=["left"])  # what it recorded up to the claim
            _settle_restore(restore, why)
            failed.append(restore)
    return failed


def _settle_restore(restore, why):
    """The failed run's line says what became of what it made; journaled as any failed restore.
    A replace that died after its swap did replace production: it says so, with a warning."""
    said = _remove_made(restore)
    error = f"interrupted: {why}; {said}"
    if restore.kind == RestoreRun.Kind.REPLACE and said.startswith(SWAPPED):
        restore.status, restore.error, restore.warnings = RestoreRun.Status.SUCCEEDED_WITH_WARNINGS, "", [error]
    else:
        restore.status, restore.error = RestoreRun.Status.FAILED, error[:2000]
    fields = {f: getattr(restore, f) for f in ("status", "error", "warnings", "left")}
    RestoreRun.objects.filter(pk=restore.pk).update(**fields)
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
    if made.get("database"):
        target = restore.into_server
        # Held where the run was (as the run itself was): a DSN moved since drops nothing elsewhere.
        target.approved_destination = made.get("at") or target.destination
        if restore.kind == RestoreRun.Kind.REPLACE:
            return _settle_replace(restore, target, made)
        left = dropped(target, made["database"])
        roles = made.get("roles") or []
        roles_left = dropped_roles(target, roles)  # after the database: it held their objects
        restore.left = made if left or roles_left else {}
        said = [left or f"the database {made['database']} it was restoring into was dropped"]
        said += [roles_left or f"the roles it created ({', '.join(roles)}) were dropped"] if roles else []
        return "; ".join(said)
    if made.get("datadir"):
        if (restore.host or HOST) != HOST:
            return f"its cluster in {made['datadir']} is stopped and removed on {restore.host} by the next PITR there"
        return remove_datadir(restore)
    return "it had made nothing yet"


SWAPPED = "it stopped after its swap"


def _settle_replace(restore, server, made):
    """Before its swap production was not renamed: the copy goes, and production, if the swap
    had begun to close it, is opened and given back its subscriptions' slots. After the swap
    (one transaction) production holds the backup, the previous database kept: said."""
    from restores.replace import _reattach, _renamed, _reopen

    prod, new, kept = restore.into_database, made["database"], made.get("kept_as", "")
    if kept and _renamed(server, kept, new):
        restore.left = {}
        return f"{SWAPPED}: production {prod} holds the backup, the previous database is kept as {kept}"
    reopened = RestoreFailed(f"production {prod} is unchanged")
    if made.get("closing"):
        _reopen(server, prod, reopened)
        _reattach(server, prod, made.get("detached") or [], reopened)
        if not getattr(reopened, "production_changed", False):
            reopened.args = (f"production {prod} was closed for the swap and is open again, as it was",)
    left = dropped(server, new)
    restore.left = made if left else {}
    return f"{reopened}; " + (left or f"the copy {new} was dropped")


def remove_leftovers():
    """On this host: stop and remove the clusters of restores that died (their `left`), and of
    restore tests that died after their restore (restores.orphans._fail_test gives them one)."""
    for restore in RestoreRun.objects.filter(host=HOST).exclude(status=RestoreRun.Status.RUNNING).exclude(left={}):
        if restore.left.get("datadir") or restore.left.get("chain"):
            said = remove_datadir(restore)
            log.info("restore #%s: %s", restore.pk, said)


def remove_datadir(restore):
    """Stop the cluster a dead restore started (if it did) and remove its directory (empty it, a
    directory the DBA gave); the clause saying so, or what is left (tried again next time). Only
    the directory the run made: one removed and made again since (its inode) is another's. An
    incremental chain's scratch that could not be removed stays in `left` alone: the data
    directory is never passed over for it, nor looked at again once done."""
    pitr_staging.remove(Path(restore.left["staging"]) if restore.left.get("staging") else None)
    chain = _remove_chain(restore.left.get("chain"))
    if not restore.left.get("datadir"):
        return _removed(restore, "its chain's scratch was removed", chain)
    datadir = Path(restore.left["datadir"])
    if not datadir.exists():
        return _removed(restore, f"its cluster in {datadir} is gone", chain)
    if _not_the_runs(restore, datadir):
        return _removed(restore, f"{datadir} holds another restore's cluster now: left as it is", chain)
    try:
        if (datadir / "postmaster.pid").exists():
            stopped = pg_ctl(datadir, "stop", "-m", "immediate", "-w")  # its PG_VERSION says which pg_ctl
            if stopped.returncode != 0 and (datadir / "postmaster.pid").exists():
                raise OSError(f"pg_ctl stop: {stopped.stderr.strip() or stopped.returncode}")
        if restore.left.get("created"):
            remove_tree(datadir)
        else:
            empty(datadir)
            give_back(datadir, {k: restore.left[k] for k in ("mode", "uid", "gid") if k in restore.left})
    except Exception as e:  # noqa: BLE001 - said on the run; the next sweep tries again
        return f"its cluster in {datadir} could not be removed ({type(e).__name__}: {e}): the next sweep tries again"
    return _removed(restore, f"its cluster in {datadir} was stopped and removed", chain)


def _remove_chain(chain):
    """None when a dead PITR's chain scratch is gone (or it had none), else (its path, why not)."""
    if not chain:
        return None
    try:
        remove_tree(chain)
    except OSError as e:
        return chain, str(e)
    return None


def _not_the_runs(restore, datadir):
    """The directory was made again since (another inode), or a later restore names it."""
    inode = restore.left.get("inode")
    if inode is not None and datadir.stat().st_ino != inode:
        return True
    later = RestoreRun.objects.filter(into_datadir=restore.left["datadir"], created_at__gt=restore.created_at)
    return later.exists()


def _removed(restore, said, chain=None):
    """`said`, and `left` emptied but for a chain's scratch still there (_remove_chain)."""
    restore.left = {"chain": chain[0]} if chain else {}
    RestoreRun.objects.filter(pk=restore.pk).update(left=restore.left)
    if chain:
        said += f"; its chain's scratch {chain[0]} could not be removed ({chain[1]}): the next sweep tries again"
    return said


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
        waited = minutes(timezone.now() - test.started_at)
        why = f"queued for {waited} and never started: is the restore worker (manage.py qcluster) running?"
        if _fail_test(test, why):
            failed.append(test)
    return failed


def _fail_test(test, why):
    """Failed, only while still running; what its restores left removed (a test drops its copy
    when it ends: one there now was left by the dead one)."""
    now = timezone.now()
    if not RestoreTest.objects.filter(pk=test.pk, status=RestoreTest.Status.RUNNING).update(
        status=RestoreTest.Status.FAILED, finished_at=now, phase="", error=why[:2000]
    ):
        return False
    test.error = "; ".join([why, *_remove_copies(test)])[:2000]
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


def _remove_copies(test):
    """Drop a dead logical test's scratch database (on its server's sandbox, held where approved);
    a dead base test's throwaway cluster goes the way of a dead restore's (remove_leftovers, on
    its host). What could not be removed, one line each."""
    left = []
    target = test.server.sandbox
    for restore in test.restores.exclude(status=RestoreRun.Status.RUNNING):
        if restore.kind == RestoreRun.Kind.LOGICAL and restore.into_database and restore.into_server_id == target.pk:
            left += [said] if (said := dropped(target, restore.into_database)) else []
            left += [said] if (said := dropped_roles(target, restore.created_roles)) else []
        elif restore.kind == RestoreRun.Kind.PITR and restore.into_datadir and restore.succeeded:
            RestoreRun.objects.filter(pk=restore.pk).update(left={"datadir": restore.into_datadir, "created": True})
    remove_leftovers()
    return left


def _settle_requests():
    """A request left running by a dead restore takes its run's outcome (its run was failed
    above). One approved that no worker started within QUEUED_RUN_TIMEOUT fails: run weeks
    later, it would restore a backup nobody chose for that day."""
    Status = RestoreRequest.Status
    limit = timezone.now() - timedelta(seconds=settings.QUEUED_RUN_TIMEOUT)
    for request in RestoreRequest.objects.filter(status__in=[Status.APPROVED, Status.RUNNING]):
        newest = request.runs.order_by("-created_at").first()
        if newest is not None and newest.done:
            outcome = Status.SUCCEEDED if newest.succeeded else Status.FAILED
            RestoreRequest.objects.filter(pk=request.pk, status=Status.RUNNING).update(status=outcome)
        elif request.status == Status.APPROVED and request.decided_at and request.decided_at < limit:
            request.expire(ACTOR)
