"""Restore: a logical backup into a new database, production by approved swap, or PITR into a new cluster.

restore RUN_ID --into-database NEWDB [--into-server OTHER] [--tablespace-map OLD=NEW ...] [--with-role-passwords]
restore RUN_ID --replace --request REQUEST_ID
restore --server NAME (--target-time T | --target latest | --target-lsn LSN | --target-name NAME)
        --into-datadir DIR --port PORT
"""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor

# Each kind's own options: one given to the other kind would be ignored, and the restore done
# would not be the one asked for.
PITR_OPTIONS = ("target_time", "target", "target_lsn", "target_name", "into_datadir", "port")
LOGICAL_OPTIONS = ("into_database", "into_server", "tablespace_map", "with_role_passwords", "replace", "request")
INTO_NEW_DATABASE = ("into_database", "into_server", "tablespace_map", "with_role_passwords")


def given(options, names):
    """The options of `names` on the command line (an empty string is given: never "no option")."""
    return [f"--{name.replace('_', '-')}" for name in names if options.get(name) not in (None, False)]


def refuse_contradictions(server, options):
    if server is not None and (extra := given(options, LOGICAL_OPTIONS)):
        fail(f"{', '.join(extra)}: for a logical restore (RUN_ID), not a PITR (--server): leave them out")
    if server is None and (extra := given(options, PITR_OPTIONS)):
        fail(f"{', '.join(extra)}: for a PITR (--server NAME), not a logical restore (RUN_ID): leave them out")
    if options.get("replace") and (extra := given(options, INTO_NEW_DATABASE)):
        fail(f"{', '.join(extra)}: --replace restores into production itself: leave them out")
    named = {"server": server, **{n: options.get(n) for n in ("into_server", "into_database", "into_datadir")}}
    for name, value in named.items():
        if value is not None and not str(value).strip():
            fail(f"--{name.replace('_', '-')} is empty: give a value, or leave the option out")


class Command(PortalCommand):
    help = "Restore a backup into a new database or cluster (or replace production with an approved request)."

    def add_arguments(self, parser):
        parser.add_argument("run_id", nargs="?", type=int, help="a logical backup run (restore RUN_ID ...)")
        logical = parser.add_argument_group("logical restore")
        logical.add_argument("--into-database", help="a new database name (it must not exist)")
        logical.add_argument("--into-server", help="another registered server (default: the run's)")
        logical.add_argument(
            "--tablespace-map",
            action="append",
            metavar="OLD=NEW",
            help="onto another server: put what was in the source's tablespace OLD into NEW (repeatable)",
        )
        logical.add_argument(
            "--with-role-passwords",
            action="store_true",
            help="onto another server: give the roles it creates their passwords from the backup",
        )
        logical.add_argument("--replace", action="store_true", help="replace the production database (needs --request)")
        logical.add_argument("--request", type=int, help="the approved restore request")
        pitr = parser.add_argument_group("point-in-time recovery into a new cluster")
        pitr.add_argument("--server", help="the protected server whose base backups and WAL to use")
        pitr.add_argument("--target-time", help='"YYYY-MM-DD HH:MM:SS+05:00" (a timezone is required)')
        pitr.add_argument("--target", choices=["latest"], help="recover to the end of the archived WAL")
        pitr.add_argument("--target-lsn", help="recover every record that begins before this LSN, nothing after it")
        pitr.add_argument("--target-name", help="recover to this restore point (pg_create_restore_point)")
        pitr.add_argument("--into-datadir", help="an empty or missing directory for the new cluster")
        pitr.add_argument("--port", type=int, help="a free port for the new cluster")

    def run(self, run_id=None, server=None, **options):
        actor = os_actor()
        if server is not None and run_id is not None:
            fail("give either RUN_ID (logical restore) or --server (PITR), not both")
        refuse_contradictions(server, options)
        if server:
            result = self.pitr(server, actor, **options)
        elif run_id is None:
            fail("nothing to restore: give a RUN_ID, or --server NAME with a target for PITR")
        else:
            result = self.logical(run_id, actor, **options)
        if result.get("exit_code") and result.get("error"):
            self.stderr.write(f"restore failed: {result['error']}")  # the contract: one line on stderr
        return result

    def logical(self, run_id, actor, into_database=None, into_server=None, replace=False, request=None, **options):
        from restores import logical
        from restores import replace as replacing
        from restores.tablespaces import parse_tablespace_map

        try:
            run = logical.restorable_run(run_id)
            mapping = parse_tablespace_map(options["tablespace_map"] or ())
            if replace:
                restore = replacing.replace_production(run, replacing.approved_request(run, request, actor), actor)
        except (logical.RestoreFailed, replacing.NotApproved, ValueError) as e:
            fail(str(e))
        if not replace:
            target = self.target(run, into_database, into_server, request, options["with_role_passwords"])
            restore = logical.run_logical(
                run,
                target,
                into_database,
                actor,
                tablespace_map=mapping,
                with_role_passwords=options["with_role_passwords"],
            )
        return {**logical.summary(restore), **({} if restore.succeeded else {"exit_code": 1})}

    def target(self, run, into_database, into_server, request, with_role_passwords):
        """The server to restore into, after the refusals of options that do not go together."""
        from backups.models import Server

        if request:
            fail("--request goes with --replace; a restore into a new database needs no approval")
        if with_role_passwords and not into_server:
            fail(
                "--with-role-passwords goes with --into-server: on the backup's own server its roles are already there"
            )
        if not into_database:
            fail("say where to restore: --into-database NEWDB (a new database), or --replace --request ID")
        if not into_server:
            return run.server
        target = Server.objects.filter(name=into_server).first()
        if target is None:
            fail(f"unknown server {into_server!r}: register it with addserver first")
        return target

    def pitr(self, server_name, actor, into_datadir=None, port=None, **options):
        from backups.models import Server
        from restores import pitr

        server = Server.objects.filter(name=server_name).first()
        if server is None:
            fail(f"unknown server {server_name!r}: list them in the admin, or register one with addserver")
        targets = {k: options[k] for k in ("target_time", "target", "target_lsn", "target_name")}
        try:
            plan = pitr.plan_for(server, actor, into_datadir, port, **targets)
        except pitr.Refused as e:
            fail(f"restore refused: {e}")
        plan.report = lambda line: self.stderr.write(f"restore: {line}")
        return pitr.run_plan(plan, actor)

    def describe(self, result):
        lines = [f"Restore #{result['id']}: {result['status']} in {result.get('duration_s')} s"]
        for key in ("into_database", "into_datadir", "port", "recovered_to", "error", "notes"):
            if result.get(key):
                lines.append(f"  {key.replace('_', ' ')}: {result[key]}")
        lines += [f"  warning: {warning}" for warning in result.get("warnings") or []]
        return lines
