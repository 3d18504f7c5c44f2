"""Bringing a portal back from its selfbackup: `manage.py restoreportal FILE` on a new host.

The file is checked against the `.sha256` beside it (when it was fetched with it), decrypted
with the passphrase (or the private key of GPG_RECIPIENTS), and put back as the portal's
database: SQLite into a file beside the database, renamed into place once it is whole and
passes `PRAGMA integrity_check`; PostgreSQL by `pg_restore --single-transaction` into the
(empty) database DATABASE_URL names. A database that already holds tables is never touched.

The restored journal is checked to open with the JOURNAL_KEY_FILE at hand (the keys are never
in the selfbackup), then a "portal_restored" entry says where it ends: verifyjournal holds the
anchors past that end as entries lost with the host, until a person acknowledges them
(backupportal/journal_loss.py). Then the migrations of this code are applied.
"""

import hashlib
import json
import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from backupportal import journal, journal_loss
from backupportal.lib.childenv import child_env
from backupportal.models import JournalEntry
from backups.binaries import client_tool, conninfo_dbname
from backups.crypto import Encryption, EncryptionError, die_with_parent, gpg_failure
from backups.selfbackup import portal_db
from backups.storage import private_dirs

SQLITE_MAGIC = b"SQLite format 3\x00"
DUMP_MAGIC = b"PGDMP"
CHUNK = 1024 * 1024


class RestoreRefused(Exception):
    """One line: what is wrong with the file or the target, and what to do."""


def restore(path, actor):
    """Restore the selfbackup at `path` as this portal's database. Returns a summary dict."""
    path = Path(path)
    if not path.is_file():
        raise RestoreRefused(f"{path} is not a file: give the selfbackup fetched from a storage location")
    sha256, checked = check_sha256(path)
    check_journal_key(path)
    try:
        encryption = Encryption()
    except EncryptionError as e:
        raise RestoreRefused(str(e)) from None
    if connection.vendor == "sqlite":
        _into_sqlite(path, encryption)
    else:
        _into_postgres(path, encryption)
    connection.close()  # the next query opens the restored database
    newest = JournalEntry.objects.order_by("-id").first()
    if newest is not None and journal.compute_hmac(newest) != newest.hmac:
        raise RestoreRefused(
            f"the restored journal does not open with {settings.JOURNAL_KEY_FILE} (JOURNAL_KEY_FILE): "
            "put the old portal's journal key there (it is never in the selfbackup), then run verifyjournal"
            " (fetch the selfbackup's .json with it next time: restoreportal then checks the key first)"
        )
    moved = _set_old_head_aside()
    count = JournalEntry.objects.count()
    entry = journal.record(
        "portal_restored",  # journal_loss.RESTORED: written out for the test that reads every action
        actor=actor,
        outcome="info",
        restored_up_to=newest.pk if newest else 0,
        entries=count,
        file=path.name,
        sha256=sha256,
        sha256_checked=checked,
        old_head_moved_to=moved,
    )
    call_command("migrate", interactive=False, verbosity=0)
    return {
        "status": "restored",
        "engine": connection.vendor,
        "file": str(path),
        "sha256": sha256,
        "sha256_checked": checked,
        "restored_up_to": newest.pk if newest else 0,
        "entries": count,
        "entry": entry.pk,
    }


