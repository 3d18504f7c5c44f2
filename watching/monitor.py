"""The monitor: every alert condition of the strategy, evaluated in one pass, then the mail.

`manage.py monitor --once` and the django-q2 schedule "monitor" (every minute) both call
run_once(). Each condition is a check in checks(), called once per enabled server
(`per_server`) or once per pass. The monitor is the only writer of alerts: backups and
restores record what happened on their own rows (a failed run, a failed restore test, a bad
copy, a WAL error marker), and the checks here derive the alerts from those rows, one
message per condition. When a writer records such a row it says so
(backupportal.conditions.changed), and the check of that condition runs at once.
"""

import fcntl
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from croniter import croniter
from django.conf import settings
from django.db import connection
from django.db.models import Exists, OuterRef, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from backupportal import conditions, journal
from backupportal.lib.pgerrors import explain
from backups import selfbackup, walhealth
from backups.models import BackupRun, BackupSchedule, Database, PortalBackup, Server, StorageLocation
from backups.runner import fail_orphans
from restores import orphans
from restores.models import RestoreTest
from watching import alerts, channels, coverage, maintenance, rpo
from watching.alerts import raise_alert, resolve_alert
from watching.channel_models import ChannelDelivery
from watching.copy_checks import check_copies, check_corruption, check_storage, check_uploads
from watching.models import Alert, Reachability

log = logging.getLogger(__name__)

# The strategy's daily backup starts at 02:00 and must be there by 04:00: the scheduled
# time plus this grace, in the schedule's own time zone (TIME_ZONE, Indian/Maldives).
DAILY_BACKUP_GRACE = timedelta(hours=2)
# Copies to the other tiers are queued after a backup: an hour later the offsite one is owed.
OFFSITE_GRACE = timedelta(hours=1)
# Serialises monitor passes (the schedule and a manual `monitor --once`): one mail per alert.
_PG_LOCK_ID = 0x6D6F6E69746F72  # "monitor"


@dataclass(frozen=True)
class Check:
    name: str
    function: Callable
    per_server: bool = False


def checks():
    """Every check of a pass, in order."""
    return [
        Check("daily backup", check_daily_backup, per_server=True),
        Check("databases", check_databases, per_server=True),
        Check("coverage", check_coverage, per_server=True),
        Check("backup failures", check_backup_failures, per_server=True),
        # Restores and restore tests whose worker died: failed, what they made removed.
        Check("interrupted restores", orphans.fail_orphans),
        Check("restore tests", check_restore_tests, per_server=True),
        Check("critical tables", check_shrinkage, per_server=True),
        Check("reachable", check_reachable, per_server=True),
        Check("RPO", check_rpo, per_server=True),
        # WAL gap, archiving failing, pg_receivewal or its slot down, its slot left after pull.
        Check("WAL", check_wal, per_server=True),
        Check("storage", check_storage),
        Check("copies", check_copies),
        Check("maintenance", maintenance.check_overdue),
        Check("portal backup", check_portal_backup),
        Check("portal backup copies", check_portal_backup_copies),
    ]


def checks_on_record():
    """condition -> the narrowest check of it, called with the server (the location for uploads)
    whose row was just written: what on_condition_recorded runs between two passes."""
    C = Alert.Condition
    return {
        C.BACKUP_FAILED: alert_backup_failures,
        C.RESTORE_TEST_FAILED: check_restore_tests,
        C.WAL_GAP: check_wal,
        C.ARCHIVE_FAILING: check_wal,
        C.RECEIVER_DOWN: check_wal,
        C.CORRUPTION: check_corruption,
        C.UPLOAD_FAILED: check_uploads,
    }


