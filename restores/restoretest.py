"""Restore tests: restore the newest good backup somewhere scratch, check it, time it, drop it."""

import time

from django.utils import timezone

from backupportal import conditions, journal
from backupportal.lib.osuser import free_port
from backups.copies import healthy_copies
from backups.models import BackupRun, Database, Server
from backups.runner import beating
from restores import pitr, sandbox
from restores.logical import run_logical
from restores.models import RestoreRun, RestoreTest
from restores.targetdb import dropped, dropped_roles
from restores.validation import check, dbname_of, run_checks

CONDITION = "restore_test_failed"


def run_restore_test(
    server, monthly=False, actor="job:restoretest", kind=BackupRun.Kind.LOGICAL, test=None, database=None, run=None
):
    """Returns the finished RestoreTest (passed or failed); a failure on its row, which the monitor alerts.

    `test` is one a DBA's click created (queued, so that its page exists at once); else a new one.
    `database`: a logical test of that database's newest backup; else the server's newest.
    `run`: that backup instead (the monthly test of a key, restores.keys).
    """
    of_key = run is not None  # a backup chosen by the caller: the monthly test of its key (restores.keys)
    if run is None:
        run = database.latest_good_backup() if database is not None else server.latest_good_backup(kind)
    if database is None and run is not None:
        database = run.database  # None for a base backup: the whole cluster
    if test is None:
        test = RestoreTest.objects.create(
            server=server, kind=kind, backup_run=run, monthly=monthly, database=database, of_key=of_key
        )
    else:
        test.kind, test.backup_run, test.monthly, test.database = kind, run, monthly, database
        test.save(update_fields=["kind", "backup_run", "monthly", "database"])
    if not test.take():
        test.refresh_from_db()
        return test  # failed as never started, or another worker's: its row says
    if run is not None:
        test.encryption_key = key_of(run)
        test.save(update_fields=["encryption_key"])
    with beating(test):  # a worker that dies mid-test leaves it to restores.orphans
        return _run(test, run, kind, database, actor)


def _run(test, run, kind, database, actor):
    test.set_phase("restoring")
    journal.record(
        "restore_test_started", actor=actor, obj=test, server=test.server.name, kind=kind, run=run.pk if run else None
    )
    if run is None:
        of = f" of database {database.name}" if database is not None else ""
        return _finish(
            test, [check("backup", False, f"no good {kind} backup{of} to test: take one first")], None, actor
        )
    if kind == BackupRun.Kind.BASE:
        return _test_base(test, run, actor)
    return _test_logical(test, run, actor)


def key_of(run):
    """The keyring's key a restore of `run` decrypts its backup with: its first healthy copy's."""
    return next((c.encryption_key_id or "" for c in healthy_copies(run)), "")


def kinds_to_test(server, monthly):
    """Which backups a scheduled test restores.

    Weekly: the newest logical backup into a scratch database, the strategy's validate_backup.sh.
    Monthly (first Sunday): the strategy's "full restore to isolated test environment" is, for a
    server with base backups, the newest base backup recovered into a throwaway cluster, the very
    path of a disaster recovery and of PITR, and the newest logical backup as well. The base test
    is monthly, not weekly, because it costs a full copy of the cluster on the portal's host and
    its WAL replay; the integrity of every base backup's copies is already re-read every week
    (the "verify-weekly" schedule). A server that archives WAL but has no good base backup gets a
    failing base test: nothing could recover it to a point in time.
    """
    kinds = [BackupRun.Kind.LOGICAL]
    if monthly and (server.archiving != Server.Archiving.NONE or server.latest_good_backup(BackupRun.Kind.BASE)):
        kinds.append(BackupRun.Kind.BASE)
    return kinds


def scheduled_restore_tests(server, monthly, actor="job:restoretest"):
    """The tests of a weekly or monthly schedule: the newest logical backup of every database the
    server backs up (a database without one fails its test), and the base backup when monthly.
    Each journals itself and tells the monitor."""
    tests = []
    for kind in kinds_to_test(server, monthly):
        if kind == BackupRun.Kind.LOGICAL:
            tests += [
                run_restore_test(server, monthly=monthly, actor=actor, kind=kind, database=database)
                for database in databases_to_test(server)
            ]
        else:
            tests.append(run_restore_test(server, monthly=monthly, actor=actor, kind=kind))
    return tests


def databases_to_test(server):
    """Every database the server backs up, a gap included (its test fails, saying so); the DSN's
    alone for a server whose databases were never looked at."""
    return list(server.databases.filter(protected=True).exclude(state="gone")) or [Database.of_dsn(server)]