def check_sha256(path):
    """(sha256 of the file, True when the `.sha256` beside it agrees); refused when it disagrees."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    actual = digest.hexdigest()
    beside = path.with_name(path.name + ".sha256")
    if not beside.is_file():
        return actual, False
    expected = beside.read_text().split()[0] if beside.read_text().split() else ""
    if expected != actual:
        raise RestoreRefused(
            f"{path.name} has sha256 {actual}, but {beside.name} says {expected}: the file is damaged or "
            "incomplete; fetch it again (or another day's) from a storage location"
        )
    return actual, True


def check_journal_key(path):
    """The `.json` beside the file (when fetched with it) says which journal key signs its journal."""
    beside = path.with_name(path.name + ".json")
    if not beside.is_file():
        return
    try:
        expected = json.loads(beside.read_text()).get("journal_key_check", "")
    except (ValueError, AttributeError):
        raise RestoreRefused(
            f"{beside.name} is not the JSON a selfbackup writes: fetch it again, or leave it out"
        ) from None
    if expected and expected != journal_loss.key_check():
        raise RestoreRefused(_WRONG_KEY)


_WRONG_KEY = (
    "the selfbackup's journal was not signed with the key in JOURNAL_KEY_FILE: put the old portal's journal "
    "key there (it is never in the selfbackup), then run restoreportal again"
)


class _Sink:
    """python-gnupg's on_data: plaintext into a file or pg_restore's stdin, a closed pipe remembered."""

    def __init__(self, out):
        self.out, self.head, self.broken = out, b"", False

    def __call__(self, chunk):
        if chunk and not self.broken:
            if len(self.head) < 16:
                self.head += chunk[:16]
            try:
                self.out.write(chunk)
            except OSError:
                self.broken = True
        return False


def _decrypt(path, encryption, out):
    sink = _Sink(out)
    with open(path, "rb") as source:
        result = encryption.decrypt_stream(source, sink)
    if not result.ok and not sink.broken:
        raise RestoreRefused(f"{path.name}: {gpg_failure(result)}")
    return sink


def _into_sqlite(path, encryption):
    target = Path(connection.settings_dict["NAME"])
    if target.exists() and _sqlite_tables(target):
        raise RestoreRefused(
            f"the portal's database {target} already holds tables: restore into a new portal (move {target} "
            "away, or point DATABASE_URL at a new file), never over one in use"
        )
    private_dirs(target.parent)
    fd, scratch = tempfile.mkstemp(prefix=".restoreportal-", suffix=".sqlite3", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _decrypt(path, encryption, out)
            out.flush()
            os.fsync(out.fileno())
        if sink.head.startswith(DUMP_MAGIC):
            raise RestoreRefused(
                f"{path.name} is the backup of a PostgreSQL portal database: restore it with DATABASE_URL=postgres://... "
                "naming a new, empty database"
            )
        if not sink.head.startswith(SQLITE_MAGIC):
            raise RestoreRefused(f"{path.name} decrypts to something that is not a portal selfbackup")
        _check_sqlite(Path(scratch))
        connection.close()
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)


def _sqlite_tables(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]


def _check_sqlite(path):
    with sqlite3.connect(path) as db:
        verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if verdict != "ok":
        raise RestoreRefused(f"the restored SQLite database fails its integrity check: {verdict}")
    if JournalEntry._meta.db_table not in tables:
        raise RestoreRefused("the file is an SQLite database but not a portal's (it has no journal)")


def _into_postgres(path, encryption):
    if connection.introspection.table_names():
        name = connection.settings_dict["NAME"]
        raise RestoreRefused(
            f"the portal's database {name} already holds tables: create a new, empty database "
            "(createdb), point DATABASE_URL at it and run restoreportal again (before any migrate)"
        )
    server, env = portal_db()
    argv = [str(client_tool(server, "pg_restore")), "--no-owner", "--no-privileges", "--exit-on-error"]
    # The name as a connection string of its own: pg_restore reads a bare name with '=' as one.
    argv += ["--single-transaction", "--no-password", f"--dbname={conninfo_dbname(env['PGDATABASE'])}"]
    with tempfile.TemporaryFile() as said:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=said, env=child_env(env),
            preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            sink = _decrypt(path, encryption, proc.stdin)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()
        said.seek(0)
        lines = [line for line in said.read().decode(errors="replace").splitlines() if line.strip()]
    if sink.head.startswith(SQLITE_MAGIC):
        raise RestoreRefused(
            f"{path.name} is the backup of an SQLite portal database: restore it with DATABASE_URL=sqlite:///PATH"
        )
    if proc.returncode != 0:
        raise RestoreRefused(f"pg_restore failed: {lines[-1] if lines else 'exit ' + str(proc.returncode)}")


def _set_old_head_aside():
    """The old host's head file (when VAR_DIR survived) names entries that were lost: kept aside,
    never chained onto. The anchors in the locations keep what it said."""
    head = Path(settings.JOURNAL_HEAD_FILE)
    if not head.exists():
        return ""
    aside = head.with_name(f"{head.name}.before-restore-{timezone.now():%Y%m%dT%H%M%S}")
    os.replace(head, aside)
    return str(aside)
