"""The portal's own database (catalog and journal), backed up like any artifact: `manage.py selfbackup`.

What restores exactly is the engine's own copy, never a re-serialisation: the journal's HMACs
cover every field as stored, and a dump through Django's serializers could change a timestamp
or a JSON number on its way back. So:

- SQLite (the embedded default): sqlite3's online backup API, into a private file beside the
  database (the same directory and owner, already holding the same bytes in clear), streamed
  through gpg and removed at once;
- PostgreSQL: `pg_dump -Fc` of the portal's database, streamed through gpg.

Both read one consistent state, whose newest journal entry the row records: the restored journal
ends there. The files go to every enabled location (the WAL archive aside), each with a
`.sha256` beside it for a host that has no catalog yet. Never in the file: JOURNAL_KEY_FILE,
SECRETS_KEY_FILE, SIGNING_KEY_DIR and the passphrase, which live outside the database; the
README says where a restored portal gets them.
"""

import hashlib
import json
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import psycopg
from django.conf import settings
from django.db import connection
from django.utils import timezone

from backupportal import journal, journal_loss
from backups import anchors
from backups.binaries import client_tool
from backups.crypto import Encryption, EncryptionError
from backups.models import WAL_LOCATION, PortalBackup, StorageLocation
from backups.pipeline import BackupFailed, Tool, encrypt_to
from backups.storage import MissingArtifact, StorageError, store_for
from backups.streams import CHUNK, EncryptFailed, Source, WriteFailed, encrypt_into

PREFIX = "portal/"
JOURNAL_TABLE = "backupportal_journalentry"


def take(actor="job:selfbackup"):
    """Back the portal's database up to every location. Returns the PortalBackup row (succeeded or failed)."""
    started = timezone.now()
    row = PortalBackup(started_at=started, requested_by=actor, engine=engine(), status=PortalBackup.Status.FAILED)
    try:
        _take(row, started)
        row.status = PortalBackup.Status.SUCCEEDED
    except BackupFailed as e:
        row.error = str(e)
    row.finished_at = timezone.now()
    row.save()
    _journal(row, actor)
    if row.status == PortalBackup.Status.SUCCEEDED:
        row.removed = remove_old(actor)
        anchors.anchor_after_backup()  # the journal as it stands now, beside the backup
    return row


def engine():
    return "sqlite" if connection.vendor == "sqlite" else "postgresql"


def key_for(started, engine_name, nth=1):
    # "_2" sorts after the first of that second ("." < "_"), so the newest is listed last.
    stamp = timezone.localtime(started).strftime("%Y%m%dT%H%M%S%z") + (f"_{nth}" if nth > 1 else "")
    return f"{PREFIX}selfbackup-{stamp}.{'sqlite3' if engine_name == 'sqlite' else 'dump'}.gpg"


def free_key(store, started, engine_name):
    """The name of a new selfbackup: its start to the second, then _2, _3... when one taken in the
    same second has it already; the older file must never be replaced under its own row."""
    nth = 1
    while store.exists(key := key_for(started, engine_name, nth)):
        nth += 1
    return key


def locations():
    """Every enabled location but the WAL archive, the primary first (the others copy from it)."""
    found = StorageLocation.objects.filter(enabled=True).exclude(name=WAL_LOCATION)
    return sorted(found, key=lambda loc: (StorageLocation.READ_ORDER.get(loc.kind, 9), loc.name))


def _take(row, started):
    try:
        encryption = Encryption()
    except EncryptionError as e:
        raise BackupFailed(str(e)) from None
    targets = locations()
    if not targets or targets[0].kind != StorageLocation.Kind.PRIMARY:
        raise BackupFailed("no enabled primary storage location: set BACKUP_ROOT and run migrate")
    primary = store_for(targets[0])
    row.key, row.encryption = free_key(primary, started, row.engine), encryption.method
    dump = _sqlite_into if row.engine == "sqlite" else _postgres_into
    (row.size, row.sha256), (row.journal_entry, row.journal_count) = dump(primary, row.key, encryption)
    try:
        _write_sidecars(primary, row)
    except (OSError, StorageError) as e:
        primary.delete(row.key)  # a file no new host could check is no backup
        raise BackupFailed(f"the .sha256 and .json beside the backup could not be written: {e}") from None
    row.copies = [_copy_result(targets[0], primary, row, "ok", row.sha256)]
    for location in targets[1:]:
        row.copies.append(_copy_to(location, primary, row))


# --- The dump: one consistent state of the database, through gpg into the primary. ----------


