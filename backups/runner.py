"""Starting, running and finishing backup runs: the lock per server, kind and database, orphans, failures.

The management command and the django-q2 tasks both come here, so a backup behaves the
same in the foreground and on a worker.
"""

import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from django.conf import settings
from django.db import DatabaseError, InterfaceError, transaction
from django.db import connection as db_connection
from django.utils import timezone

from backupportal import conditions, journal
from backupportal.lib.pgerrors import explain
from backups.anchors import anchor_after_backup
from backups.models import BackupCopy, BackupRun, Database, Server, StorageLocation
from backups.pipeline import BackupFailed

# A run whose heartbeat is older than this was left by a dead worker: a live one beats every
# HEARTBEAT_EVERY seconds whatever it waits for (beating).
ORPHAN_AFTER = timedelta(minutes=2)
HEARTBEAT_EVERY = 20
# A scheduled run that finds the lock taken gives its worker back and is queued again after
# LOCKED_RETRY, for up to SCHEDULED_WAIT. Waiting inside the worker let a few busy servers hold
# every worker and delay every other server's schedule.
SCHEDULED_WAIT = timedelta(hours=2)
LOCKED_RETRY = timedelta(minutes=1)
HOST = socket.gethostname()

log = logging.getLogger(__name__)


class RunRefused(Exception):
    """A manual run found the lock taken: the message says which run holds it."""

    def __init__(self, message, run=None):
        super().__init__(message)
        self.run = run


@dataclass
class Outcome:
    ok: bool
    message: str
    run: BackupRun | None = None


def fail_orphans(server=None):
    """Fail runs whose worker died (no heartbeat, or a pid that no longer exists here), and
    queued runs that no worker ever started."""
    return _fail_dead(server) + _fail_never_started(server)


def _fail_dead(server):
    now = timezone.now()
    qs = BackupRun.objects.filter(status=BackupRun.Status.RUNNING)
    if server is not None:
        qs = qs.filter(server=server)
    failed = []
    for run in qs:
        beat = run.heartbeat_at or run.started_at or run.created_at
        # A pid means something only on the host that started the run: workers run on many hosts.
        dead_pid = run.pid and run.details.get("host", HOST) == HOST and not alive(run.pid)
        if dead_pid or now - beat > ORPHAN_AFTER:
            why = (
                f"the process running it (pid {run.pid}) died"
                if dead_pid
                else f"no heartbeat since {timezone.localtime(beat):%Y-%m-%d %H:%M:%S}"
            )
            if finish_failed(run, f"interrupted: {why}; nothing it wrote is kept"):
                failed.append(run)
    return failed


def _fail_never_started(server):
    """A queued run whose task the broker lost (or that no worker takes) would hold the lock forever."""
    limit = timedelta(seconds=settings.QUEUED_RUN_TIMEOUT)
    qs = BackupRun.objects.filter(status=BackupRun.Status.QUEUED, created_at__lt=timezone.now() - limit)
    if server is not None:
        qs = qs.filter(server=server)
    failed = []
    for run in qs:
        waited = minutes(timezone.now() - run.created_at)
        message = f"queued for {waited} and never started: is the worker (manage.py qcluster) running?"
        # Only while still queued: a worker that takes it meanwhile runs it to its end.
        if finish_failed(run, message, only=[BackupRun.Status.QUEUED]):
            failed.append(run)
    return failed


def minutes(delta):
    seconds = int(delta.total_seconds())
    return f"{seconds // 60} minutes" if seconds >= 120 else f"{seconds} s"


