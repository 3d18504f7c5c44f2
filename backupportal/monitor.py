"""The monitor: every alert condition of the strategy, evaluated in one pass, then the mail.

`manage.py monitor --once` and the django-q2 schedule "monitor" (every minute) both call
run_once(). Each condition is a check in CHECKS: a dotted path, called once per enabled
server (`per_server`) or once per pass. A check opens and resolves its own alerts with
backupportal.alerts.raise_alert / resolve_alert; run_once() then sends the mail they owe.

Checks that other parts of the portal provide are listed by their dotted paths and run
where that code exists; a check whose module is not installed is skipped, never an error.
"""

import fcntl
import importlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from croniter import croniter
from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from backupportal import alerts, rpo
from backupportal.alerts import raise_alert, resolve_alert
from backupportal.models import Alert
from backups.models import BackupCopy, BackupRun, BackupSchedule, Server, StorageLocation
from restores.models import RestoreTest

log = logging.getLogger(__name__)

# The strategy's daily backup starts at 02:00 and must be there by 04:00: the scheduled
# time plus this grace, in the schedule's own time zone (TIME_ZONE, Indian/Maldives).
DAILY_BACKUP_GRACE = timedelta(hours=2)
# Serialises monitor passes (the schedule and a manual `monitor --once`): one mail per alert.
_PG_LOCK_ID = 0x6D6F6E69746F72  # "monitor"


@dataclass(frozen=True)
class Check:
    name: str
    # Candidates, in order: the first that exists runs (a later one is this module's fallback).
    paths: tuple[str, ...]
    per_server: bool = False


CHECKS = [
    Check("daily backup", ("backupportal.monitor.check_daily_backup",), per_server=True),
    Check("backup failures", ("backupportal.monitor.check_backup_failures",), per_server=True),
    Check("restore tests", ("backupportal.monitor.check_restore_tests",), per_server=True),
    Check("RPO", ("backupportal.monitor.check_rpo",), per_server=True),
    # WAL gap, archiving failing, pg_receivewal or its slot down: the WAL archiving code.
    Check("WAL", ("backups.wal.check_wal_health",), per_server=True),
    Check("storage", ("backupportal.monitor.check_storage",)),
    Check("copies", ("backupportal.monitor.check_copies",)),
    Check("maintenance", ("backupportal.maintenance.check_overdue",)),
]


def resolve(dotted):
    """The function at `dotted`, or None when its module or attribute does not exist here."""
    module_path, _, name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        if e.name and (module_path == e.name or module_path.startswith(e.name + ".")):
            return None
        raise  # the module exists but is broken: that must be seen
    return getattr(module, name, None)


def active_checks():
    """[(check, function)] for the checks whose code exists on this installation."""
    found = []
    for check in CHECKS:
        function = next((f for f in map(resolve, check.paths) if f is not None), None)
        if function is not None:
            found.append((check, function))
    return found


def run_once():
    """Evaluate every check now, then send the mail owed. Returns a summary for the command."""
    started = timezone.now()
    with monitor_lock() as locked:
        if not locked:
            return {"skipped": "another monitor pass is running", "errors": []}
        errors, ran = evaluate()
        mail = alerts.send_pending_mail()
    return {
        "checks": ran,
        "errors": errors,
        "opened": Alert.objects.filter(opened_at__gte=started).count(),
        "resolved": Alert.objects.filter(resolved_at__gte=started).count(),
        "active": Alert.objects.exclude(state=Alert.State.RESOLVED).count(),
        "mail": mail,
    }


def evaluate():
    """Call every check; one failing check never stops the others. Returns (errors, names run)."""
    servers = list(Server.objects.filter(enabled=True))
    resolve_disabled_servers()
    errors, ran = [], []
    for check, function in active_checks():
        ran.append(check.name)
        for args in [(s,) for s in servers] if check.per_server else [()]:
            try:
                function(*args)
            except Exception as e:  # noqa: BLE001  a bug in one check must not silence the rest
                where = f" for {args[0]}" if args else ""
                log.exception("monitor check %s%s failed", check.name, where)
                errors.append(f"check {check.name}{where} failed: {type(e).__name__}: {e}")
    return errors, ran


