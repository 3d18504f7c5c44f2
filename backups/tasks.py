"""django-q2 tasks: thin wrappers over the runner, named by dotted path in schedules."""

from django.conf import settings
from django.utils.module_loading import import_string
from django_q.models import Schedule
from django_q.tasks import async_task

from backupportal.lib.cron import next_run
from backups import databases
from backups.databases import logical_pass
from backups.models import BackupRun, BackupSchedule, Server
from backups.runner import LOCKED_RETRY, Outcome, RunRefused, claim, claim_scheduled, execute
from backups.schedules import sync_schedule  # noqa: F401  (named here by earlier callers)

RESTORE_TEST_JOB = "restores.tasks.scheduled_restore_test"


def enqueue_backup(server, kind, actor):
    """A DBA's "Back up now": claim the lock now (so a second click is told), run on a worker.
    A logical backup is a run per database the server backs up, each queued on its own."""
    targets, gaps = [None], []
    if kind == BackupRun.Kind.LOGICAL:
        # As last seen (every logical pass looks again): a page never waits on a server that does
        # not answer. Never looked at: the DSN's, whose run says what is wrong.
        never_looked = not server.databases.exists()
        targets, gaps = databases.protected(server) or ([None] if never_looked else []), databases.gaps(server)
        if not targets:
            problems = "; ".join(f"{db.name}: {db.problem}" for db in gaps) or "none is chosen or present"
            return Outcome(False, f"{server} has no database that can be backed up now ({problems}).")
    runs, refused = [], []
    for database in targets:
        try:
            runs.append(claim(server, kind, trigger=BackupRun.Trigger.MANUAL, actor=actor, database=database))
        except RunRefused as e:
            refused.append(e)
    if not runs:
        return Outcome(False, str(refused[0]), refused[0].run)
    for run in runs:
        async_task("backups.tasks.run_backup", run.pk, task_name=f"backup {server.name} {kind} #{run.pk}")
    names = ", ".join(f"#{run.pk}" + (f" ({run.database.name})" if run.database_id else "") for run in runs)
    message = f"{BackupRun.Kind(kind).label} backup of {server} queued as run {names}."
    if not_queued := [str(e) for e in refused] + [f"{db.name}: {db.problem}" for db in gaps]:
        message += " Not queued: " + "; ".join(not_queued)
    return Outcome(True, message, runs[0])


def run_backup(run_id):
    run = execute(BackupRun.objects.select_related("server").get(pk=run_id))
    after_backup(run)
    return {"id": run.pk, "status": run.status, "error": run.error}


def after_backup(run):
    """A good run's copies to the other tiers are queued; they never hold up the backup."""
    from backups.copies import enqueue_copies

    if run.is_good:
        enqueue_copies(run)


def scheduled_job(server_name, job, scheduled_for=None, waiting_since=None):
    """What every per-server schedule calls. Two workers handed the same occurrence run it once.

    `waiting_since`: set when a backup found its lock taken and was queued again (runner.claim_scheduled).
    """
    server = Server.objects.filter(name=server_name).first()
    if server is None:
        # A django-q2 row that no schedule owns (left by a rename or a delete before schedules
        # followed servers): removed, so it does not fail the same way every night.
        Schedule.objects.filter(name=f"{job}:{server_name}").delete()
        raise LookupError(f"no server is named {server_name}: its {job} schedule was left behind and is now removed")
    if not server.enabled:
        return "server disabled"
    if job == BackupRun.Kind.LOGICAL:
        return scheduled_logical_pass(server, scheduled_for, waiting_since)
    if job in (BackupRun.Kind.BASE, BackupRun.Kind.INCREMENTAL):
        try:
            run = claim_scheduled(
                server, job, actor=f"job:{job}", scheduled_for=scheduled_for, waiting_since=waiting_since
            )
        except RunRefused as e:
            return str(e)
        if run is None:
            return f"the {job} backup of {server} is locked by another run: tried again in {LOCKED_RETRY.seconds} s"
        run = execute(run)
        after_backup(run)
        return run.status
    if job in (BackupSchedule.Job.RESTORE_TEST, BackupSchedule.Job.MONTHLY_RESTORE_TEST):
        # Restores stand above backups: named by dotted path, as a schedule names a task.
        restore_test = import_string(RESTORE_TEST_JOB)
        return restore_test(server.name, monthly=job == BackupSchedule.Job.MONTHLY_RESTORE_TEST)
    if job == BackupSchedule.Job.INGEST_WAL:
        return ingest_wal(server.name)
    raise ValueError(f"unknown job {job!r}")


def scheduled_logical_pass(server, scheduled_for, waiting_since):
    """Every database the server backs up, one run each (backups.databases.logical_pass); the
    task's result says what became of each."""
    done = logical_pass(
        server,
        trigger=BackupRun.Trigger.SCHEDULED,
        actor="job:logical",
        scheduled_for=scheduled_for,
        waiting_since=waiting_since,
        after_each=after_backup,
    )
    said = [f"{run.database.name}: {run.status}" for run in done.runs] + done.refused
    if done.queued_again:
        said.append(f"the logical backup of {server} is locked by another run: tried again in {LOCKED_RETRY.seconds} s")
    if not said and done.taken:
        return done.taken[-1]  # a second worker handed the same occurrence: it says who took it
    if len(said) == 1 and done.runs:
        return done.runs[0].status  # as a base backup's task says it
    return "; ".join(said) or "nothing to back up"