def alive(pid):
    """Whether process `pid` lives here (a zombie does not; one of another user that /proc hides does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def claim(server, kind, *, trigger, actor, scheduled_for=None, database=None):
    """Create a queued run if no run of this server and kind is active; else RunRefused.

    A logical run is of one database (default: the DSN's) and locks that database only; a
    physical run locks its server (the cluster) for its kind. Serialised on the server row, so
    two callers can never both get the lock.
    """
    fail_orphans(server)
    if kind == BackupRun.Kind.LOGICAL and database is None:
        database = Database.of_dsn(server)
    elif kind != BackupRun.Kind.LOGICAL:
        database = None  # a physical backup is of the whole cluster
    with transaction.atomic():
        Server.objects.select_for_update().get(pk=server.pk)
        if scheduled_for is not None:
            done = BackupRun.objects.filter(
                server=server, kind=kind, database=database, details__scheduled_for=scheduled_for
            ).first()
            if done is not None:
                raise RunRefused(
                    f"the {kind} backup of {database or server} scheduled for {scheduled_for} "
                    f"was already taken by run #{done.pk}",
                    done,
                )
        holder = BackupRun.objects.active().filter(server=server, kind=kind, database=database).first()
        if holder is not None:
            raise RunRefused(
                f"a {kind} backup of {database or server} is already {holder.status} (run #{holder.pk}): "
                "wait for it to finish",
                holder,
            )
        details = {"scheduled_for": scheduled_for} if scheduled_for else {}
        return BackupRun.objects.create(
            server=server, database=database, kind=kind, trigger=trigger, requested_by=actor, details=details
        )


def claim_scheduled(server, kind, *, actor, scheduled_for=None, waiting_since=None, database=None):
    """A scheduled run's claim: the run, or None when it was queued again for later (the lock
    is taken). RunRefused when its occurrence already ran, or it has waited SCHEDULED_WAIT."""
    from django_q.models import Schedule
    from django_q.tasks import schedule

    try:
        return claim(
            server,
            kind,
            trigger=BackupRun.Trigger.SCHEDULED,
            actor=actor,
            scheduled_for=scheduled_for,
            database=database,
        )
    except RunRefused as e:
        now = timezone.now()
        since = datetime.fromisoformat(waiting_since) if waiting_since else now
        if scheduled_for is not None and e.run.details.get("scheduled_for") == scheduled_for:
            raise  # this occurrence ran already (handed to two workers): nothing to retry
        if now - since >= SCHEDULED_WAIT:
            raise RunRefused(f"{e} (waited {minutes(now - since)} for it; this occurrence is skipped)", e.run) from None
        schedule(
            "backups.tasks.scheduled_job",
            server.name,
            str(kind),  # a plain string: django-q2 stores the arguments as their repr
            scheduled_for,
            since.isoformat(),
            name=None,
            schedule_type=Schedule.ONCE,
            next_run=now + LOCKED_RETRY,
        )
        return None


def execute(run):
    """Run a claimed backup to its end. Returns the run, succeeded or failed; never raises."""
    from backups import base, incremental, logical, manifests

    started = BackupRun.objects.filter(pk=run.pk, status=BackupRun.Status.QUEUED).update(
        status=BackupRun.Status.RUNNING,
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        pid=os.getpid(),
        details={**run.details, "host": HOST},  # a queued run's details are only what claim() wrote
    )
    run.refresh_from_db()
    if not started:
        return run  # another worker took it, or it was failed meanwhile
    handlers = {
        BackupRun.Kind.LOGICAL: logical.take,
        BackupRun.Kind.BASE: base.take,
        BackupRun.Kind.INCREMENTAL: incremental.take,
    }
    try:
        journal.record("backup_started", actor=run.requested_by or "job:backup", obj=run, kind=run.kind)
        with beating(run):
            unchecked = same_cluster(run)
            handlers[run.kind](run)
            if unchecked:
                run.notes = "; ".join(filter(None, [run.notes, unchecked]))
            # Before the success is recorded anywhere: the journal is what auditors trust, and a
            # success it cannot record must not be shown good (finish_succeeded has the race's end).
            journal.check_head_writable()
            manifests.write_for_run(run)  # last: it describes the run as it succeeded
    except (BackupFailed, journal.JournalUnwritable) as e:
        finish_failed(run, str(e))
    except Exception as e:  # a bug must still fail the run visibly, not leave it running
        finish_failed(run, f"internal error: {type(e).__name__}: {e}")
        raise
    except KeyboardInterrupt:  # Ctrl-C on a foreground backup: failed now, not "running" until the sweep
        finish_failed(run, "interrupted (Ctrl-C): nothing it wrote is kept; run the backup again")
        raise
    else:
        finish_succeeded(run)
    run.refresh_from_db()
    anchor_after_backup()  # the journal's head, with this run's entries, in every location
    return run


def same_cluster(run):
    """BackupFailed when the server's DSN now reaches another cluster than its good backups are
    of: a re-pointed DSN would fill the retention floor with another cluster's backups while the
    real ones age out. The identifier read is the one the run's manifest records. Returns a
    warning when it cannot be read (a role denied pg_control_system()): never a failure for that."""
    from backups.manifests import known_system_identifier

    server = run.server
    before = known_system_identifier(server)
    try:
        now = server.system_identifier()
    except psycopg.Error as e:
        if isinstance(e, psycopg.OperationalError):  # not reached (down, refused): only that is said
            if before:
                raise BackupFailed(explain(e, server)) from None
            return ""  # the backup's own connection fails next, saying why: a second line misled (a probe)
        if before:  # a cluster that hides what its good backups' showed is not taken on trust
            raise BackupFailed(
                f"server {server}'s cluster does not say its system identifier ({explain(e, server)}), which its good"
                f" backups recorded as {before}: grant the backup role EXECUTE on pg_control_system(), or point the"
                " DSN back at that cluster"
            ) from None
        warning = f"the cluster's system identifier was not compared with its earlier backups': {explain(e, server)}"
        log.warning("server %s: %s", server, warning)
        return warning  # a connection that fails fails the backup itself, saying why
    run.details["system_identifier"] = now
    if before and before != now:
        raise BackupFailed(
            f"server {server}'s DSN ({server.host}:{server.port}) now reaches the cluster with system identifier "
            f"{now}, but its good backups are of cluster {before}: point the DSN back at that cluster; if it really "
            "was rebuilt or moved (a new initdb, pg_upgrade), register it as a new server (manage.py addserver) "
            "and disable this one through a change request, so each keeps its own backups"
        )
    return ""


@contextmanager
def beating(run):
    """The run's heartbeat every HEARTBEAT_EVERY seconds while this process works on it, whatever
    it waits for (its WAL to be archived, the rows to be counted, pg_dumpall): only a run whose
    process is gone goes without one for ORPHAN_AFTER, and is failed as orphaned."""
    stop = threading.Event()

    def beat():
        try:
            while not stop.wait(HEARTBEAT_EVERY):
                try:
                    # Any run with a status and a heartbeat: a backup run, a restore run.
                    running = type(run).objects.filter(pk=run.pk, status=type(run).Status.RUNNING)
                    running.update(heartbeat_at=timezone.now())
                except (DatabaseError, InterfaceError) as e:  # a busy or restarted catalog: the next beat
                    log.warning("run %s: heartbeat not recorded: %s", run.pk, e)
                    db_connection.close()  # tries again on a new connection
        finally:
            db_connection.close()  # this thread's own

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat of run {run.pk}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def finish_succeeded(run):
    """Succeeded, only while still running: a run the orphan sweep failed meanwhile (its files
    removed, its lock given up) stays failed, never a success without its artifact."""
    # The manifest, written just before, already says when it finished.
    run.finished_at = run.finished_at or timezone.now()
    fields = ["finished_at", "size", "sha256", "key", "details", "bytes_done", "timeline"]
    fields += ["start_lsn", "end_lsn", "start_wal", "end_wal", "notes"]
    updated = BackupRun.objects.filter(pk=run.pk, status=BackupRun.Status.RUNNING).update(
        status=BackupRun.Status.SUCCEEDED, **{f: getattr(run, f) for f in fields}
    )
    if not updated:
        run.refresh_from_db(fields=["status", "error"])
        log.error("run %s ended its work after it was %s (%s): its files removed", run.pk, run.status, run.error)
        remove_files(run)  # the sweep removed what it knew of: the manifest came after
        return
    run.status = BackupRun.Status.SUCCEEDED
    try:
        journal.record(
            "backup_succeeded", actor=run.requested_by or "job:backup", obj=run, size=run.size, sha256=run.sha256
        )
    except journal.JournalUnwritable as e:
        # The head turned unwritable since execute() checked it: its entry is in the database,
        # but the head file, which proves the journal whole, does not name it. Failed after all.
        finish_failed(run, str(e), only=[BackupRun.Status.SUCCEEDED])


def finish_failed(run, message, only=(BackupRun.Status.QUEUED, BackupRun.Status.RUNNING)):
    """Mark failed (only a run still in one of the `only` states), remove what it left, journal; the monitor alerts."""
    updated = BackupRun.objects.filter(pk=run.pk, status__in=list(only)).update(
        status=BackupRun.Status.FAILED, finished_at=timezone.now(), error=message[:2000]
    )
    if not updated:
        return False
    run.refresh_from_db()
    # Journaled and alerted first: a location that refuses the removal below must not hide the failure.
    try:
        journal.record(
            "backup_failed", actor=run.requested_by or "job:backup", obj=run, outcome="failed", error=message
        )
        conditions.changed("backup_failed", server=run.server)  # the monitor reads the failed run
    except journal.JournalUnwritable as e:
        # Failed in the catalog all the same (the monitor alerts from it within a minute); the
        # error says why the journal's head file lacks it.
        log.error("run %s failed, and the journal could not record it: %s", run.pk, e)
        if str(e) not in message:
            message = f"{message}; {e}"
            BackupRun.objects.filter(pk=run.pk).update(error=message[:2000])
    if left := remove_files(run):
        BackupRun.objects.filter(pk=run.pk).update(error=f"{message}; {left}"[:2000])
    return True


def remove_files(run):
    """Nothing of a failed run may look like an artifact: its partials and committed files in the
    primary location (those `run.details` lists) removed, its copies marked deleted. A file the
    location will not let go (read-only since) stays, its copy marked bad, and the sentence
    returned says where; '' when all went."""
    from backups.storage import StorageError, partials_of, store_for

    left = []
    for location in StorageLocation.objects.filter(kind=StorageLocation.Kind.PRIMARY, enabled=True):
        store = store_for(location)
        for key in run.details.get("keys", []):
            try:
                store.delete(key)
                for partial in partials_of(store.path(key)):
                    partial.unlink(missing_ok=True)
            except (OSError, StorageError) as e:
                left.append(f"{store.uri(key)} ({e})")
    copies = run.copies.exclude(status=BackupCopy.Status.DELETED)
    if not left:
        copies.update(status=BackupCopy.Status.DELETED)
        return ""
    said = f"what it wrote could not all be removed, and its copies are marked bad: {'; '.join(left)}"
    copies.update(status=BackupCopy.Status.BAD, last_error=said[:2000])
    return said