def resolve_disabled_servers():
    """A disabled server is no longer protected: nothing about it is expected any more."""
    for alert in Alert.objects.filter(server__enabled=False).exclude(state=Alert.State.RESOLVED):
        resolve_alert(alert.condition, subject=alert.subject, server=alert.server)


@contextmanager
def monitor_lock():
    """True inside when this process holds the monitor lock; False when another pass has it.

    On PostgreSQL an advisory lock (workers on many hosts); on SQLite, which lives on one
    host, a lock file next to it.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", [_PG_LOCK_ID])
            locked = cur.fetchone()[0]
        try:
            yield locked
        finally:
            if locked:
                with connection.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", [_PG_LOCK_ID])
        return
    path = os.path.join(settings.VAR_DIR, "monitor.lock")
    os.makedirs(settings.VAR_DIR, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- The checks of this module ------------------------------------------------------------------


def last_due_occurrence(cron, now, grace):
    """The newest scheduled time whose deadline (time + grace) has come, in TIME_ZONE."""
    base = timezone.localtime(now - grace)
    occurrence = croniter(cron, base).get_prev(datetime)
    # croniter's get_prev is strictly before `base`: a deadline falling exactly now counts.
    following = croniter(cron, occurrence).get_next(datetime)
    return following if following <= base else occurrence


def check_daily_backup(server):
    """No good logical backup since the last scheduled time, two hours after it (04:00 for 02:00)."""
    schedule = BackupSchedule.objects.filter(server=server, job=BackupSchedule.Job.LOGICAL, enabled=True).first()
    if schedule is None:
        resolve_alert(Alert.Condition.BACKUP_MISSING, server=server)
        return
    now = timezone.now()
    due = last_due_occurrence(schedule.cron, now, DAILY_BACKUP_GRACE)
    newest = server.latest_good_backup(BackupRun.Kind.LOGICAL)
    if due < server.created_at or (newest is not None and newest.finished_at >= due):
        resolve_alert(Alert.Condition.BACKUP_MISSING, server=server)
        return
    last = f"the newest good one finished {_local(newest.finished_at)}" if newest else "there is none yet"
    raise_alert(
        Alert.Condition.BACKUP_MISSING,
        server=server,
        message=(
            f"No good logical backup of {server} since its scheduled time {_local(due)} "
            f"(checked at {_local(now)}, {settings.TIME_ZONE}): {last}."
        ),
    )


def check_backup_failures(server):
    """A failed or timed-out backup holds until the next backup of that server and kind succeeds."""
    from backups.runner import fail_orphans

    fail_orphans(server)  # runs whose worker died are failed (and alerted) by the runner
    latest = BackupRun.objects.filter(server=server).finished().newest_per_kind()
    failed = [run for run in latest if run.status == BackupRun.Status.FAILED]
    if not failed:
        resolve_alert(Alert.Condition.BACKUP_FAILED, server=server)
        return
    message = "; ".join(f"{r.get_kind_display()} backup #{r.pk} of {server} failed: {r.error}" for r in failed)
    raise_alert(Alert.Condition.BACKUP_FAILED, server=server, message=message)


def check_restore_tests(server):
    """The newest finished restore test of a kind (logical, base) failed: alert; each passed (or none ran): resolved."""
    failing = RestoreTest.objects.failing(server)
    if not failing:
        resolve_alert(Alert.Condition.RESTORE_TEST_FAILED, server=server)
        return
    raise_alert(
        Alert.Condition.RESTORE_TEST_FAILED,
        server=server,
        message="; ".join(
            f"Restore test #{t.pk} of {server} ({_local(t.started_at)}) failed: {t.error}" for t in failing
        ),
    )


def check_rpo(server):
    """The oldest unarchived WAL is older than the objective. Unknown (unreachable): left as is."""
    if server.archiving == Server.Archiving.NONE:
        resolve_alert(Alert.Condition.RPO_BREACHED, server=server)
        return
    status = rpo.measure(server)
    if status.seconds is None:
        return
    if status.seconds > server.rpo_minutes * 60:
        raise_alert(Alert.Condition.RPO_BREACHED, server=server, message=rpo.describe(status))
    else:
        resolve_alert(Alert.Condition.RPO_BREACHED, server=server)


def check_storage():
    """Storage under 20% free: the storage tiers' own check, which opens and resolves the alerts.

    A location whose free space cannot be read keeps its alert as it is; it is this check's
    error, so that the monitor's output and journal show it.
    """
    from backups import storage

    unreadable = [f"{r['location']}: {r['error']}" for r in storage.check_storage() if r["error"]]
    if unreadable:
        raise OSError("; ".join(unreadable))


def check_copies():
    """Cloud upload failure per location, backup corruption per server, judged on the catalog.

    backups.copies opens both the moment a copy fails or is found bad. The monitor holds them
    while any kept artifact is still affected and resolves them once none is: also when the
    run was retired or the location disabled, which no later copy would ever resolve. It opens
    corruption for a copy marked bad without an alert (a PITR fetch that finds a WAL file
    missing marks its copy bad and nothing more).
    """
    from backups.verify import bad_copies

    for location in StorageLocation.objects.all():
        failing = failing_copies(location)
        if newest := _newest(failing):
            raise_alert(Alert.Condition.UPLOAD_FAILED, location=location, message=_failing_message(newest, failing))
        else:
            resolve_alert(Alert.Condition.UPLOAD_FAILED, location=location)
    for server in Server.objects.filter(enabled=True):  # a disabled server's alerts are resolved
        bad = bad_copies(server)
        if newest := _newest(bad):
            raise_alert(Alert.Condition.CORRUPTION, server=server, message=_bad_message(newest, bad))
        else:
            resolve_alert(Alert.Condition.CORRUPTION, server=server)


def failing_copies(location):
    """Copies of kept artifacts into an enabled location whose last attempt failed.

    A failed copy being retried right now (copying, its error not yet cleared) still counts:
    resolving for the length of a retry would mail "resolved", then "opened" on its next failure.
    """
    if not location.enabled:
        return BackupCopy.objects.none()
    live = Q(run__isnull=False, run__deleted_at=None) | Q(wal_segment__isnull=False, wal_segment__deleted_at=None)
    failed = Q(status=BackupCopy.Status.FAILED) | (Q(status=BackupCopy.Status.COPYING) & ~Q(last_error=""))
    return BackupCopy.objects.filter(live, failed, location=location)


def _newest(copies):
    return copies.select_related("location", "run__server", "wal_segment__server").order_by("-pk").first()


def _failing_message(newest, copies):
    from backups.copies import owner_of

    text = (
        f"Copy of {owner_of(newest)} ({newest.artifact}) to {newest.location.name} failed on attempt "
        f"{newest.attempts}: {newest.last_error}."
    )
    if newest.status == BackupCopy.Status.FAILED and newest.next_attempt_at:
        text += f" Next attempt at {timezone.localtime(newest.next_attempt_at):%Y-%m-%d %H:%M:%S}."
    count = copies.count()
    return text + (f" {count} copies to {newest.location.name} are waiting for a retry." if count > 1 else "")


def _bad_message(newest, copies):
    from backups.copies import owner_of

    count = copies.count()
    more = f" ({count} bad copies in all)" if count > 1 else ""
    return f"Bad copy of {owner_of(newest)} in {newest.location.name}: {newest.last_error}{more}"


def _local(when):
    return f"{timezone.localtime(when):%Y-%m-%d %H:%M}"