def ingest_wal(server_name):
    """Catalogue, encrypt and copy what the archive program left in the server's spool."""
    from backups import walingest, walnames

    try:
        server = Server.objects.get(name=server_name)
        return walingest.ingest(server, linger=settings.WAL_INGEST_LINGER).as_dict()
    except walnames.WalError as e:
        # One line for the task's result; the spool keeps the WAL, the marker keeps the alert open.
        return {"error": str(e)}


# Portal-wide jobs (not per server): name -> (function, cron in TIME_ZONE). The monitor's
# schedule is watching's own (watching.tasks.ensure_schedules).
GLOBAL_SCHEDULES = {
    "retention": ("backups.tasks.apply_retention", "30 4 * * *"),
    # Copies whose next attempt is due (and deletions a location refused): every minute.
    "copies-retry": ("backups.tasks.retry_copies", "* * * * *"),
    # Sunday 04:00, after the night's backups: the strategy's weekly integrity check of every copy.
    "verify-weekly": ("backups.tasks.verify_copies", "0 4 * * 0"),
    # Request sandboxes older than SANDBOX_MAX_AGE stopped and removed: hourly, as ages are in hours.
    "sandboxes-expire": ("restores.tasks.expire_sandboxes", "20 * * * *"),
    # The 2nd of each month, 06:00: per key in use, its newest backup restore-tested, so that
    # every key a kept backup needs is proved to open it (restores.keys).
    "key-restore-tests": ("restores.tasks.key_restore_tests", "0 6 2 * *"),
    # The journal's head as an anchor in every location, so that a cut journal is caught even by
    # someone who rewrote VAR_DIR: hourly (and after every backup, backups/runner.py).
    "journal-anchors": ("backups.anchors.anchor_journal", "5 * * * *"),
    # The portal's own database (catalog and journal) to every location, after the night's backups.
    "selfbackup": ("backups.tasks.selfbackup", "15 3 * * *"),
}


# Jobs that work on the restore host's own disk (request sandboxes live in its SANDBOX_ROOT) or
# need its private key (the monthly restore test of each key): with RESTORE_CLUSTER, only the
# restore worker's cluster fires them (django-q2 gives a schedule with a cluster to that
# cluster alone), as backups.schedules does for restore tests.
ON_RESTORE_HOST = {"sandboxes-expire", "key-restore-tests"}


def ensure_global_schedules():
    """Create the portal-wide schedules once; superusers may retune them in django-q2's admin."""
    for name, (func, cron) in GLOBAL_SCHEDULES.items():
        if not Schedule.objects.filter(name=name).exists():
            Schedule.objects.create(
                name=name, func=func, schedule_type=Schedule.CRON, cron=cron, repeats=-1, next_run=next_run(cron)
            )
        if name in ON_RESTORE_HOST:
            # Every migrate: a schedule made before RESTORE_CLUSTER was set (or unset) follows it.
            Schedule.objects.filter(name=name).update(cluster=settings.RESTORE_CLUSTER or None)


def selfbackup():
    """The daily backup of the portal's own database: the command's code, on a worker."""
    from backups import selfbackup

    row = selfbackup.take(actor="job:selfbackup")
    return row.status if not row.error else f"{row.status}: {row.error}"


def apply_retention():
    from backups import retention

    return retention.apply_wal_and_base_retention(actor="job:retention")


# --- Storage tiers: copies, verification, free space. ------------------------------------


def make_copies(kind, owner_id):
    """Make the copies of one run ("run") or WAL segment ("wal") now."""
    from backups.copies import copy_pending
    from backups.models import WalSegment

    model = WalSegment if kind == "wal" else BackupRun
    owner = model.objects.filter(pk=owner_id).first()
    if owner is None:
        return "gone"
    return [c.status for c in copy_pending(owner)]


def retry_copies():
    from backups.copies import retry_due_copies

    return retry_due_copies()


def enqueue_verify(run, actor):
    """The portal's "Verify copies now" (run page and admin action): a Verification its page follows."""
    from backupportal import journal
    from backups.models import Verification

    if run.deleted_at is not None or not run.copies.exists():
        return Outcome(False, f"Run #{run.pk} has no copies to verify (failed, or deleted by retention).", run)
    current = next((v for v in run.verifications.active() if not v.fail_if_stale()), None)
    if current is not None:
        return Outcome(False, f"Run #{run.pk} is already being verified (verification #{current.pk}).", run)
    verification = Verification.objects.create(run=run, requested_by=actor)
    journal.record("verify_requested", actor=actor, obj=verification, server=run.server.name, run=run.pk)
    async_task("backups.tasks.verify_copies", run.pk, actor, verification.pk, task_name=f"verify run #{run.pk}")
    return Outcome(True, f"Verification of run #{run.pk} queued as #{verification.pk}: this page follows it.", run)


def verify_copies(run_id=None, actor="job:verify", verification_id=None):
    """The weekly integrity check (every copy), or one run's when a DBA asks for it."""
    from backups import verify
    from backups.models import Verification

    if verification_id is not None:
        verification = Verification.objects.select_related("run").get(pk=verification_id)
    else:
        verification = Verification.objects.create(run_id=run_id, requested_by=actor)
    return verify.execute(verification)
