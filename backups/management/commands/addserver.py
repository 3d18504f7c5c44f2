"""Register a PostgreSQL server to protect, after connecting to it."""

import os
from pathlib import Path

import psycopg
from django.core.exceptions import ValidationError
from django.db import transaction

from backupportal import journal
from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.libpq import DsnError, parse
from backupportal.lib.osuser import os_actor
from backupportal.lib.pgerrors import explain
from backupportal.lib.sealed import SealError
from backups import binaries, tables
from backups.critical import check_tables
from backups.databases import discover
from backups.models import Database, Server
from backups.models.servers import ALL_DATABASES, parse_protect_databases


class Command(PortalCommand):
    help = "Register a server: addserver NAME --dsn postgresql://USER@HOST:PORT/DBNAME"

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--dsn", required=True, help="postgresql://USER@HOST:PORT/DBNAME (no password)")
        parser.add_argument(
            "--password-file", help="a file (0600) holding the password; PGPASSWORD in the environment also works"
        )
        parser.add_argument("--archiving", choices=Server.Archiving.values, default=Server.Archiving.NONE)
        parser.add_argument(
            "--pg-bin", default="", help="one of PG_BIN_DIRS; default: that of the server's major version"
        )
        parser.add_argument(
            "--databases",
            default="",
            help="which databases logical backups dump: all (every one that allows connections, new ones "
            "picked up daily) or a,b,c; default: the DSN's",
        )
        parser.add_argument(
            "--critical-tables",
            default="",
            help="a,b,c: tables (table or schema.table) that must never be empty or shrink; default none",
        )

    def run(self, name, dsn, password_file=None, archiving="none", critical_tables="", databases="", **options):
        if _inline_password(dsn):
            # A password in argv is visible to every user of the host (ps, /proc).
            fail("the DSN holds a password, which would show in the process list: use --password-file or PGPASSWORD")
        try:
            server = Server(name=name, dsn=dsn, archiving=archiving, password=self._password(password_file))
        except SealError as e:
            fail(str(e))
        server.pg_bin = options.get("pg_bin") or ""  # checked against PG_BIN_DIRS by full_clean
        server.protect_databases = databases  # checked by full_clean
        try:
            server.full_clean(validate_unique=False)
        except ValidationError as e:
            fail(
                "; ".join(
                    f"{field}: {' '.join(v)}" if field == "name" else _option(field) + " ".join(v)
                    for field, v in e.message_dict.items()
                )
            )
        if Server.objects.filter(name=name).exists():
            fail(f"a server named {name} is already registered: choose another name, or change it in the admin")
        try:
            server.pg_version = server.probe()
        except ValidationError as e:
            fail(e.messages[0])
        try:
            binaries.client_dir(server)  # client tools of its version (or newer) are listed
        except binaries.MissingBinaries as e:
            fail(str(e))
        try:
            critical = check_tables(server, tables.split_list(critical_tables))  # in the DSN's database
            if critical and not _backs_up_dsn_database(server):
                raise ValueError(
                    f"they are {server.dbname}'s, which --databases leaves out: "
                    "choose each database's critical tables on the server page"
                )
        except ValueError as e:
            fail(f"--critical-tables: {e}")
        with transaction.atomic():
            server.save()  # its schedules come with it (backups.schedules)
            journal.record(
                "server_added",
                actor=os_actor(),
                obj=server,
                dsn=dsn,
                version=server.pg_version,
                critical_tables=critical,
                databases=server.protect_databases or "the DSN's",
            )
            try:
                discover(server, actor=os_actor())
            except psycopg.Error as e:  # it answered the probe a moment ago: say what changed
                fail(f"listing the databases of {server.host}:{server.port} failed: {explain(e, server)}")
            Database.objects.filter(server=server, name=server.dbname).update(critical_tables=critical)
        return {
            "id": server.pk,
            "name": server.name,
            "dsn": server.dsn,
            "version": server.version_display,
            "critical_tables": critical,
            "databases": [
                {"name": db.name, "state": db.state, "problem": db.problem}
                for db in server.databases.filter(protected=True)
            ],
        }

    def describe(self, result):
        critical = ", ".join(result["critical_tables"]) or "none (every table's row count is still compared)"
        lines = [
            f"Registered {result['name']} ({result['dsn']}), PostgreSQL {result['version']}.",
            f"Critical tables: {critical}.",
            "Databases backed up: " + (", ".join(db["name"] for db in result["databases"]) or "none") + ".",
        ]
        lines += [f"  gap: {db['problem']}" for db in result["databases"] if db["state"] != "present"]
        return lines

    def _password(self, password_file):
        if password_file:
            path = Path(password_file)
            if path.is_dir():
                fail(f"password file {path} is a directory: give the file that holds the password")
            if not path.is_file():
                fail(f"password file {path} does not exist: create it with mode 0600")
            if path.stat().st_mode & 0o077:
                fail(f"password file {path} can be read by others: chmod 600 {path}")
            try:
                return path.read_bytes().decode().strip()
            except UnicodeDecodeError:
                fail(f"password file {path} is not text (UTF-8): write the password in it, one line")
        return os.environ.get("PGPASSWORD", "")


def _backs_up_dsn_database(server):
    choice = parse_protect_databases(server.protect_databases)
    return choice == ALL_DATABASES or not choice or server.dbname in choice


def _option(field):
    return "--databases: " if field == "protect_databases" else ""


def _inline_password(dsn):
    try:
        return parse(dsn).password
    except DsnError:
        return ""  # full_clean says what is wrong with it
