"""Logical restores: a pg_dump backup into a new database, checked, never over an existing one.

The copy is read from the first healthy location, its sha256 checked as it streams, decrypted
by gpg and piped into pg_restore (one job; see RESTORE_JOBS for the parallel variant). On any
failure the new database is dropped: a failed restore changes nothing.
"""

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import psycopg
from django.conf import settings
from psycopg import sql

from backupportal import journal
from backupportal.lib.pgerrors import explain
from backups import keyring
from backups.binaries import client_tool, server_major
from backups.copies import healthy_copies, mark_faults, open_first_healthy
from backups.crypto import Encryption, EncryptionError, gpg_failure
from backups.models import BackupRun
from backups.pipeline import BackupFailed
from backups.runner import beating
from backups.storage import StorageError, store_for
from backups.streams import CopyCorrupt
from restores import cluster_globals, dbprops, targetdb
from restores.eventtriggers import ANY_SUBSCRIPTION_OWNER, EventTriggers
from restores.models import RestoreRun
from restores.pgrestore import restore_parallel, restore_piped, tool_for
from restores.sqlscript import NotText, script_text
from restores.tablespaces import check_tablespaces, relocate
from restores.targetdb import (
    RestoreFailed,
    check_database_name,
    created,
    database_exists,
    drop_database,
    dropped,
    dropped_roles,
)


def restorable_run(run_id):
    run = BackupRun.objects.select_related("server").filter(pk=run_id).first()
    if run is None:
        raise RestoreFailed(f"there is no backup run #{run_id}: pick one from the runs list")
    if run.kind != BackupRun.Kind.LOGICAL:
        raise RestoreFailed(f"run #{run_id} is a {run.kind} backup: restore it with --server NAME (PITR)")
    if run.status != BackupRun.Status.SUCCEEDED:
        raise RestoreFailed(f"run #{run_id} {run.status}: it has no artifact to restore; pick a succeeded run")
    if run.deleted_at:
        raise RestoreFailed(f"run #{run_id} was deleted by retention on {run.deleted_at:%Y-%m-%d}: pick a newer run")
    return run


def restore_into(run, target, dbname, restore=None, with_role_passwords=False, tablespace_map=None, advice=None):
    """Restore `run` into a new database `dbname` on `target`, as `pg_restore --create` would
    have made it under that name. Returns notes; what could not be applied goes to
    `restore.warnings`. Raises RestoreFailed, after dropping whatever it created.
    `advice(quoted name, slot)`: the warning for a subscription the copy brings (targetdb.detach_all).

    Checks everything that can be checked before anything is created.
    """
    try:
        encryption = Encryption()
        keyring.require_keys(healthy_copies(run), f"backup #{run.pk}")  # a missing key, named, before anything starts
    except EncryptionError as e:
        raise RestoreFailed(str(e)) from None
    if database_exists(target, dbname):
        raise RestoreFailed(
            f"database {dbname} already exists on {target}: choose a new name (a restore never overwrites)"
        )
    if not healthy_copies(run):
        raise RestoreFailed(f"run #{run.pk} has no healthy copy left in any location")
    tablespace_map = tablespace_map or {}
    try:
        check_tablespaces(target, tablespace_map)
    except ValueError as e:
        raise RestoreFailed(str(e)) from None
    except psycopg.Error as e:
        raise RestoreFailed(explain(e, target)) from None
    notes, warnings = [], []
    props = read_properties(run, target, encryption, warnings)
    elsewhere = target.pk != run.server_id
    statements = _create_statements(props, dbname, elsewhere, tablespace_map, warnings)
    # Onto another cluster its tablespaces do not exist: the objects go to the default one.
    extra = ["--no-tablespaces"] if elsewhere or tablespace_map else []
    roles = []
    if restore is not None:  # dropped by restores.orphans if this process dies before it ends
        restore.leaves(**{**restore.left, "database": dbname, "at": target.destination})
    if elsewhere:
        # Each role recorded before it is made: a restore killed meanwhile leaves none behind.
        about_to_make = (lambda made: restore.leaves(**{**restore.left, "roles": made})) if restore else None
        roles = restore_globals(run, target, encryption, notes, warnings, with_role_passwords, about_to_make)
    made = False
    held = EventTriggers(props, subscriptions=(target.pg_version or 0) < ANY_SUBSCRIPTION_OWNER)
    try:
        toc = (props.copy_id, props.head) if props is not None else None
        make = partial(_create, target, dbname, statements, props, notes, warnings)
        notes += _create_and_restore(run, target, dbname, encryption, restore, make, extra, toc, held)
        made = True
        if held.subscriptions:  # before they are detached
            notes += _create_held(run, target, dbname, extra, held, "subscription", warnings)
        try:
            targetdb.detach_all(target, dbname, warnings, advice)
        except psycopg.Error as e:
            raise RestoreFailed(explain(e, target)) from None
        if props is not None:
            notes.append(_apply_properties(props, target, dbname, warnings))
        if tablespace_map:
            notes += relocate(props, target, dbname, tablespace_map, warnings)
        if held.entries:
            notes += _create_held(run, target, dbname, extra, held, "event trigger", warnings)
    except BaseException as e:
        # A database that failed to be made was dropped where it failed.
        left = "; ".join(filter(None, [dropped(target, dbname) if made else "", dropped_roles(target, roles)]))
        if left and isinstance(e, RestoreFailed):
            raise RestoreFailed(f"{e}; {left}") from None
        raise
    finally:
        held.remove()
    if restore is not None:
        restore.warnings = warnings
        restore.created_roles = roles  # a restore test drops them with its database (dropped_roles), saved by finish
    return notes


