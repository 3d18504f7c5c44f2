"""Is a server ready to be protected? Each check with a verdict and what to do.

    manage.py checkserver NAME [--json]

Exit 0 when nothing fails (warnings allowed), 1 otherwise.
"""

from backupportal import journal
from backupportal.lib.commands import PortalCommand
from backupportal.lib.osuser import os_actor
from backupportal.lib.pgerrors import explain
from backups import binaries, receiver, walhealth, walspool
from backups.crypto import Encryption, EncryptionError
from backups.management.commands._server import server_named
from backups.models import Server, StorageLocation
from backups.storage import StorageError, store_for

FREE_SPACE_MIN = 0.20  # the strategy's "insufficient storage space (< 20% free)"


def check(name, verdict, detail, todo=""):
    return {"check": name, "verdict": verdict, "detail": detail, "todo": todo}


class Command(PortalCommand):
    help = "Check whether a server is ready to be protected: connection, WAL settings, archiving, slot, space."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the server's name (addserver NAME)")

    def run(self, name, **options):
        server = server_named(name)
        checks = server_checks(server) + [binaries_check(server), encryption_check()] + location_checks()
        failed = [c["check"] for c in checks if c["verdict"] == "fail"]
        journal.record(
            "server_checked",
            actor=os_actor(),
            obj=server,
            outcome="failed" if failed else "ok",
            failed=failed,
        )
        result = {"server": server.name, "ready": not failed, "checks": checks}
        if failed:
            self.stderr.write(f"{server.name} is not ready: {', '.join(failed)} failed")
            result["exit_code"] = 1
        return result

    def describe(self, result):
        lines = [f"{result['server']}: {'ready' if result['ready'] else 'NOT READY'}"]
        for c in result["checks"]:
            lines.append(f"  {c['verdict']:<4} {c['check']}: {c['detail']}")
            if c["todo"] and c["verdict"] != "ok":
                lines.append(f"       -> {c['todo']}")
        return lines


def server_checks(server):
    import psycopg

    try:
        conn = server.connect()
    except psycopg.Error as e:
        return [check("connection", "fail", explain(e, server), "fix the DSN, the password or pg_hba.conf")]
    with conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'archive_mode', "
                "'archive_command', 'archive_timeout', 'max_wal_senders', 'wal_segment_size', 'server_version', "
                "'summarize_wal', 'wal_summary_keep_time')"
            ).fetchall()
        )
        may_replicate = conn.execute(
            "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"
        ).fetchone()[0]
        slot = conn.execute(receiver.SLOT_ROW, [server.replication_slot]).fetchone()
        size = walspool.segment_size(server, conn)
        version = conn.info.server_version
    checks = [
        check("connection", "ok", f"PostgreSQL {settings['server_version']} on {server.host}:{server.port}"),
        version_check(version),
        wal_level_check(settings["wal_level"]),
        senders_check(int(settings["max_wal_senders"])),
        check(
            "replication privilege",
            "ok" if may_replicate else "fail",
            f"{server.user} {'may' if may_replicate else 'may not'} open replication connections",
            f"ALTER ROLE {server.user} REPLICATION (pg_basebackup and pg_receivewal need it)",
        ),
        check("wal_segment_size", "ok", f"{size // 1024 // 1024} MB segments"),
    ]
    if version >= 170000:
        checks.append(summaries_check(server, settings))
    if server.archiving == Server.Archiving.PUSH:
        checks += push_checks(server, settings)
    elif server.archiving == Server.Archiving.PULL:
        checks.append(slot_check(server, slot))
    else:
        checks.append(
            check(
                "archiving",
                "warn",
                "WAL is not archived: logical backups only, no point-in-time recovery",
                f"manage.py archivecommand {server.name} (push) or manage.py receivewal {server.name} (pull)",
            )
        )
    return checks


def version_check(version):
    if version >= 150000:
        return check("version", "ok", f"{version // 10000}.{version % 10000}")
    return check("version", "fail", f"{version // 10000} is older than 15", "upgrade PostgreSQL")


def summaries_check(server, settings):
    """17+: the 6-hourly incremental is a block-level backup only with WAL summaries since its parent."""
    todo = (
        "summarize_wal = on and wal_summary_keep_time of a day or more (default 10d), reload; "
        f"then a full base backup (manage.py backup {server.name} --kind base) for the incrementals to build on"
    )
    if settings.get("summarize_wal") != "on":
        return check("summarize_wal", "warn", "off: the 6-hourly incremental cannot be a block-level backup", todo)
    keep = int(settings["wal_summary_keep_time"])  # minutes; 0 keeps them forever
    if 0 < keep < 24 * 60:
        return check(
            "summarize_wal", "warn", f"on, but summaries kept {keep} min: an incremental may find them gone", todo
        )
    return check("summarize_wal", "ok", f"on, summaries kept {f'{keep} min' if keep else 'forever'}", todo)


