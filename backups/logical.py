"""Logical backups: pg_dump (custom format) of one database of the server, and the cluster's globals beside it.

The dump is taken from a snapshot exported by our own connection, which also counts the rows
of every table: the recorded row counts are exactly what the dump holds.
"""

from django.conf import settings
from django.utils import timezone

from backups import keyring, tables
from backups.binaries import client_tool, conninfo_dbname, dir_major
from backups.crypto import EncryptionError
from backups.models import WAL_LOCATION, BackupCopy, BackupRun, StorageLocation
from backups.pipeline import (
    BackupFailed,
    SnapshotCounts,
    Tool,
    dump_compression_level,
    encrypt_to,
    exported_snapshot,
    heartbeat,
    lock_not_granted,
)
from backups.storage import store_for


def keys_for(run):
    stamp = timezone.localtime(run.created_at).strftime("%Y%m%dT%H%M%S%z")
    base = f"{run.server.name}/logical/{stamp}-{run.pk}"
    return f"{base}.dump.gpg", f"{base}.globals.sql.gpg"


def primary_location():
    # The WAL archive is a primary location too (WAL_ROOT), but never where runs go.
    primary = StorageLocation.objects.filter(kind=StorageLocation.Kind.PRIMARY, enabled=True)
    location = primary.exclude(name=WAL_LOCATION).first()
    if location is None:
        raise BackupFailed(
            "no enabled primary storage location: set BACKUP_ROOT and run migrate, or add one in the admin"
        )
    return location


def take(run):
    server = run.server
    try:
        encryption = keyring.current()
    except EncryptionError as e:
        raise BackupFailed(str(e)) from None
    location = primary_location()
    store = store_for(location)
    dump_key, globals_key = keys_for(run)
    # Recorded before any byte is written, so a killed run's leftovers can be found and removed.
    run.key = dump_key
    run.details.update(
        {"keys": [dump_key, globals_key], "encryption": encryption.method, "key_id": encryption.custody_key}
    )
    run.save(update_fields=["key", "details"])

    dbname = run.database.name if run.database_id else server.dbname
    run.details["database"] = dbname
    pg_dump = client_tool(server, "pg_dump")
    # Only a pg_restore at least as new reads the dump: binaries.restore_dir(dump_major=...).
    run.details["pg_dump_major"] = dir_major(str(pg_dump.parent))
    critical = run.database.critical_tables if run.database_id else []
    conn, snapshot, listed = exported_snapshot(server, dbname)
    counting = SnapshotCounts(server, dbname, snapshot, listed, digested=critical)  # beside pg_dump
    try:
        dump = Tool(
            [
                str(pg_dump),
                "--format=custom",
                f"--compress={dump_compression_level()}",
                "--blobs",
                f"--snapshot={snapshot}",
                f"--lock-wait-timeout={settings.BACKUP_LOCK_WAIT * 1000}",  # see BACKUP_LOCK_WAIT
                "--no-password",
                # 18's pg_dump leaves the planner's statistics out unless asked, and pg_restore puts
                # them back: without them a restored copy plans blind until an ANALYZE (hours, large).
                *(["--statistics"] if (run.details["pg_dump_major"] or 0) >= 18 else []),
            ],
            server.libpq_env(dbname),
        )
        try:
            size, sha256 = encrypt_to(
                store,
                dump_key,
                dump,
                encryption,
                on_tick=counting.ticks(heartbeat(BackupRun, run.pk)),
                timeout=_timeout(),
                server=server,
            )
        except BackupFailed as e:
            counting.stop()
            # Production's ALTER TABLE or TRUNCATE queued behind the backup's locks stops pg_dump's
            # lock and the counting's alike: said one way, whichever gave up first. pg_dump's
            # --lock-wait-timeout is a statement_timeout around its LOCK TABLE (it sets none else).
            raise lock_not_granted() if "due to statement timeout" in str(e) else e from None
        counts, digests = counting.result()
        shrunk = critical_shrunk(conn, run, critical, counts)
    finally:
        counting.stop()  # no-op once read
        conn.close()
    if shrunk:  # the backup is faithful: production lost the rows (the monitor's data_shrank alert)
        run.details["shrank"] = shrunk
    run.size, run.sha256, run.bytes_done = size, sha256, size
    run.details["row_counts"] = counts
    if digests:  # the critical tables' rows, for the restore test to compare the copy's with
        run.details["content_digests"] = digests
    run.details["pg_dump_compress"] = dump_compression_level()
    made_with = {"encryption_key_id": encryption.custody_key}
    BackupCopy.record_made(location, dump_key, size, sha256, run=run, artifact="main", **made_with)

    shared = shared_globals(run)
    if shared is None:
        g_size, g_sha256, note = take_globals(server, store, globals_key, encryption)
        shared = {"key": globals_key, "size": g_size, "sha256": g_sha256, "note": note}
        BackupCopy.record_made(location, globals_key, g_size, g_sha256, run=run, artifact="globals", **made_with)
    run.details["globals"] = shared
    if shared.get("note"):
        run.notes = shared["note"]