def _create_held(run, target, dbname, extra, held, what, warnings):
    """The held-back event triggers (or subscriptions), in one transaction. Only a superuser may
    own one (a subscription: up to PostgreSQL 15): an owner that is none on `target` (production's
    superusers are created on another cluster without SUPERUSER) fails it whole, and they are
    created again owned by the restoring role, said."""
    which = "subscriptions" if what == "subscription" else "only"

    def last(*more):
        tool = tool_for(
            target, dbname, pg_restore_for(target, run), *extra, "--single-transaction", *more, *held.only(which)
        )
        # Its commits wait for their WAL flush: no session opens in the copy once its login
        # triggers exist (flush_wal's would run them).
        tool.env["PGOPTIONS"] += " -c synchronous_commit=on"
        return tool

    try:
        return held.create(last(), target, what)
    except RestoreFailed as e:
        if f"permission denied to change owner of {what}" not in str(e):
            raise
    warnings.append(
        f"the dump's {what}s are owned by a role that is not a superuser on {target} (a superuser is"
        f" created there without SUPERUSER): they were created owned by {target.user} instead; once that role"
        f" is a superuser there, give each back with ALTER {what.upper()} name OWNER TO role"
    )
    return held.create(last("--no-owner"), target, what)


def _create_and_restore(run, target, dbname, encryption, restore, make, extra, toc=None, held=None):
    # CREATE DATABASE copies template1 through the WAL (a quarter of a second on a small
    # server): it runs while gpg decrypts, and pg_restore waits for it. make(): _create's.
    with ThreadPoolExecutor(max_workers=1) as pool:
        creation = pool.submit(make)
        try:
            return _restore_dump(run, target, dbname, encryption, restore, creation, make, extra, toc, held)
        except BaseException as e:
            # creation.exception() waits for it: a database half made is dropped too.
            left = dropped(target, dbname) if creation.exception() is None else ""
            if left and isinstance(e, RestoreFailed):
                raise RestoreFailed(f"{e}; {left}") from None
            raise


