"""Backups made elsewhere, registered as runs of a server: `manage.py importbackup FILE --server NAME`.

A stock `pg_dump -Fc` file, plain or encrypted by gpg with the portal's passphrase (or to its
recipients), becomes a logical BackupRun that restores, restore-tests and copies like the
portal's own. Everything is checked before anything is stored: the server is known, the file
decrypts with the portal's key, and what it holds is a whole pg_dump custom archive (`pg_restore
--list` reads its table of contents, then pg_restore reads every data block to /dev/null: a dump
cut short by a job that died mid-write has a whole table of contents; a gpg file is decrypted to
its end each time, so gpg's integrity check runs too). A plaintext file is encrypted with the current key on its way into the
primary location: never a plaintext copy on a tier. An encrypted one is stored as it came
(it opens with the portal's key, which is what a restore needs). Then copied to every tier.
"""

import re
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils import timezone

from backupportal import journal
from backupportal.lib.childenv import child_env
from backups import archive_wal
from backups.binaries import MissingBinaries, client_tool
from backups.copies import copy_run_foreground
from backups.crypto import Encryption, EncryptionError, die_with_parent, gpg_failure, stopping_on_purpose
from backups.logical import primary_location
from backups.models import BackupCopy, BackupRun, Database, Server
from backups.pipeline import BackupFailed
from backups.storage import StorageError, store_for
from backups.streams import CHUNK, EncryptFailed, Source, WriteFailed, encrypt_into

DUMP_MAGIC = b"PGDMP"
CREATED = re.compile(r"^;\s+Archive created at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s*(\S*)", re.M)
DBNAME = re.compile(r"^;\s+dbname: (.+)$", re.M)
DUMPED_FROM = re.compile(r"^;\s+Dumped from database version: (.+)$", re.M)


class ImportRefused(Exception):
    """One line: what is wrong with the file or the arguments, and what to do. Nothing was stored."""


def import_file(path, server_name, database=None, actor="os:unknown"):
    """Check, encrypt (when plain), store and copy `path` as a logical run of the server. Returns the run."""
    path = Path(path)
    server = Server.objects.filter(name=server_name).first()
    if server is None:
        known = ", ".join(Server.objects.order_by("name").values_list("name", flat=True)) or "none yet"
        raise ImportRefused(f"unknown server {server_name!r} (registered: {known}): register it with addserver first")
    if not path.is_file():
        raise ImportRefused(f"{path} is not a file: give the pg_dump -Fc file (or its .gpg) to import")
    try:
        encryption = Encryption()
    except EncryptionError as e:
        raise ImportRefused(str(e)) from None
    encrypted = not _starts_with(path, DUMP_MAGIC)
    toc = _table_of_contents(path, server, encryption if encrypted else None)
    dbname = database or _first(DBNAME, toc)
    if not dbname:
        raise ImportRefused(f"{path.name}: its table of contents names no database: give --database DB")
    if len(dbname.encode()) > 63 or any(ord(c) < 32 for c in dbname):
        raise ImportRefused(
            f"{dbname[:70]!r} cannot be a PostgreSQL database name (at most 63 bytes, no control characters): "
            "give --database the name of the database the dump is of"
        )
    run = _store(path, server, dbname, toc, encryption, encrypted, actor)
    copies = copy_run_foreground(run)
    journal.record(
        "backup_imported",
        actor=actor,
        obj=run,
        file=path.name,
        database=dbname,
        came_encrypted=encrypted,
        size=run.size,
        sha256=run.sha256,
        copies=[{"location": c.location.name, "status": c.status} for c in copies],
    )
    return run


def _starts_with(path, magic):
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _first(pattern, text):
    found = pattern.search(text)
    return found.group(1).strip() if found else ""


# --- Checking: pg_restore reads the archive (decrypted on its way for a gpg file). ----


class _Feed:
    """gpg's plaintext into pg_restore's stdin; once pg_restore has what it reads (--list: the
    table of contents) and closes the pipe, the rest is drained, so gpg still reads (and checks)
    the file to its end."""

    def __init__(self, pipe):
        self.pipe, self.closed = pipe, False

    def __call__(self, chunk):
        if chunk and not self.closed:
            try:
                self.pipe.write(chunk)
            except OSError:
                self.closed = True
        return False


def _table_of_contents(path, server, encryption=None):
    """`pg_restore --list` of the archive, once pg_restore has read all of it: its text, or
    ImportRefused saying what the file is not."""
    toc, said, code = _pg_restore(path, server, encryption, "--list")
    if code != 0 or "Format: CUSTOM" not in toc:
        last = said.splitlines()[-1] if said else f"pg_restore --list exited {code}"
        raise ImportRefused(
            f"{path.name} is not a pg_dump custom-format archive ({last}): make it with pg_dump -Fc; nothing was imported"
        )
    _, said, code = _pg_restore(path, server, encryption, "--file=/dev/null")
    if code != 0:
        last = said.splitlines()[-1] if said else f"pg_restore exited {code}"
        raise ImportRefused(
            f"{path.name} is not a whole pg_dump archive: pg_restore could not read it to its end ({last}); "
            f"import a complete dump (was it still being written?): nothing was imported"
        )
    return toc