def shared_globals(run):
    """The globals file of the run this one pairs with in a pass over several databases
    (details.globals_from, set by backups.databases), named by that run ("run"); else None.
    Roles and tablespaces belong to the cluster: a pass dumps them once, and each run says which
    file it pairs with (restores.logical reads that one; retention keeps that run while it is
    named)."""
    owner_id = run.details.get("globals_from")
    owner = BackupRun.objects.good().filter(pk=owner_id).first() if owner_id else None
    if owner is None or "run" in owner.details.get("globals", {"run": None}):
        return None
    return {**owner.details["globals"], "run": owner.pk}


def take_globals(server, store, key, encryption):
    """pg_dumpall --globals-only: roles and tablespaces, which pg_dump leaves out.

    A non-superuser cannot read role passwords; then the roles are dumped without them and
    the run says so, rather than failing the backup.
    """
    argv = [str(client_tool(server, "pg_dumpall")), "--globals-only", "--no-password"]
    # --database (-l), not --dbname (-d): pg_dumpall drops the dbname of its -d connection string.
    argv.append(f"--database={conninfo_dbname(server.dbname)}")
    try:
        size, sha256 = encrypt_to(store, key, Tool(argv, server.libpq_env()), encryption, server=server)
        return size, sha256, ""
    except BackupFailed as e:
        if "pg_authid" not in str(e) and "permission denied" not in str(e):
            raise
    size, sha256 = encrypt_to(
        store, key, Tool(argv + ["--no-role-passwords"], server.libpq_env()), encryption, server=server
    )
    return size, sha256, "globals dumped without role passwords: the backup user is not a superuser"


def critical_shrunk(conn, run, critical, counts):
    """The critical tables empty, or shrunk past the server's threshold against the database's
    previous good backup, as one line each: said at backup time, not only by the next restore test."""
    previous = (
        BackupRun.objects.good()
        .filter(server=run.server_id, kind=BackupRun.Kind.LOGICAL, database=run.database_id)
        .exclude(pk=run.pk)
        .order_by("-finished_at")
        .first()
    )
    now, before = tables.normalized(counts), tables.normalized(previous.details.get("row_counts") if previous else {})
    said = []
    for name in critical:
        actual = tables.total(conn, name, now)
        if actual is None:
            continue  # gone from the database: the restore test names it
        complaint = (
            "empty"
            if actual == 0
            else previous and tables.shrank(conn, name, actual, before, previous.pk, run.server.shrink_threshold_pct)
        )
        said += [f"{tables.qualified(conn, name)}: {complaint}"] if complaint else []
    return said


def _timeout():
    from django.conf import settings

    return settings.BACKUP_TIMEOUT