def run_once():
    """Evaluate every check now, then send the mail owed. Returns a summary for the command."""
    started = timezone.now()
    with monitor_lock() as locked:
        if not locked:
            return {"skipped": "another monitor pass is running", "errors": []}
        errors, ran = evaluate()
        mail = alerts.send_pending_mail()
        sent = send_channels()
    return {
        "checks": ran,
        "errors": errors,
        "opened": Alert.objects.filter(opened_at__gte=started).count(),
        "resolved": Alert.objects.filter(resolved_at__gte=started).count(),
        "active": Alert.objects.exclude(state=Alert.State.RESOLVED).count(),
        "mail": mail,
        "channels": sent,
    }


def send_channels():
    """The alert channels' messages, after the mail: nothing that goes wrong there reaches the mail."""
    try:
        return channels.send_due()
    except Exception as e:  # noqa: BLE001  a bug in the channels must not fail the pass
        log.exception("sending to the alert channels failed")
        return {"sent": 0, "failed": 0, "errors": [f"alert channels: {type(e).__name__}: {e}"]}


def evaluate():
    """Call every check; one failing check never stops the others. Returns (errors, names run)."""
    servers = list(Server.objects.filter(enabled=True))
    resolve_disabled_servers()
    errors, ran = [], []
    for check in checks():
        ran.append(check.name)
        for args in [(s,) for s in servers] if check.per_server else [()]:
            try:
                check.function(*args)
            except Exception as e:  # noqa: BLE001  a bug in one check must not silence the rest
                where = f" for {args[0]}" if args else ""
                log.exception("monitor check %s%s failed", check.name, where)
                errors.append(f"check {check.name}{where} failed: {type(e).__name__}: {e}")
    return errors, ran


def resolve_disabled_servers():
    """A disabled server is no longer protected: nothing about it is expected any more."""
    for alert in Alert.objects.filter(server__enabled=False).exclude(state=Alert.State.RESOLVED):
        resolve_alert(alert.condition, subject=alert.subject, server=alert.server)


def listen():
    """Run the check of a condition as soon as a writer records it (watching/apps.py)."""
    conditions.recorded.connect(on_condition_recorded, dispatch_uid="watching.monitor.on_condition_recorded")


def on_condition_recorded(sender, condition, server=None, location=None, **kwargs):
    """A row that a condition is read from was written: its check runs now, not a minute later.

    Never fails its sender (a backup, a restore test): a check that breaks here is logged, and
    the minute's pass runs it again. A disabled server is no longer watched.
    """
    subject = location if condition == Alert.Condition.UPLOAD_FAILED else server
    check = checks_on_record().get(condition)
    if check is None or subject is None or (server is not None and not server.enabled):
        return
    try:
        check(subject)
    except Exception:  # noqa: BLE001  the writer's own work must go on; the next pass retries
        log.exception("monitor check of %s for %s failed", condition, subject)


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
    missing = [] if due < server.created_at else _missing_since(server, due)
    if not missing:
        resolve_alert(Alert.Condition.BACKUP_MISSING, server=server)
        return
    raise_alert(
        Alert.Condition.BACKUP_MISSING,
        server=server,
        message=alerts.listed(
            (
                f"No good logical backup of {what} since its scheduled time {_local(due)} "
                f"(checked at {_local(now)}, {settings.TIME_ZONE}): "
                + (f"the newest good one finished {_local(newest.finished_at)}" if newest else "there is none yet")
                + "."
                for what, newest in missing
            ),
            f"databases of {server} have none since then ({len(missing)} in all).",
        ),
    )


def _missing_since(server, due):
    """[(what, its newest good run or None)] of each database the server backs up that has no
    good logical backup since `due`; one found after `due` is alerted as new (check_databases)."""
    if not server.databases.exists():  # never looked at: the server as a whole, as before databases
        newest = server.latest_good_backup(BackupRun.Kind.LOGICAL)
        return [] if newest is not None and newest.finished_at >= due else [(str(server), newest)]
    protected = server.databases.filter(protected=True, state=Database.State.PRESENT)
    # The DSN's was backed up since registration; another one is owed a backup once it was found.
    owing = {db.pk: db for db in protected if db.name == server.dbname or db.first_seen_at <= due}
    newest = {
        run.database_id: run for run in BackupRun.objects.good().filter(database__in=list(owing)).newest_per_target()
    }
    missing = []
    for pk, database in owing.items():
        run = newest.get(pk)
        if run is None or run.finished_at < due:
            missing.append((str(server) if database.name == server.dbname else str(database), run))
    return missing