def wal_level_check(level):
    if level in ("replica", "logical"):
        return check("wal_level", "ok", level)
    return check(
        "wal_level", "fail", f"{level}: too little WAL for base backups and PITR", "wal_level = replica, restart"
    )


def senders_check(senders):
    if senders >= 2:
        return check("max_wal_senders", "ok", str(senders))
    return check(
        "max_wal_senders",
        "fail",
        f"{senders}: pg_basebackup and pg_receivewal each need a WAL sender",
        "max_wal_senders = 10, restart",
    )


def archive_command_check(server, command):
    fix = f"set it to what `manage.py archivecommand {server.name}` prints, then reload"
    if command == walspool.archive_command(server):
        return check("archive_command", "ok", command, fix)
    if walspool.is_portal_command(server, command):
        # Still archives correctly, only slower: a backlog's segments start cmp or Python each.
        return check("archive_command", "warn", f"{command} (the portal's earlier form, slower)", fix)
    return check("archive_command", "fail", command or "(empty)", fix)


def push_checks(server, settings):
    checks = [
        check(
            "archive_mode",
            "ok" if settings["archive_mode"] in ("on", "always") else "fail",
            settings["archive_mode"],
            "archive_mode = on, restart",
        ),
        archive_command_check(server, settings["archive_command"]),
    ]
    timeout = int(settings["archive_timeout"])
    objective = server.rpo_minutes * 60
    checks.append(
        check(
            "archive_timeout",
            "ok" if 0 < timeout <= objective else "warn",
            f"{timeout} s against an RPO objective of {server.rpo_minutes} min",
            f"archive_timeout = {min(60, objective)}: a quiet server otherwise holds its last changes unarchived",
        )
    )
    problems = [m.get("message", m.get("segment")) for m in walhealth.error_markers(server)]
    failure = walhealth.archiver_failure(server)
    if failure:
        problems.append(failure)
    checks.append(
        check(
            "archiving failures",
            "fail" if problems else "ok",
            "; ".join(problems) or "none (pg_stat_archiver and the spool)",
            "see the server log and the spool's errors/ directory",
        )
    )
    return checks


def slot_check(server, slot):
    if slot is None:
        return check(
            "replication slot",
            "warn",
            f"{server.replication_slot} does not exist yet",
            f"manage.py receivewal {server.name} creates it",
        )
    if invalidated := receiver.slot_invalidated(server, slot[2]):
        return check("replication slot", "fail", *invalidated)
    if not slot[0]:
        return check(
            "replication slot",
            "fail",
            f"{server.replication_slot} exists but nothing streams from it: the server keeps WAL for it",
            f"start manage.py receivewal {server.name}",
        )
    return check("replication slot", "ok", f"{server.replication_slot}, streaming")


def binaries_check(server):
    """Which directory of PG_BIN_DIRS runs the client tools, and whether restores have theirs."""
    listed = ", ".join(f"{d} (PostgreSQL {m})" for d, m in binaries.usable_dirs()) or "none usable"
    todo = "install the PostgreSQL packages of the server's version and list their bin directory in PG_BIN_DIRS"
    try:
        binaries.client_dir(server)
    except binaries.MissingBinaries as e:
        return check("PostgreSQL binaries", "fail", f"{e} (PG_BIN_DIRS: {listed})", todo)
    major = binaries.server_major(server)
    exact = major is None or any(m == major for _, m in binaries.usable_dirs())
    return check(
        "PostgreSQL binaries", "ok" if exact else "warn", f"{binaries.describe(server)}; PG_BIN_DIRS: {listed}", todo
    )


def encryption_check():
    try:
        method = Encryption().method
    except EncryptionError as e:
        return check("encryption", "fail", str(e), "set BACKUP_PASSPHRASE_FILE or GPG_RECIPIENTS")
    return check("encryption", "ok", method)


def location_checks():
    checks = []
    for location in StorageLocation.objects.filter(enabled=True).exclude(kind=StorageLocation.Kind.S3):
        free, total = store_for(location).usage()
        share = free / total if total else 0
        checks.append(
            check(
                f"free space of {location.name}",
                "ok" if share >= FREE_SPACE_MIN else "fail",
                f"{share:.0%} free ({free // 2**20} MB of {total // 2**20} MB) at {location.path}",
                "free space or add capacity",
            )
        )
    locked = StorageLocation.objects.filter(enabled=True, kind=StorageLocation.Kind.S3)
    checks += [lock_check(location) for location in locked.exclude(lock_mode=StorageLocation.LockMode.NONE)]
    return checks


def lock_check(location):
    """A location set to lock its objects needs a bucket with Object Lock: its uploads fail without it."""
    try:
        store_for(location).check()
    except StorageError as e:
        return check(f"object lock of {location.name}", "fail", str(e), "enable Object Lock on the bucket")
    what = f"{location.lock_mode} lock of {location.lock_days} days on s3://{location.bucket}"
    return check(f"object lock of {location.name}", "ok", what)