def _sqlite_into(store, key, encryption):
    with _sqlite_snapshot() as (path, mark):
        with open(path, "rb") as source:
            try:
                return encrypt_into(store, key, Source(source), encryption), mark
            except (WriteFailed, EncryptFailed, StorageError, OSError) as e:
                raise BackupFailed(f"the portal's backup could not be written: {e}") from None


@contextmanager
def _sqlite_snapshot():
    """sqlite3's backup API into a 0600 file beside the database; (path, journal mark); removed after."""
    database = Path(connection.settings_dict["NAME"])
    copy = database.with_name(f".selfbackup-{os.getpid()}.sqlite3")
    copy.unlink(missing_ok=True)
    os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        source, target = sqlite3.connect(database), sqlite3.connect(copy)
        try:
            source.backup(target)
            mark = target.execute(f"SELECT max(id), count(*) FROM {JOURNAL_TABLE}").fetchone()
        finally:
            source.close(), target.close()
        yield copy, mark
    except sqlite3.Error as e:
        raise BackupFailed(f"sqlite3 could not copy the portal's database {database}: {e}") from None
    finally:
        copy.unlink(missing_ok=True)


def portal_db():
    """The portal's PostgreSQL database as the client tools see it: a server-like object and libpq env."""
    db = connection.settings_dict
    env = {"PGHOST": db.get("HOST") or "", "PGPORT": str(db.get("PORT") or ""), "PGUSER": db.get("USER") or ""}
    env = {k: v for k, v in env.items() if v} | {"PGDATABASE": db["NAME"]}
    if db.get("PASSWORD"):
        env["PGPASSWORD"] = db["PASSWORD"]  # the child's environment, never argv
    connection.ensure_connection()
    server = SimpleNamespace(name="the portal's database", pg_version=connection.pg_version, pg_bin="")
    return server, env


def _postgres_into(store, key, encryption):
    """pg_dump -Fc from a snapshot whose newest journal entry is read in the same transaction."""
    server, env = portal_db()
    conninfo = {"host": env.get("PGHOST"), "port": env.get("PGPORT"), "user": env.get("PGUSER")}
    conninfo = {k: v for k, v in conninfo.items() if v} | {"dbname": env["PGDATABASE"]}
    try:
        conn = psycopg.connect(**conninfo, password=env.get("PGPASSWORD"), autocommit=False)
    except psycopg.Error as e:
        raise BackupFailed(f"cannot connect to the portal's database: {str(e).strip().splitlines()[0]}") from None
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        mark = conn.execute(f"SELECT max(id), count(*) FROM {JOURNAL_TABLE}").fetchone()
        argv = [str(client_tool(server, "pg_dump")), "--format=custom", f"--snapshot={snapshot}", "--no-password"]
        return encrypt_to(store, key, Tool(argv, env), encryption, timeout=settings.BACKUP_TIMEOUT), tuple(mark)
    finally:
        conn.close()


# --- Copies: from the primary to each other location, hashed at both ends. -------------------


def _copy_result(location, store, row, status, sha256="", error=""):
    return {"location": location.name, "uri": store.uri(row.key), "sha256": sha256, "status": status, "error": error}


def _copy_to(location, primary, row):
    """One copy; a location that fails is reported on the row and never fails the backup."""
    store = store_for(location)
    try:
        with primary.open(row.key) as source, store.writer(row.key) as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
            size, sha256 = out.commit()
        if sha256 != row.sha256:
            store.delete(row.key)
            raise StorageError(f"the copy's sha256 {sha256} is not the primary's {row.sha256}: removed")
        _write_sidecars(store, row)
    except (OSError, StorageError) as e:
        return _copy_result(location, store, row, "failed", error=str(e))
    return _copy_result(location, store, row, "ok", sha256)


SIDECARS = (".sha256", ".json")


def _write_sidecars(store, row):
    """Beside the file, for a new host that has no catalog yet: `.sha256` (`sha256sum -c` reads it)
    and `.json` (what it holds, and the journal key's check: restoreportal refuses a wrong key
    before it restores anything). Neither holds a secret."""
    about = {
        "file": Path(row.key).name,
        "sha256": row.sha256,
        "engine": row.engine,
        "taken_at": row.started_at.isoformat(timespec="seconds"),
        "journal_entry": row.journal_entry,
        "journal_count": row.journal_count,
        "journal_key_check": journal_loss.key_check(),
    }
    texts = {".sha256": f"{row.sha256}  {Path(row.key).name}\n", ".json": json.dumps(about, indent=1) + "\n"}
    for suffix in SIDECARS:
        with store.writer(row.key + suffix) as out:
            out.write(texts[suffix].encode())
            out.commit()


# --- The journal, and keeping SELFBACKUP_KEEP of them. --------------------------------------


