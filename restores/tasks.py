"""django-q2 tasks for restores: thin wrappers, named by dotted path.

They read backups, so they need the key that decrypts them: with RESTORE_CLUSTER set they are
queued for the restore worker's cluster alone (enqueue below), the one host that holds the
private key in public-key mode (README: Public-key mode).
"""

from django.conf import settings
from django_q.tasks import async_task

from backups.models import Server


def restore_cluster():
    """The django-q2 cluster restore tasks go to: RESTORE_CLUSTER, else None (the main cluster)."""
    return settings.RESTORE_CLUSTER or None


def enqueue(func, *args, **kwargs):
    """Queue a restore, restore-test or rebuild task where the private key is."""
    return async_task(func, *args, cluster=restore_cluster(), **kwargs)


def run_restore_test(server_name, monthly=False, kind="logical", test_id=None):
    from restores.models import RestoreTest
    from restores.restoretest import run_restore_test as run

    test = RestoreTest.objects.get(pk=test_id) if test_id else None
    return run(Server.objects.get(name=server_name), monthly=monthly, kind=kind, test=test).status


def scheduled_restore_test(server_name, monthly=False):
    """The weekly and the monthly schedules' job (backups.tasks.scheduled_job): the statuses."""
    from restores.restoretest import scheduled_restore_tests

    return [test.status for test in scheduled_restore_tests(Server.objects.get(name=server_name), monthly)]


def key_restore_tests():
    """The monthly "key-restore-tests": per key in use, its newest backup restore-tested."""
    from restores.keys import monthly_key_tests

    return [(test.encryption_key, test.status) for test in monthly_key_tests()]


def expire_sandboxes():
    """The hourly sweep of "sandboxes-expire": what `manage.py sandboxes --expire` does."""
    from restores.sandbox import expire

    return [run.into_datadir for run in expire(actor="job:sandboxes")]


def run_request(request_id):
    """Run an approved request once (the approval enqueued it)."""
    from restores.logical import run_logical
    from restores.models import RestoreRequest
    from restores.replace import replace_production
    from restores.sandbox import restore_request

    request = RestoreRequest.objects.select_related("server", "backup_run", "into_server").get(pk=request_id)
    if not request.start():
        return f"request #{request_id} is {request.status}: not run"
    actor = f"{request.requested_by.get_username()} (approved by {request.decided_by.get_username()})"
    if request.destination == RestoreRequest.Destination.REPLACE:
        return replace_production(request.backup_run, request, actor).status
    if request.destination == RestoreRequest.Destination.SANDBOX_CLUSTER:
        restore = restore_request(request, actor)
    else:
        restore = run_logical(
            request.backup_run, request.into_server or request.server, request.target_database, actor, request=request
        )
    # Succeeded with warnings is a restore done: the run names what was left out.
    request.status = RestoreRequest.Status.SUCCEEDED if restore.succeeded else RestoreRequest.Status.FAILED
    request.save(update_fields=["status"])
    return restore.status