def check_databases(server):
    """Every database the server should back up has a good backup: one found by the daily pass
    (or at registration) is alerted until its first succeeds, one that cannot be backed up (no
    CONNECT, datallowconn off, a wrong name) until it can. Dropped ones keep their backups.

    One alert per server names them all (the first LISTED): whoever may create databases could
    otherwise open, mail and post one alert per database. A database joining or leaving the set
    updates the open alert's message; it resolves once none is left."""
    condition = Alert.Condition.DATABASE_UNCOVERED
    _resolve_per_database_alerts(server)
    has_good = Exists(BackupRun.objects.good().filter(database=OuterRef("pk")))
    databases = list(server.databases.filter(protected=True).annotate(has_good=has_good).order_by("name"))
    # A database without a backup while its siblings have theirs: the server's own "daily
    # backup missing" and "backup failed" alerts say the rest, once.
    siblings_backed_up = any(database.has_good for database in databases)
    uncovered = [message for database in databases if (message := _uncovered(database, server, siblings_backed_up))]
    if not uncovered:
        resolve_alert(condition, server=server)
        return
    more = f"databases of {server} are not backed up ({len(uncovered)} in all, listed on the Coverage page)"
    raise_alert(condition, server=server, message=alerts.listed(uncovered, more))


def _resolve_per_database_alerts(server):
    """Until this version the alert was per database ("database:<pk>"): those still open end
    here, once, quietly (their mails marked as sent, their unsent channel messages dropped, one
    journal entry for all), as the server's one alert takes their place: resolving each as usual would
    send the storm this replaced, once more."""
    legacy = Alert.objects.filter(
        condition=Alert.Condition.DATABASE_UNCOVERED, server=server, subject__startswith="database:"
    ).exclude(state=Alert.State.RESOLVED)
    ids = list(legacy.values_list("pk", flat=True))
    if not ids:
        return
    now = timezone.now()
    Alert.objects.filter(pk__in=ids).update(
        state=Alert.State.RESOLVED,
        resolved_at=now,
        opened_mail_sent_at=Coalesce("opened_mail_sent_at", Value(now)),
        resolved_mail_sent_at=now,
    )
    # An opening not posted yet (a channel down) would be posted with no end ever following.
    ChannelDelivery.objects.filter(alert_id__in=ids, sent_at=None).delete()
    journal.record(
        "alert_resolved",
        actor="job:monitor",
        server=server,
        condition=Alert.Condition.DATABASE_UNCOVERED,
        alerts=ids,
        why="replaced by the server's one alert naming its databases",
    )


def check_coverage(server):
    """What the coverage page shows short of the policy and no other alert says: no offsite copy
    an hour after a backup (copies are queued after it), no restore test of a database in 35
    days (counted from when the database was found)."""
    now = timezone.now()
    offsite = StorageLocation.objects.filter(kind=StorageLocation.Kind.S3, enabled=True).exists()
    short = [
        f"{row.database.name}: {gap}"
        for row in coverage.rows([server], now)
        for gap in row.gaps
        if _alerted_as_coverage(row, gap, now, offsite)
    ]
    if short:
        message = f"{server} is short of its policy: " + alerts.listed(short, f"gaps ({len(short)} in all)")
        raise_alert(Alert.Condition.COVERAGE_GAP, server=server, message=message)
    else:
        resolve_alert(Alert.Condition.COVERAGE_GAP, server=server)


