"""The portal's own database (catalog and journal), backed up like any artifact: `manage.py selfbackup`.

What restores exactly is the engine's own copy, never a re-serialisation: the journal's HMACs
cover every field as stored, and a dump through Django's serializers could change a timestamp
or a JSON number on its way back. So:

- SQLite (the embedded default): sqlite3's online backup API, into a private file beside the
  database (the same directory and owner, already holding the same bytes in clear), streamed
  through gpg and removed at once;
- PostgreSQL: `pg_dump -Fc` of the portal's database, streamed through gpg.

Both read one consistent state, whose newest journal entry the row records: the restored journal
ends there. Encrypted with the keyring's current key (backups.keyring), like every artifact, so
that key custody counts it and reencrypt moves it. The files go to every enabled location (the
WAL archive aside), each with a `.sha256` and a signed `.json` beside it for a host that has no
catalog yet: the `.json` is an envelope {"format", "selfbackup": "<JSON text>", "signature"}
signed with the portal's signing key as the manifests are (backups.manifests), naming the file's
sha256 and the journal's newest entry, count and HMAC. restoreportal restores nothing else: the
recipients' public key can encrypt a forged portal database, never sign for it. Never in the
file: JOURNAL_KEY_FILE, SECRETS_KEY_FILE, SIGNING_KEY_DIR and the passphrase, which live outside
the database; the README says where a restored portal gets them.
"""

import hashlib
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
from backupportal.lib import signing
from backups import anchors, keyring, manifests
from backups.binaries import client_tool
from backups.crypto import EncryptionError
from backups.models import WAL_LOCATION, PortalBackup, StorageLocation
from backups.pipeline import BackupFailed, Tool, encrypt_to
from backups.storage import MissingArtifact, ObjectLocked, StorageError, store_for
from backups.streams import CHUNK, EncryptFailed, Source, WriteFailed, encrypt_into

PREFIX = "portal/"
JOURNAL_TABLE = "backupportal_journalentry"
# The journal's newest entry, its HMAC and the count, read in the same state as the dump.
JOURNAL_MARK = f"SELECT id, hmac, (SELECT count(*) FROM {JOURNAL_TABLE}) FROM {JOURNAL_TABLE} ORDER BY id DESC LIMIT 1"


def take(actor="job:selfbackup"):
    """Back the portal's database up to every location. Returns the PortalBackup row (succeeded or failed)."""
    started = timezone.now()
    row = PortalBackup(started_at=started, requested_by=actor, engine=engine(), status=PortalBackup.Status.FAILED)
    try:
        _take(row, started, actor)
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


def _take(row, started, actor):
    try:
        # The keyring's current key: a passphrase file changed by hand is refused here as for
        # any backup, and the row names the key, so that custody and reencrypt count it.
        encryption = keyring.current(actor)
    except EncryptionError as e:
        raise BackupFailed(str(e)) from None
    targets = locations()
    if not targets or targets[0].kind != StorageLocation.Kind.PRIMARY:
        raise BackupFailed("no enabled primary storage location: set BACKUP_ROOT and run migrate")
    primary = store_for(targets[0])
    row.key, row.encryption = free_key(primary, started, row.engine), encryption.method
    row.encryption_key_id = encryption.custody_key
    dump = _sqlite_into if row.engine == "sqlite" else _postgres_into
    (row.size, row.sha256), (row.journal_entry, journal_hmac, row.journal_count) = dump(primary, row.key, encryption)
    try:
        sidecars = _sidecars(row, journal_hmac)
        _write_sidecars(primary, row, sidecars)
    except (OSError, StorageError, signing.SigningError) as e:
        primary.delete(row.key)  # a file no new host could check is no backup
        raise BackupFailed(f"the .sha256 and signed .json beside the backup could not be written: {e}") from None
    row.copies = [_copy_result(targets[0], primary, row, "ok", row.sha256)]
    for location in targets[1:]:
        row.copies.append(_copy_to(location, primary, row, sidecars))


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
            mark = target.execute(JOURNAL_MARK).fetchone() or (None, "", 0)
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
        mark = conn.execute(JOURNAL_MARK).fetchone() or (None, "", 0)
        argv = [str(client_tool(server, "pg_dump")), "--format=custom", f"--snapshot={snapshot}", "--no-password"]
        return encrypt_to(store, key, Tool(argv, env), encryption, timeout=settings.BACKUP_TIMEOUT), tuple(mark)
    finally:
        conn.close()


