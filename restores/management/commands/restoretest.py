"""Prove that the newest good backup restores: manage.py restoretest NAME [--kind logical|base] [--json]."""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups.models import Server
from restores.restoretest import run_restore_test, summary


class Command(PortalCommand):
    help = (
        "Restore the newest good backup somewhere scratch (logical: a scratch database; base: a throwaway "
        "cluster on this host), check it, time it, remove it."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="the server's name")
        parser.add_argument(
            "--kind", choices=["logical", "base"], default="logical", help="which kind of backup to test"
        )
        parser.add_argument(
            "--monthly", action="store_true", help="record it as the strategy's monthly full restore test"
        )

    def run(self, name, monthly=False, kind="logical", **options):
        server = Server.objects.filter(name=name).first()
        if server is None:
            fail(f"unknown server {name!r}: list them in the admin, or register one with addserver")
        test = run_restore_test(server, monthly=monthly, actor=os_actor(), kind=kind)
        result = summary(test)
        if test.status != "passed":
            result["exit_code"] = 1
            failed = next((c for c in test.checks if not c["ok"]), None)
            why = f"{failed['name']}: {failed['detail']}" if failed else test.error
            self.stderr.write(f"restore test failed: {why}".splitlines()[0])  # the contract: one line on stderr
        return result

    def describe(self, result):
        lines = [
            f"Restore test #{result['id']} of {result['server']} ({result['kind']} run #{result['backup_run']}): {result['status']} in {result['duration_s']} s"
        ]
        lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}" for c in result["checks"]]
        return lines
