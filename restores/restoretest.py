"""Restore tests: restore the newest good backup somewhere scratch, check it, time it, drop it."""

import time

from django.utils import timezone

from backupportal import journal
from backupportal.alerts import raise_alert, resolve_alert
from backups.models import BackupRun
from restores.logical import drop_database, run_logical
from restores.models import RestoreRun, RestoreTest
from restores.validation import check, run_checks

CONDITION = "restore_test_failed"


def run_restore_test(server, monthly=False, actor="job:restoretest"):
    """Returns the finished RestoreTest (passed or failed); raises an alert when it failed."""
    run = server.latest_good_backup(BackupRun.Kind.LOGICAL)
    test = RestoreTest.objects.create(server=server, backup_run=run, monthly=monthly)
    journal.record("restore_test_started", actor=actor, obj=test, server=server.name, run=run.pk if run else None)
    if run is None:
        return _finish(test, [check("backup", False, "no good logical backup to test: take one first")], None, actor)
    target = server.sandbox or server
    dbname = f"restoretest_{test.pk}_{timezone.localtime():%Y%m%d%H%M%S}"
    started = time.monotonic()
    restore = run_logical(run, target, dbname, actor)
    if restore.status != RestoreRun.Status.SUCCEEDED:
        # A failed restore has already dropped what it created.
        return _finish(test, [check("restore", False, restore.error)], None, actor)
    try:
        checks = [check("restore", True, restore.notes)] + run_checks(run, target, dbname)
        # The measured RTO: from the start of the restore to a checked, usable database.
        duration = time.monotonic() - started
    finally:
        drop_database(target, dbname)
    return _finish(test, checks, duration, actor)


def _finish(test, checks, duration, actor):
    passed = all(c["ok"] for c in checks)
    test.status = RestoreTest.Status.PASSED if passed else RestoreTest.Status.FAILED
    test.checks, test.duration_s, test.finished_at = checks, duration, timezone.now()
    test.error = "" if passed else "; ".join(f"{c['name']}: {c['detail']}" for c in checks if not c["ok"])[:2000]
    test.save(update_fields=["status", "checks", "duration_s", "finished_at", "error"])
    journal.record(
        "restore_test_passed" if passed else "restore_test_failed",
        actor=actor,
        obj=test,
        server=test.server.name,
        outcome="ok" if passed else "failed",
        monthly=test.monthly,
        duration_s=duration,
        error=test.error,
    )
    if passed:
        resolve_alert(CONDITION, server=test.server)
    else:
        raise_alert(
            CONDITION, server=test.server, message=f"Restore test #{test.pk} of {test.server} failed: {test.error}"
        )
    return test


def summary(test):
    return {
        "id": test.pk,
        "server": test.server.name,
        "backup_run": test.backup_run_id,
        "status": test.status,
        "monthly": test.monthly,
        "duration_s": round(test.duration_s, 3) if test.duration_s is not None else None,
        "checks": test.checks,
    }