# --- Copies: from the primary to each other location, hashed at both ends. -------------------


def _copy_result(location, store, row, status, sha256="", error=""):
    return {"location": location.name, "uri": store.uri(row.key), "sha256": sha256, "status": status, "error": error}


def _copy_to(location, primary, row, sidecars):
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
        _write_sidecars(store, row, sidecars)
    except (OSError, StorageError) as e:
        return _copy_result(location, store, row, "failed", error=str(e))
    return _copy_result(location, store, row, "ok", sha256)


SIDECARS = (".sha256", ".json")


def _sidecars(row, journal_hmac):
    """{suffix: text} of what goes beside the file, for a new host that has no catalog yet:
    `.sha256` (`sha256sum -c` reads it) and `.json`, the signed envelope restoreportal requires
    (what the file is, and the journal key's check: a wrong key is refused before anything is
    restored). Neither holds a secret. Signed once, written to every location."""
    about = {
        "format": manifests.FORMAT,
        "file": Path(row.key).name,
        "size": row.size,
        "sha256": row.sha256,
        "engine": row.engine,
        "taken_at": row.started_at.isoformat(timespec="seconds"),
        "encryption_key": row.encryption_key_id or "",
        "journal_entry": row.journal_entry,
        "journal_count": row.journal_count,
        "journal_hmac": journal_hmac,
        "journal_key_check": journal_loss.key_check(),
    }
    envelope = manifests.seal(about, field="selfbackup").decode()
    return {".sha256": f"{row.sha256}  {Path(row.key).name}\n", ".json": envelope + "\n"}


def _write_sidecars(store, row, texts):
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
        encryption_key=row.encryption_key_id or "",
        journal_entry=row.journal_entry,
        copies=[{k: c[k] for k in ("location", "status", "error")} for c in row.copies],
        error=row.error,
    )


def remove_old(actor):
    """The good selfbackups older than the newest SELFBACKUP_KEEP that can still be read: their
    files removed from every location. One whose every copy the weekly verify found bad does not
    count towards the kept ones, so the last readable backups are never the ones removed. Files
    an S3 Object Lock held at an earlier removal are tried again once the lock has expired."""
    removed = []
    expired = PortalBackup.objects.exclude(deleted_at=None).filter(locked_until__lte=timezone.now())
    for old in [*_past_the_kept(), *expired]:
        if remove(old, actor):
            removed.append(old.pk)
    return removed


def remove(row, actor, why="more than SELFBACKUP_KEEP"):
    """Remove a selfbackup's files from every location; True once the row is marked removed.

    A version S3 Object Lock still holds stays, and the row says until when (locked_until): its
    key stays in the keyring (EncryptionKey.artifacts) until a later removal takes it."""
    try:
        held = remove_files(row)
    except (OSError, StorageError):
        return False  # kept in the catalog: the next selfbackup tries again
    first = row.deleted_at is None
    row.deleted_at, row.locked_until = row.deleted_at or timezone.now(), held
    row.save(update_fields=["deleted_at", "locked_until"])
    if first or held is None:
        journal.record("selfbackup_deleted", actor=actor, obj=row, key=row.key, why=why, locked_until=held)
    return True


def remove_files(row):
    """Delete the file and its sidecars wherever a copy was written; on S3 by version, so that no
    version is left behind a delete marker. Returns the latest retain-until of the versions an
    Object Lock refused to delete, or None when everything is gone."""
    held = None
    stores = {loc.name: store_for(loc) for loc in StorageLocation.objects.all()}
    for copy in row.copies:
        if copy["location"] not in stores or copy["status"] not in KEPT_FILES:
            continue
        store = stores[copy["location"]]
        for key in [row.key] + [row.key + suffix for suffix in SIDECARS]:
            version = store.surviving_version(key)
            try:
                store.delete(key, "" if version == "null" else version)
            except ObjectLocked as e:
                held = max(held or e.retain_until, e.retain_until)
    return held


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
        "encryption_key": row.encryption_key_id or "",
        "journal_entry": row.journal_entry,
        "journal_count": row.journal_count,
        "copies": row.copies,
        "error": row.error,
        "removed": getattr(row, "removed", []),
        "duration_s": round((row.finished_at - row.started_at).total_seconds(), 3),
    }