def _pg_restore(path, server, encryption, *args):
    """(stdout, stderr, exit code) of pg_restore over the archive, decrypted on its way for a gpg
    file; ImportRefused when gpg cannot decrypt it."""
    try:
        argv = [str(client_tool(server, "pg_restore")), *args]
    except MissingBinaries as e:
        raise ImportRefused(str(e)) from None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv + ([] if encryption else [str(path)]),
            stdin=subprocess.PIPE if encryption else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=child_env(),
            preexec_fn=die_with_parent,
        )
        result = None
        if encryption is not None:
            feed = _Feed(proc.stdin)
            try:
                # A failure is said below in one line: python-gnupg's own warning would be a second.
                with open(path, "rb") as source, stopping_on_purpose():
                    result = encryption.decrypt_stream(source, feed)
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        proc.wait()
        out.seek(0), err.seek(0)
        text, said = out.read().decode(errors="replace"), err.read().decode(errors="replace").strip()
    if result is not None and not result.ok:
        why = gpg_failure(result)
        if "no valid OpenPGP data" in (result.stderr or ""):
            why = "it is neither a pg_dump custom-format archive nor a gpg file"
        raise ImportRefused(f"{path.name}: {why}: nothing was imported")
    return text, said, proc.returncode


# --- Storing: the run, its file in the primary location, before the copies. -----------------


def _store(path, server, dbname, toc, encryption, encrypted, actor):
    location = primary_location()
    store = store_for(location)
    made = _created_at(toc)
    db = Database.objects.get_or_create(server=server, name=dbname, defaults={"protected": False})[0]
    run = BackupRun.objects.create(
        server=server,
        database=db,
        kind=BackupRun.Kind.LOGICAL,
        status=BackupRun.Status.RUNNING,
        requested_by=actor,
        created_at=made,
        started_at=made,
        details={
            "database": dbname,
            "imported": {
                "file": path.name,
                "by": actor,
                "at": timezone.now().isoformat(timespec="seconds"),
                "came_encrypted": encrypted,
                "file_sha256": archive_wal.sha256_of(path),
                "archive_created_at": _first(CREATED, toc),
                "dumped_from": _first(DUMPED_FROM, toc),
            },
        },
    )
    stamp = timezone.localtime(made).strftime("%Y%m%dT%H%M%S%z")
    run.key = f"{server.name}/logical/{stamp}-{run.pk}-imported.dump.gpg"
    try:
        size, sha256 = (_store_as_is if encrypted else _encrypt_into)(path, store, run.key, encryption)
    except BackupFailed as e:
        run.delete()
        raise ImportRefused(f"{path.name} could not be stored: {e}; nothing was imported") from None
    run.details["encryption"] = "as imported (gpg)" if encrypted else encryption.method
    run.size, run.sha256, run.bytes_done, run.status, run.finished_at = size, sha256, size, "succeeded", made
    run.notes = f"imported from {path.name} by {actor}; made elsewhere, so no row counts were recorded"
    run.save()
    BackupCopy.record_made(location, run.key, size, sha256, run=run, artifact="main")
    return run


def _encrypt_into(path, store, key, encryption):
    with open(path, "rb") as source:
        try:
            return encrypt_into(store, key, Source(source), encryption)
        except (WriteFailed, EncryptFailed, StorageError, OSError) as e:
            raise BackupFailed(str(e)) from None


def _store_as_is(path, store, key, encryption):
    try:
        with open(path, "rb") as source, store.writer(key) as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
            return out.commit()
    except (StorageError, OSError) as e:
        raise BackupFailed(str(e)) from None


def _created_at(toc):
    """When the archive was made, from its table of contents (pg_restore prints it with a zone
    abbreviation: UTC, +05, or a name it cannot be read by: then the portal's TIME_ZONE).
    The run is dated then, not now: an old dump imported today is not today's backup."""
    found = CREATED.search(toc)
    if not found:
        return timezone.now()
    moment = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")
    zone = found.group(2)
    if zone in ("UTC", "GMT"):
        return moment.replace(tzinfo=UTC)
    offset = re.fullmatch(r"([+-])(\d\d):?(\d\d)?", zone)
    if offset:
        sign = 1 if offset.group(1) == "+" else -1
        delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3) or 0))
        return moment.replace(tzinfo=dt_timezone(sign * delta))
    return moment.replace(tzinfo=ZoneInfo(settings.TIME_ZONE))