def _alerted_as_coverage(row, gap, now, offsite):
    if gap == "no offsite copy":
        return offsite and row.newest.finished_at < now - OFFSITE_GRACE
    if gap.startswith("no restore test in"):
        return row.database.first_seen_at < now - coverage.RESTORE_TEST_MAX_AGE
    return False  # the others have alerts of their own (backups, RPO, restore tests, databases)


def _uncovered(database, server, siblings_backed_up):
    if database.state == Database.State.UNREACHABLE:
        return f"database {database.name} on {server} cannot be backed up: {database.problem}"
    if database.state == Database.State.PRESENT and not database.has_good and siblings_backed_up:
        return f"database {database.name} on {server} has no backup yet (found {_local(database.first_seen_at)})"
    return ""


def check_backup_failures(server):
    """A failed or timed-out backup holds until the next backup of that server and kind succeeds."""
    fail_orphans(server)  # runs whose worker died are failed by the runner, then alerted here
    alert_backup_failures(server)


def alert_backup_failures(server):
    """backup_failed from the newest finished run of each kind, and of each database for logical
    ones (the runner records the failure on it): another database's success hides nothing."""
    latest = BackupRun.objects.filter(server=server).finished().newest_per_target().select_related("database")
    failed = [run for run in latest if run.status == BackupRun.Status.FAILED and _still_backed_up(run)]
    if not failed:
        resolve_alert(Alert.Condition.BACKUP_FAILED, server=server)
        return
    message = alerts.listed(
        (f"{r.get_kind_display()} backup #{r.pk} of {_of(r, server)} failed: {r.error}" for r in failed),
        f"failed backups of {server} ({len(failed)} in all)",
    )
    raise_alert(Alert.Condition.BACKUP_FAILED, server=server, message=message)


def _still_backed_up(run):
    """A failure of a database no longer chosen, or dropped, is not owed a success any more."""
    return run.database is None or run.database.is_backed_up


def _of(run, server):
    """What a run is of, in a message: the server, or server/database when it has several."""
    if run.database is None or run.database.name == server.dbname:
        return str(server)
    return str(run.database)


def check_shrinkage(server):
    """The newest good logical backup of a database found a critical table empty or shrunk past
    the threshold (backups.logical.critical_shrunk): production lost the rows, the backup holds
    what is left. Resolved by the database's next backup that finds none (its previous is then
    the shrunk one), or by the tables being taken off the critical ones."""
    latest = BackupRun.objects.filter(server=server, kind=BackupRun.Kind.LOGICAL).good().newest_per_target()
    shrunk = [r for r in latest.select_related("database") if r.details.get("shrank") and _still_backed_up(r)]
    if not shrunk:
        resolve_alert(Alert.Condition.DATA_SHRANK, server=server)
        return
    message = alerts.listed(
        (f"backup #{r.pk} of {_of(r, server)}: {'; '.join(r.details['shrank'])}" for r in shrunk),
        "databases",
    )
    raise_alert(Alert.Condition.DATA_SHRANK, server=server, message=message)


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


def check_reachable(server):
    """The server answers a query. Not answering for UNREACHABLE_AFTER_MINUTES is an alert: its
    backups, RPO and restore tests cannot be told meanwhile, and its next backup is hours away."""
    state, _ = Reachability.objects.get_or_create(server=server)
    now, after = timezone.now(), timedelta(minutes=settings.UNREACHABLE_AFTER_MINUTES)
    # Passes minutes apart (a long --interval, slow passes while many servers time out) are
    # watching; only a gap of hours (disabled, the monitor stopped) is nobody looking.
    gap = state.checked_at is None or now - state.checked_at > max(timedelta(hours=1), 4 * after)
    state.checked_at = now
    try:
        with server.connect(connect_timeout=10, options="-c statement_timeout=10000") as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        if state.unreachable_since is None or gap:
            state.unreachable_since = now
        state.save(update_fields=["unreachable_since", "checked_at"])
        if now - state.unreachable_since >= after:
            raise_alert(
                Alert.Condition.SERVER_UNREACHABLE,
                server=server,
                message=f"{server} has not answered since {_local(state.unreachable_since)}: {explain(e, server)}",
            )
        return
    state.unreachable_since = None
    state.save(update_fields=["unreachable_since", "checked_at"])
    resolve_alert(Alert.Condition.SERVER_UNREACHABLE, server=server)


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