def _restore_dump(run, target, dbname, encryption, restore, creation, make, extra=(), toc=None, held=None):
    """Try the healthy copies in order; a corrupt one is marked bad and the next is tried, and so
    is one whose location fails mid-stream (kept good: the location may only be down).

    `toc` is (copy id, the decrypted start of that copy: its table of contents), as
    read_properties read it: the parallel restore starts the schema from it. `held`: the
    EventTriggers held back, told what the verified copy begins with."""
    notes, failed, why = [], [], []
    held = held or EventTriggers(None)
    # The program, and what every call takes.
    command = [pg_restore_for(target, run), *extra, *statistics_left_out(target, run), *held.args()]
    while True:
        try:
            reader = open_first_healthy(run, exclude=failed)
        except StorageError as e:
            if why:  # this restore found the last copies corrupt or broken off: say how
                raise RestoreFailed(f"no copy of run #{run.pk} could be read to the end: {'; '.join(why)}") from None
            raise RestoreFailed(str(e)) from None
        copy = reader.copy
        notes += [reader.note] if reader.note else []
        try:
            if settings.RESTORE_JOBS > 1:
                head = toc[1] if toc is not None and toc[0] == copy.pk else None
                restore_parallel(reader, target, dbname, encryption, restore, creation, command, head, held)
            else:
                restore_piped(reader, target, dbname, encryption, restore, creation, command, held)
            notes.append(f"read from {copy.location.name} ({store_for(copy.location).uri(copy.key)}), sha256 verified")
            return notes
        except (StorageError, RestoreFailed) as e:
            # gpg's integrity check may trip before the hash does: a copy that does not decrypt
            # while its hash is wrong is corrupt, whichever noticed first.
            corrupt = e if isinstance(e, CopyCorrupt) else reader.corrupt()
            if corrupt is not None:
                mark_faults([corrupt])
                notes.append(str(corrupt))
                why.append(f"corrupt: {corrupt}")
            elif reader.read_error is not None:
                failed.append(copy)
                why.append(f"{copy.location.name} failed mid-stream ({reader.read_error})")
                notes.append(f"{why[-1]}: reading the next copy")
            else:
                raise
            created(creation, target)
            drop_database(target, dbname)
            make()
        finally:
            reader.close()


def statistics_left_out(target, run):
    """pg_dump 18's planner statistics go back only into 18 or newer (pg_restore_relation_stats);
    into an older server (17: 16 and older refuse 18's dumps, binaries.restore_dir) they stay out."""
    major = server_major(target)
    return ["--no-statistics"] if (run.details.get("pg_dump_major") or 0) >= 18 and major and major < 18 else []


def pg_restore_for(target, run):
    """The pg_restore that reads `run`'s dump into `target` (binaries.restore_dir)."""
    return client_tool(target, "pg_restore", dump_major=run.details.get("pg_dump_major"))


def read_properties(run, target, encryption, warnings):
    """The dump's own database entries (dbprops), from the first copy whose start decrypts.

    None when no copy's start can be read: the restore itself then meets the same fault
    and says what it is (a wrong passphrase, every copy corrupt); should it succeed anyway,
    the missing properties are a warning. When no copy can even be opened, RestoreFailed says
    why for each now: the restore would meet them marked bad already, and say less.
    """
    tried, why = [], []
    while True:
        try:
            reader = open_first_healthy(run, exclude=tried)
        except StorageError as e:
            if not tried:
                raise RestoreFailed(str(e)) from None
            warnings.append(f"the database's own properties could not be read from the dump: {'; '.join(why)}")
            return None
        try:
            pg_restore = pg_restore_for(target, run)
            listing, head = dbprops.read_toc(reader, encryption, pg_restore)
            props = dbprops.DatabaseProperties.parse(
                listing, dbprops.database_script(listing, head, pg_restore, warnings, converted_by(target))
            )
            props.head = head  # the table of contents, for --tablespace-map and the parallel restore
            props.pg_restore = pg_restore
            props.listing = listing
            props.copy_id = reader.copy.pk
            return props
        except (dbprops.TocUnreadable, StorageError) as e:
            # A corrupt copy or a location failing mid-stream: the restore itself will meet
            # it again, mark it and say so; here the next copy is tried.
            tried.append(reader.copy)
            why.append(f"{reader.copy.location.name}: {e}")
        finally:
            reader.close()