def _journal(row, actor):
    ok = row.status == PortalBackup.Status.SUCCEEDED
    journal.record(
        "selfbackup_succeeded" if ok else "selfbackup_failed",
        actor=actor,
        obj=row,
        outcome="ok" if ok else "failed",
        key=row.key,
        size=row.size,
        sha256=row.sha256,
        journal_entry=row.journal_entry,
        copies=[{k: c[k] for k in ("location", "status", "error")} for c in row.copies],
        error=row.error,
    )


def remove_old(actor):
    """The good selfbackups older than the newest SELFBACKUP_KEEP that can still be read: their
    files removed from every location. One whose every copy the weekly verify found bad does not
    count towards the kept ones, so the last readable backups are never the ones removed."""
    removed, stores = [], {loc.name: store_for(loc) for loc in StorageLocation.objects.all()}
    for old in _past_the_kept():
        try:
            for copy in old.copies:
                if copy["location"] in stores and copy["status"] in KEPT_FILES:
                    for key in [old.key] + [old.key + suffix for suffix in SIDECARS]:
                        stores[copy["location"]].delete(key)
        except (OSError, StorageError):
            continue  # kept in the catalog: the next selfbackup tries again
        old.deleted_at = timezone.now()
        old.save(update_fields=["deleted_at"])
        journal.record("selfbackup_deleted", actor=actor, obj=old, key=old.key)
        removed.append(old.pk)
    return removed


def _past_the_kept():
    readable = 0
    for row in PortalBackup.objects.good().order_by("-finished_at", "-pk"):
        if readable >= settings.SELFBACKUP_KEEP:
            yield row
        readable += bool(row.good_copies)


# --- The weekly verify reads the portal's own backups too (backups/verify.py). --------------

# A copy's status on the row: "ok" and "bad" ones have a file (a bad one may have been put
# right); a "failed" copy was never written.
KEPT_FILES = ("ok", "bad")


def kept_copies():
    """[(row, copy)] for every copy with a file of every kept selfbackup: what verify reads."""
    rows = PortalBackup.objects.good().order_by("pk")
    return [(row, copy) for row in rows for copy in row.copies if copy.get("status") in KEPT_FILES]


def verify_copy(row, copy, actor="job:verify", progress=None):
    """Re-read one copy of a selfbackup and compare its sha256 with the row's; the copy's status
    on the row follows. Returns (verdict, error) as verify.verify_copy: "ok", "bad", or
    "unreachable" (not checked, never condemned); None when the daily selfbackup removed the
    backup's files since the verify listed it (a weekly verify reads for hours)."""
    row, copy = _still_kept(row, copy)
    if row is None:
        return None
    location = StorageLocation.objects.filter(name=copy["location"]).first()
    if location is None:
        return "unreachable", f"location {copy['location']} is no longer configured: not checked"
    digest = hashlib.sha256()
    try:
        with store_for(location).open(row.key) as reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                if progress:
                    progress.read(len(chunk))
    except MissingArtifact as e:
        if _still_kept(row, copy)[0] is None:
            return None  # removed while it was read
        error = str(e)
    except (OSError, StorageError) as e:
        return "unreachable", str(e)
    else:
        found = digest.hexdigest()
        error = "" if found == row.sha256 else f"{row.key} in {location.name} hashes to {found}, not {row.sha256}"
    was, verdict = copy["status"], "bad" if error else "ok"
    copy.update(status=verdict, error=error, verified_at=timezone.now().isoformat(timespec="seconds"))
    row.save(update_fields=["copies"])
    if verdict != was:
        journal.record(
            "selfbackup_copy_bad" if error else "selfbackup_copy_good_again",
            actor=actor,
            obj=row,
            outcome="failed" if error else "ok",
            location=location.name,
            key=row.key,
            error=error,
        )
    return verdict, error


def _still_kept(row, copy):
    """(row, copy) as the catalog holds them now, or (None, None) once the backup is removed."""
    row = PortalBackup.objects.filter(pk=row.pk, deleted_at=None).first()
    now = next((c for c in row.copies if c["location"] == copy["location"]), None) if row else None
    if now is None or now.get("status") not in KEPT_FILES:
        return None, None
    return row, now


def as_dict(row):
    return {
        "id": row.pk,
        "status": row.status,
        "engine": row.engine,
        "key": row.key,
        "size": row.size,
        "sha256": row.sha256,
        "encryption": row.encryption,
        "journal_entry": row.journal_entry,
        "journal_count": row.journal_count,
        "copies": row.copies,
        "error": row.error,
        "removed": getattr(row, "removed", []),
        "duration_s": round((row.finished_at - row.started_at).total_seconds(), 3),
    }
