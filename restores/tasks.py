"""django-q2 tasks for restores: thin wrappers, named by dotted path."""

from backups.models import Server


def run_restore_test(server_name, monthly=False):
    from restores.restoretest import run_restore_test as run

    return run(Server.objects.get(name=server_name), monthly=monthly).status