def converted_by(server):
    """Text in an encoding Python has no codec for (EUC_TW, MULE_INTERNAL), read by `server`'s own
    conversion to UTF-8 (sqlscript.script_text): the dump's database entries of such a database
    were not read, and its copy was made UTF8 with the target's locale, owner and no comment."""

    def convert(data, encoding):
        try:
            with targetdb.writable(server) as conn:
                utf8 = conn.execute("SELECT pg_catalog.convert(%s, %s, 'UTF8')", [data, encoding]).fetchone()[0]
        except psycopg.Error as e:
            raise NotText(
                f"it is in {encoding}, which {server} could not convert to UTF-8 ({explain(e, server)})"
            ) from None
        return bytes(utf8).decode()

    return convert


def _create_statements(props, dbname, elsewhere, tablespace_map, warnings):
    """CREATE DATABASE as the dump's DATABASE entry says (encoding, locale, template0), in the
    dump's tablespace on its own server, a mapped one, or else the target's default; then what
    its ACL revokes from PUBLIC (a REVOKE CONNECT): from its first moment, not after the load,
    the copy of production is closed to every login role that production is closed to. The
    whole ACL is re-issued after the load, in the dump's order (_apply_properties): grants
    there too, as they need the dump's owner (still the portal's role here) in place."""
    if props is None:
        return None
    old = props.tablespace
    tablespace = tablespace_map.get(old, None if elsewhere or tablespace_map else old) if old else None
    if old and tablespace is None:
        warnings.append(f"the database's tablespace {old} is not used here: it is in the default tablespace")
    revokes = [
        sql.SQL("REVOKE {} ON DATABASE {} FROM PUBLIC").format(sql.SQL(m["privs"]), sql.Identifier(dbname))
        for form, m in props.actions  # privs: ones dbprops recognised as database privileges
        if form == "privilege" and m["verb"] == "REVOKE" and m["grantee"] == "PUBLIC"
    ]
    return [props.create_statement(dbname, tablespace), *revokes]


def _apply_properties(props, target, dbname, warnings, phase=dbprops.AFTER_LOAD):
    # From inside the new database, as pg_restore --create does: a comment or a setting lands in a
    # shared catalog in the encoding of the session's database, so from a UTF8 one a LATIN1
    # database's "Département" would be stored as UTF-8 bytes and read back as "DÃ©partement".
    try:
        with targetdb.connect_to_copy(target, dbname) as conn:
            applied, missed = props.apply(conn, dbname, phase)
    except psycopg.Error as e:
        raise RestoreFailed(explain(e, target)) from None
    warnings += missed
    if phase is dbprops.BEFORE_LOAD:
        return f"owner, settings and comment of {props.source} given to {dbname} before its data ({applied} statements)"
    return f"privileges, connection limit and flags of {props.source} re-issued for {dbname} ({applied} statements)"


def _create(target, dbname, statements, props, notes, warnings):
    """CREATE DATABASE, then what the loading must see of the dump's database (dbprops.BEFORE_LOAD):
    its settings applied after the load left a materialized view refreshed, and values stored,
    under the target's defaults. Dropped again when that fails."""
    targetdb.create_database(target, dbname, statements)
    if props is None:
        return
    try:
        said = _apply_properties(props, target, dbname, warnings, dbprops.BEFORE_LOAD)
        notes += [said] if said not in notes else []  # made again for the next copy: said once
    except RestoreFailed as e:
        left = dropped(target, dbname)
        raise RestoreFailed(f"{e}; {left}" if left else str(e)) from None


