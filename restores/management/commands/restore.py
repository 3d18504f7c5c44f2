"""Restore: a logical backup into a new database, production by approved swap, or PITR into a new cluster.

restore RUN_ID --into-database NEWDB [--into-server OTHER] [--tablespace-map OLD=NEW ...] [--with-role-passwords]
restore RUN_ID --replace --request REQUEST_ID
restore --server NAME (--target-time T | --target latest | --target-lsn LSN | --target-name NAME)
        --into-datadir DIR --port PORT
"""

import getpass

from backupportal.lib.commands import PortalCommand, fail


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
        pitr.add_argument("--target-lsn", help="recover up to this LSN")
        pitr.add_argument("--target-name", help="recover to this restore point (pg_create_restore_point)")
        pitr.add_argument("--into-datadir", help="an empty or missing directory for the new cluster")
        pitr.add_argument("--port", type=int, help="a free port for the new cluster")

    def run(self, run_id=None, server=None, **options):
        actor = f"os:{getpass.getuser()}"
        if server and run_id:
            fail("give either RUN_ID (logical restore) or --server (PITR), not both")
        if server:
            from restores.pitr import restore_from_command

            return restore_from_command(server, actor=actor, **options)
        if run_id is None:
            fail("nothing to restore: give a RUN_ID, or --server NAME with a target for PITR")
        if options.get("replace"):
            return replace(run_id, actor, options)
        from restores.logical import restore_from_command

        return restore_from_command(run_id, actor=actor, **options)

    def describe(self, result):
        lines = [f"Restore #{result['id']}: {result['status']} in {result.get('duration_s')} s"]
        for key in ("into_database", "into_datadir", "port", "recovered_to", "error", "notes"):
            if result.get(key):
                lines.append(f"  {key.replace('_', ' ')}: {result[key]}")
        lines += [f"  warning: {warning}" for warning in result.get("warnings") or []]
        return lines


def replace(run_id, actor, options):
    """restore RUN_ID --replace --request ID: here, so that logical restores never import replace
    (which builds on them)."""
    from restores.logical import RestoreFailed, restorable_run
    from restores.replace import replace_from_command
    from restores.tablespaces import parse_tablespace_map

    try:
        run = restorable_run(run_id)
        parse_tablespace_map(options.get("tablespace_map") or ())  # refused as before, even here
    except (RestoreFailed, ValueError) as e:
        fail(str(e))
    return replace_from_command(run, options.get("request"), actor)
