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


def remove_sandbox(restore_id, actor, reason):
    """A DBA's "Stop and remove sandbox", queued (enqueue) for the restore worker: the sandbox is
    on its host. The result says what became of it; the journal records a removal."""
    from restores.models import RestoreRun
    from restores.sandbox import NotRemoved, stop_and_remove

    restore = RestoreRun.objects.select_related("server").get(pk=restore_id)
    try:
        removed = stop_and_remove(restore, actor, reason)
    except NotRemoved as e:
        return f"not removed: {e}"
    return "stopped and removed" if removed else "already gone"


def run_request(request_id):
    """Run an approved request once (the approval enqueued it)."""
    from restores.logical import run_logical
    from restores.models import RestoreRequest
    from restores.replace import replace_production
    from restores.sandbox import restore_request

    request = RestoreRequest.objects.select_related("server", "backup_run__server", "into_server").get(pk=request_id)
    if not request.start():
        return request.expired_because or f"request #{request_id} is {request.status}: not run"
    actor = f"{request.requested_by.get_username()} (approved by {request.decided_by.get_username()})"
    # Held to the HOST:PORT its approver saw: a DSN moved since fails the run before anything is sent.
    target = request.restores_into()
    if moved := request.destination_moved():
        restore = _refused(
            request,
            target,
            actor,
            f"{moved}: nothing was restored; ask for the restore again and have another DBA approve it there",
        )
    elif request.backup_run_id and request.backup_run.deleted_at:
        # Retired after its approval (approve refuses one before): its files may be going.
        restore = _refused(request, target, actor, request.retired())
    elif request.destination == RestoreRequest.Destination.REPLACE:
        request.backup_run.server = target  # the server object replace_production restores into
        return replace_production(request.backup_run, request, actor).status
    elif request.destination == RestoreRequest.Destination.SANDBOX_CLUSTER:
        restore = restore_request(request, actor)
    else:
        restore = run_logical(request.backup_run, target, request.target_database, actor, request=request)
    # Succeeded with warnings is a restore done: the run names what was left out.
    request.status = RestoreRequest.Status.SUCCEEDED if restore.succeeded else RestoreRequest.Status.FAILED
    request.save(update_fields=["status"])
    return restore.status


def _refused(request, target, actor, why):
    """The failed run of a request that may not run: `why` on its page and in the journal."""
    from restores.logical import finish
    from restores.models import RestoreRequest, RestoreRun

    replace = request.destination == RestoreRequest.Destination.REPLACE
    restore = RestoreRun.begin(
        RestoreRun.Kind.REPLACE if replace else RestoreRun.Kind.LOGICAL,
        actor,
        server=request.server,
        backup_run=request.backup_run,
        request=request,
        into_server=target,
        into_database=request.production_database if replace else request.target_database,
    )
    return finish(restore, actor, error=why)