def check_wal(server):
    """WAL gap, archiving failing, receiver down, slot left over: what backups.walhealth.health finds.
    Returns the findings."""
    findings, unknown = walhealth.health(server)
    C = Alert.Condition
    for condition in (C.WAL_GAP, C.ARCHIVE_FAILING, C.RECEIVER_DOWN, C.SLOT_LEFT_OVER):
        if condition in findings:
            raise_alert(condition, server=server, message=findings[condition])
        elif condition not in unknown:
            # A server that cannot be asked has not recovered: resolving its alert would
            # mail "resolved", then "opened" again once it answers (a storm on a flaky link).
            resolve_alert(condition, server=server)
    return findings


def _local(when):
    return f"{timezone.localtime(when):%Y-%m-%d %H:%M}"


# The one alert about the portal itself: its own database (catalog and journal) is not backed up.
PORTAL_SUBJECT = "portal"


def check_portal_backup(now=None):
    """The newest good selfbackup older than SELFBACKUP_MAX_AGE_HOURS, or only failed ones.

    A portal that has never run selfbackup is not alerted (its first day would alarm; the
    dashboard says "never"): the daily schedule makes the first within a day of the install.
    """
    now = now or timezone.now()
    newest = PortalBackup.objects.newest_good()
    limit = timedelta(hours=settings.SELFBACKUP_MAX_AGE_HOURS)
    if newest is not None and newest.age(now) <= limit:
        resolve_alert(Alert.Condition.PORTAL_BACKUP_STALE, subject=PORTAL_SUBJECT)
        return
    failed = PortalBackup.objects.filter(status=PortalBackup.Status.FAILED).order_by("-finished_at").first()
    if newest is None and failed is None:
        return
    said = f"the newest good one is from {_local(newest.finished_at)}" if newest else "none has succeeded"
    why = (
        f"; the last attempt failed: {failed.error}"
        if failed and (not newest or failed.finished_at > newest.finished_at)
        else ""
    )
    raise_alert(
        Alert.Condition.PORTAL_BACKUP_STALE,
        subject=PORTAL_SUBJECT,
        message=(
            f"The portal's own database (catalog and journal) has no backup from the last "
            f"{settings.SELFBACKUP_MAX_AGE_HOURS} hours: {said}{why}. Run manage.py selfbackup and check the "
            '"selfbackup" schedule and the worker.'
        ),
    )


def check_portal_backup_copies():
    """A copy of a kept selfbackup that the weekly verify read back missing or corrupt: the
    "corruption" alert, for the portal itself (resolved once no kept copy is bad)."""
    bad = [(row, copy) for row, copy in selfbackup.kept_copies() if copy["status"] == "bad"]
    if not bad:
        resolve_alert(Alert.Condition.CORRUPTION, subject=PORTAL_SUBJECT)
        return
    row, copy = max(bad, key=lambda found: found[0].pk)
    raise_alert(
        Alert.Condition.CORRUPTION,
        subject=PORTAL_SUBJECT,
        message=(
            f"{len(bad)} cop{'y' if len(bad) == 1 else 'ies'} of the portal's own backups read back bad; the newest: "
            f"{row} in {copy['location']}: {copy['error']}. Check that location and run manage.py verify: the "
            "alert resolves when no kept selfbackup has a bad copy (a bad one is removed once SELFBACKUP_KEEP "
            "newer ones can be read)."
        ),
    )