def _test_logical(test, run, actor):
    """Into a scratch database on the server itself, as the strategy does, or on its sandbox server."""
    server = test.server
    target = server.sandbox  # the server itself when it has none, held to the approved HOST:PORT
    dbname = f"restoretest_{test.pk}_{timezone.localtime():%Y%m%d%H%M%S}"
    started = time.monotonic()
    restore = run_logical(run, target, dbname, actor, restore_test=test)
    if not restore.succeeded:
        # A failed restore has already dropped what it created.
        return _finish(test, [check("restore", False, restore.error)], None, actor)
    try:
        test.set_phase("checking")
        # What the restore could not apply is on the test's page with it (a subscription detached
        # by design is one: a warning does not fail the test, the checks below judge the data).
        said = [restore.notes, *(f"warning: {w}" for w in restore.warnings or [])]
        checks = [check("restore", True, "; ".join(filter(None, said)))] + run_checks(run, target, dbname)
        # The measured RTO: from the start of the restore to a checked, usable database.
        duration = time.monotonic() - started
    finally:
        test.set_phase("cleaning up")
        left = dropped(target, dbname)
        # On a sandbox server the roles the restore created go with the copy (the next test
        # creates them again). One another test's copy still uses is left, and said.
        roles_left = dropped_roles(target, restore.created_roles)
    if left:  # a copy of production stays on the server: the test fails, so that someone removes it
        checks.append(check("clean up", False, left))
    if roles_left:
        checks.append(check("roles", True, roles_left))
    return _finish(test, checks, duration, actor)


def _test_base(test, run, actor):
    """Into a throwaway cluster on the portal's host: recovered to the end of the backup, checked, removed."""
    datadir = sandbox.throwaway_datadir(test)
    started = time.monotonic()
    try:
        checks = _restore_and_check_base(test, run, actor, datadir)
        # The measured RTO, when it restored: to a recovered, checked cluster.
        duration = time.monotonic() - started if checks[0]["ok"] else None
    finally:
        test.set_phase("cleaning up")
        sandbox.remove_throwaway(datadir)
    return _finish(test, checks, duration, actor)


def _restore_and_check_base(test, run, actor, datadir):
    try:
        plan = pitr.make_plan(test.server, sandbox.target_for(run), str(datadir), free_port(), fallback=False)
    except pitr.Refused as e:
        return [check("restore", False, f"refused: {e}")]
    if plan.base.pk != run.pk:  # passing on another backup would say nothing of this one
        why = next((n for n in plan.notes if f"#{run.pk} " in n), "")
        return [
            check(
                "restore",
                False,
                f"base backup #{run.pk} is not the one a restore to its end would use (#{plan.base.pk})"
                + (f": {why}" if why else "")
                + "; take a new base backup",
            )
        ]
    result = pitr.run_plan(plan, actor, restore_test=test)
    if result["status"] != RestoreRun.Status.SUCCEEDED:
        return [check("restore", False, result["error"])]
    test.set_phase("checking")
    restored = throwaway_server(test.server, plan.port)
    return [check("restore", True, f"recovered to {result['recovered_to']}")] + run_checks(
        run, restored, dbname_of(run)
    )


def throwaway_server(server, port):
    """The restored cluster, as a Server the checks can connect to (never saved)."""
    # The restore listens on localhost only (pitr_recovery.recovery_settings).
    return Server(
        name=f"{server.name} (restored)",
        dsn=f"postgresql://{server.user}@127.0.0.1:{port}/{server.dbname}",
        password=server.password,
        pg_version=server.pg_version,  # the copy's: event triggers are turned off from 17 (targetdb)
    )


def _finish(test, checks, duration, actor):
    passed = all(c["ok"] for c in checks)
    test.status = RestoreTest.Status.PASSED if passed else RestoreTest.Status.FAILED
    test.checks, test.duration_s, test.finished_at, test.phase = checks, duration, timezone.now(), ""
    test.error = "" if passed else "; ".join(f"{c['name']}: {c['detail']}" for c in checks if not c["ok"])[:2000]
    fields = {f: getattr(test, f) for f in ("status", "checks", "duration_s", "finished_at", "error", "phase")}
    # Only while still running: one restores.orphans failed meanwhile (its copy dropped) stays failed.
    if not RestoreTest.objects.filter(pk=test.pk, status=RestoreTest.Status.RUNNING).update(**fields):
        test.refresh_from_db()
        return test
    journal.record(
        "restore_test_passed" if passed else "restore_test_failed",
        actor=actor,
        obj=test,
        server=test.server.name,
        outcome="ok" if passed else "failed",
        monthly=test.monthly,
        kind=test.kind,
        duration_s=duration,
        error=test.error,
    )
    conditions.changed(CONDITION, server=test.server)  # the monitor reads the tests' rows
    return test


def summary(test):
    return {
        "id": test.pk,
        "server": test.server.name,
        "backup_run": test.backup_run_id,
        "kind": test.kind,
        "status": test.status,
        "monthly": test.monthly,
        "duration_s": round(test.duration_s, 3) if test.duration_s is not None else None,
        "checks": test.checks,
    }