def restore_globals(run, target, encryption, notes, warnings, with_role_passwords=False, about_to_make=None):
    """The roles of the source, brought safely (cluster_globals) so that the dump's owners and
    grants exist on another server. Returns the roles created, for a failed restore to drop."""
    if "imported" in run.details and "globals" not in run.details:
        # Made elsewhere by a plain pg_dump (importbackup): no globals came with it.
        warnings.append(f"run #{run.pk} was imported without its globals: its roles must exist on {target} already")
        return []
    try:
        owner = run.globals_run()  # the day's globals file, maybe another database's run's
        reader = open_first_healthy(owner, "globals")
    except StorageError as e:
        raise RestoreFailed(f"the globals of run #{run.pk} cannot be read: {e}") from None
    except BackupRun.DoesNotExist:
        owner_id = run.details["globals"]["run"]
        raise RestoreFailed(
            f"run #{run.pk} pairs with the globals of run #{owner_id}, which is no longer in the catalog: "
            "restore into this server (roles exist here) or from a run that dumped its own globals"
        ) from None
    chunks = []
    with reader:
        result = encryption.decrypt_stream(reader, lambda c: chunks.append(c) or False)
    if not result.ok:
        raise RestoreFailed(gpg_failure(result))
    try:
        script = script_text(b"".join(chunks), warnings)
    except NotText as e:
        raise RestoreFailed(f"the globals of run #{run.pk} cannot be read: {e}") from None
    try:
        with targetdb.writable(target) as conn:
            created, more_notes, more_warnings = cluster_globals.apply(
                conn, script, target, with_role_passwords, about_to_make
            )
    except cluster_globals.GlobalsRefused as e:
        raise RestoreFailed(f"restoring the globals on {target} failed: {e}") from None
    except psycopg.Error as e:
        raise RestoreFailed(f"restoring the globals on {target} failed: {explain(e, target)}") from None
    notes += more_notes
    warnings += more_warnings
    return created


def run_logical(run, target, dbname, actor, request=None, restore_test=None, **options):
    """Create the RestoreRun, restore, and record the outcome. Never raises RestoreFailed."""
    restore = RestoreRun.begin(
        RestoreRun.Kind.LOGICAL,
        actor,
        server=run.server,
        backup_run=run,
        into_server=target,
        into_database=dbname,
        request=request,
        restore_test=restore_test,
    )
    journal.record(
        "restore_started", actor=actor, obj=restore, server=run.server.name, run=run.pk, into=f"{target}/{dbname}"
    )
    try:
        check_database_name(dbname)  # typed by a DBA; the portal's own names are quoted everywhere
        with beating(restore):
            notes = restore_into(run, target, dbname, restore, **options)
    except (RestoreFailed, StorageError, BackupFailed) as e:  # BackupFailed: the tools' libpq_env refused
        return finish(restore, actor, error=str(e))
    except Exception as e:  # noqa: BLE001 - never a run left "running": it fails, saying what stopped it
        return finish(restore, actor, error=unexpected(e))
    restore.notes = "; ".join(notes)
    return finish(restore, actor)


def unexpected(error):
    """One line for an error no step foresaw (what restore_into made is dropped as for any)."""
    said = str(error).strip().splitlines()
    return f"the restore stopped on an unexpected {type(error).__name__}" + (f": {said[0]}" if said else "")


def finish(restore, actor, error=None):
    """Record the outcome of a logical restore (or a replacement), failed when `error` is a
    string, and journal it."""
    restore.finish(error, fields=("notes", "warnings", "created_roles"))
    if not (restore.succeeded or error):
        return restore  # failed meanwhile by restores.orphans, which journaled it
    journal.record(
        "restore_succeeded" if restore.succeeded else "restore_failed",
        actor=actor,
        obj=restore,
        server=restore.server.name,
        outcome="ok" if restore.succeeded else "failed",
        error=error or "",
        into=restore.into_database,
        warnings=restore.warnings,
    )
    return restore


def summary(restore):
    return {
        "id": restore.pk,
        "status": restore.status,
        "duration_s": round(restore.duration_s, 3) if restore.duration_s is not None else None,
        "backup_run": restore.backup_run_id,
        "into_server": restore.into_server.name if restore.into_server else None,
        "into_database": restore.into_database,
        "notes": restore.notes,
        "warnings": restore.warnings,
        "error": restore.error,
    }
