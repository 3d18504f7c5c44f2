"""Bringing a portal back from its selfbackup: `manage.py restoreportal FILE` on a new host.

Only a selfbackup the portal signed is restored. The file's encryption proves nothing: anyone
with the recipients' public key (public by design) or the passphrase can encrypt a database of
their own, with a superuser of theirs and an empty journal. So the `.json` beside the file must
be the envelope selfbackup signs with the portal's signing key (backups.selfbackup._sidecars),
verified with the public half the operator keeps (SIGNING_KEY_DIR/signing-public.asc, or
--public-key): it names the file, its sha256, and the journal's newest entry, count and HMAC.
The file must hash to that sha256 (and to the `.sha256` beside it, when fetched with it).

It is decrypted with the keyring's key the `.json` names, the configured key, or any other key
of KEYRING_DIR (a selfbackup from before a rotation), and put back as the portal's database:
SQLite into a file beside the database, renamed into place once it is whole, passes `PRAGMA
integrity_check` and its journal checks; PostgreSQL by `pg_restore --single-transaction` into
the (empty) database DATABASE_URL names, taken out again when its journal fails the check. A
database that already holds tables is never touched. The journal check: not empty, every entry
chained and signed with the JOURNAL_KEY_FILE at hand (the keys are never in the selfbackup),
ending at the entry, count and HMAC the `.json` signed.

Then a "portal_restored" entry says where it ends: verifyjournal holds the anchors past that end
as entries lost with the host, until a person acknowledges them (backupportal/journal_loss.py).
Then the migrations of this code are applied.
"""

import hashlib
import hmac
import os
import sqlite3
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.utils import timezone

from backupportal import journal, journal_loss
from backupportal.lib import signing
from backupportal.lib.childenv import child_env
from backupportal.models import JournalEntry
from backups import manifests
from backups.binaries import client_tool, conninfo_dbname
from backups.crypto import (
    Encryption,
    EncryptionError,
    die_with_parent,
    expecting_bad_passphrase,
    gpg_failure,
    keyring_dir,
)
from backups.selfbackup import portal_db
from backups.storage import private_dirs

SQLITE_MAGIC = b"SQLite format 3\x00"
DUMP_MAGIC = b"PGDMP"
CHUNK = 1024 * 1024


class RestoreRefused(Exception):
    """One line: what is wrong with the file or the target, and what to do."""


def restore(path, actor, public_keys=None):
    """Restore the selfbackup at `path` as this portal's database. Returns a summary dict.
    `public_keys`: paths of the portal's signing-public.asc (default SIGNING_KEY_DIR's)."""
    path = Path(path)
    if not path.is_file():
        raise RestoreRefused(f"{path} is not a file: give the selfbackup fetched from a storage location")
    sha256, checked = check_sha256(path)
    about = signed_about(path, sha256, public_key_text(public_keys))
    keys = candidate_keys(about)
    check_head_writable()
    if connection.vendor == "sqlite":
        _into_sqlite(path, keys, about)
    else:
        _into_postgres(path, keys, about)
    connection.close()  # the next query opens the restored database
    old_head = journal_loss.lost_head(journal.read_head(), about["journal_entry"])
    moved = _set_old_head_aside()
    count = JournalEntry.objects.count()
    entry = journal.record(
        "portal_restored",  # journal_loss.RESTORED: written out for the test that reads every action
        actor=actor,
        outcome="info",
        restored_up_to=about["journal_entry"],
        entries=count,
        file=path.name,
        sha256=sha256,
        sha256_checked=checked,
        signature_verified=True,
        taken_at=about.get("taken_at", ""),
        old_head_moved_to=moved,
        old_head=old_head,  # verifyjournal names what it knew past the end with the anchors
        old_anchors=journal_loss.old_anchors(about["journal_entry"]),  # only these are set aside later
    )
    call_command("migrate", interactive=False, verbosity=0)
    return {
        "status": "restored",
        "engine": connection.vendor,
        "file": str(path),
        "sha256": sha256,
        "sha256_checked": checked,
        "signature_verified": True,
        "taken_at": about.get("taken_at", ""),
        "restored_up_to": about["journal_entry"],
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


def public_key_text(paths=None):
    """The armored public signing keys at `paths` (default SIGNING_KEY_DIR/signing-public.asc),
    one after the other: a selfbackup signed by any of them verifies."""
    texts = []
    for path in [Path(p) for p in paths or [signing.public_key_path()]]:
        if not path.is_file():
            raise RestoreRefused(
                f"no public signing key at {path}: give --public-key FILE (the signing-public.asc kept with the "
                "restore keys) or put SIGNING_KEY_DIR back; without it no selfbackup can be trusted"
            )
        text = path.read_text(errors="replace")
        if "BEGIN PGP PUBLIC KEY BLOCK" not in text:
            raise RestoreRefused(f"{path} is not an armored OpenPGP public key: give the portal's signing-public.asc")
        texts.append(text)
    return "\n".join(texts)


def signed_about(path, sha256, public_key):
    """What the signed `.json` beside the file says of it, once its signature verifies with
    `public_key` and it names this file, its sha256 and a journal that is not empty."""
    beside = path.with_name(path.name + ".json")
    if not beside.is_file():
        raise RestoreRefused(
            f"no {beside.name} beside {path.name}: fetch it from the same location; only a selfbackup whose "
            "signed .json verifies with the portal's public signing key is restored"
        )
    try:
        about = manifests.verified(beside.read_bytes(), "selfbackup", public_key, beside.name)
    except manifests.ManifestRefused as e:
        raise RestoreRefused(
            f"{e}: restore a selfbackup this portal signed (not one forged or altered, nor one taken before "
            "selfbackups were signed)"
        ) from None
    if about.get("file") != path.name:
        raise RestoreRefused(
            f"{beside.name} was signed for {about.get('file')}, not {path.name}: give the file under the name "
            "it was taken with (an older selfbackup renamed is not the newest)"
        )
    if about.get("sha256") != sha256:
        raise RestoreRefused(
            f"{path.name} has sha256 {sha256}, but its signed {beside.name} says {about.get('sha256')}: the file "
            "is damaged, incomplete or replaced; fetch it again (or another day's) from a storage location"
        )
    if about.get("journal_key_check") != journal_loss.key_check():
        raise RestoreRefused(_WRONG_KEY)
    if not about.get("journal_entry") or not about.get("journal_count"):
        raise RestoreRefused(f"{beside.name} says the selfbackup's journal is empty: a portal's never is; refused")
    return about


def candidate_keys(about):
    """The keys to decrypt with, in order: the keyring's key the signed `.json` names, the
    configured one (BACKUP_PASSPHRASE_FILE or GPG_RECIPIENTS), then every other key of KEYRING_DIR
    (copied from the key escrow: a selfbackup from before a rotation opens with its own key)."""
    held = sorted({p.stem for p in keyring_dir().iterdir() if p.suffix in (".passphrase", ".recipients")})
    named = about.get("encryption_key") or ""
    keys, unusable = [], ""
    for key_id in ([named] if named in held else []) + ["configured"] + [k for k in held if k != named]:
        try:
            keys.append(Encryption() if key_id == "configured" else Encryption.of_key(key_id))
        except EncryptionError as e:
            unusable = unusable or str(e)
    if not keys:
        raise RestoreRefused(
            f"no key to decrypt with ({unusable}): set BACKUP_PASSPHRASE_FILE (or GPG_RECIPIENTS, the private key in "
            f"GNUPGHOME), or put the keyring back in {keyring_dir()} (KEYRING_DIR) from the key escrow"
        )
    return keys


_WRONG_KEY = (
    "the selfbackup's journal was not signed with the key in JOURNAL_KEY_FILE: put the old portal's journal "
    "key there (it is never in the selfbackup), then run restoreportal again"
)


def check_journal(about, using=DEFAULT_DB_ALIAS):
    """The restored journal (in database `using`) must be the one the signed `.json` names: every
    entry chained to the one before and signed with JOURNAL_KEY_FILE, ending at the entry, count
    and HMAC it names. Anything else is refused before the portal uses it."""
    fields = [*journal.SIGNED_FIELDS, "hmac"]
    key = journal._read_key()
    prev, count, last = journal.GENESIS, 0, None
    rows = JournalEntry.objects.using(using).order_by("id").values_list(*fields)
    for values in rows.iterator(chunk_size=5000):
        row = SimpleNamespace(**dict(zip(fields, values, strict=True)))
        if row.prev_hmac != prev:
            raise RestoreRefused(
                f"the restored journal is broken at entry #{row.id}: it does not follow the one before"
            )
        if not hmac.compare_digest(row.hmac, journal.compute_hmac(row, key)):
            raise RestoreRefused(
                f"the restored journal does not open with {settings.JOURNAL_KEY_FILE} (JOURNAL_KEY_FILE): entry "
                f"#{row.id}'s HMAC does not match; put the old portal's journal key there (it is never in the selfbackup)"
            )
        prev, count, last = row.hmac, count + 1, row
    found = (last.id, count, last.hmac) if last else (None, 0, "")
    if found != (about["journal_entry"], about["journal_count"], about.get("journal_hmac")):
        raise RestoreRefused(
            f"the restored journal ends at #{found[0]} with {found[1]} entries, but the signed .json says "
            f"#{about['journal_entry']} with {about['journal_count']}: not the database that was signed; refused"
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


def _decrypt(path, keys, out):
    """The plaintext into `out` with the first of `keys` that opens the file. A wrong key makes
    gpg stop before its first byte of output, so the next one starts `out` afresh."""
    failures = []
    for encryption in keys:
        sink = _Sink(out)
        # A key that does not open it is expected here: gpg's warning stays off stderr, where the
        # refusal (or the summary) is the one line the operator reads; the result still says so.
        with open(path, "rb") as source, expecting_bad_passphrase():
            result = encryption.decrypt_stream(source, sink)
        if result.ok or sink.broken:
            return sink
        if sink.head:  # it opened, then failed: damaged, not the wrong key
            raise RestoreRefused(f"{path.name}: {gpg_failure(result)}")
        failures.append(f"{encryption.custody_key or 'the configured key'}: {gpg_failure(result)}")
    raise RestoreRefused(f"{path.name} opens with none of the {len(keys)} key(s) tried ({'; '.join(failures)})")


def _into_sqlite(path, keys, about):
    target = Path(connection.settings_dict["NAME"])
    if target.exists() and _sqlite_tables(target):
        raise RestoreRefused(
            f"the portal's database {target} already holds tables: restore into a new portal (move {target} "
            "away, or point DATABASE_URL at a new file), never over one in use"
        )
    _refuse_leftover_journal(target)
    private_dirs(target.parent)
    fd, scratch = tempfile.mkstemp(prefix=".restoreportal-", suffix=".sqlite3", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _decrypt(path, keys, out)
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
        with _opened(Path(scratch)) as using:
            check_journal(about, using)
        connection.close()
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)


def _sqlite_tables(path):
    """How many tables the target holds; refused when it cannot be read as SQLite (junk bytes,
    another program's file, unreadable): never replaced, it may be something else's."""
    try:
        db = sqlite3.connect(path)
        try:
            return db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as e:
        raise RestoreRefused(
            f"the portal's database {path} is not an SQLite database it can read ({e}): move it away, or point "
            "DATABASE_URL at a new file, and run restoreportal again"
        ) from None


def _refuse_leftover_journal(target):
    """A rollback journal or WAL left beside the target by the database that was there (a crash
    mid-transaction, then the file moved away without it) would be rolled back into the restored
    file at its first open, corrupting it: it goes with its own database, never with ours."""
    for leftover in (target.with_name(f"{target.name}-journal"), target.with_name(f"{target.name}-wal")):
        if leftover.exists():
            raise RestoreRefused(
                f"{leftover} lies beside the portal's database: it belongs to the database that was there and "
                "SQLite would replay it into the restored one; move it away with that database, then run "
                "restoreportal again"
            )


@contextmanager
def _opened(path):
    """The SQLite file at `path` as a database alias of its own, to read with the models."""
    alias = "restoreportal_scratch"
    connections.settings[alias] = {**connection.settings_dict, "NAME": str(path)}
    try:
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]


def _check_sqlite(path):
    with sqlite3.connect(path) as db:
        verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if verdict != "ok":
        raise RestoreRefused(f"the restored SQLite database fails its integrity check: {verdict}")
    if JournalEntry._meta.db_table not in tables:
        raise RestoreRefused("the file is an SQLite database but not a portal's (it has no journal)")


def _into_postgres(path, keys, about):
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
            sink = _decrypt(path, keys, proc.stdin)
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
    try:
        check_journal(about)
    except RestoreRefused:
        _empty_postgres()
        raise


def _empty_postgres():
    """Take out what pg_restore put into the database (empty before it): a refused restore leaves
    nothing for the next try, or a migrate, to build on."""
    with connection.cursor() as cur:
        for table in connection.introspection.table_names(cur):
            cur.execute(f"DROP TABLE IF EXISTS {connection.ops.quote_name(table)} CASCADE")
        cur.execute("DROP FUNCTION IF EXISTS backupportal_journal_append_only()")


def check_head_writable():
    """The journal's head file must be writable before anything is restored: the portal_restored
    entry writes it, and a database put in place without that entry cannot be restored again
    (it holds tables) nor verified."""
    head = Path(settings.JOURNAL_HEAD_FILE)
    try:
        head.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=head.parent, prefix=".restoreportal-"):
            pass
        if head.exists():
            head.read_bytes()
    except OSError as e:
        raise RestoreRefused(
            f"the journal's head file {head} (JOURNAL_HEAD_FILE) cannot be written ({e.strerror or e}): make its "
            "directory writable (or set JOURNAL_HEAD_FILE to one that is), then run restoreportal again"
        ) from None


def _set_old_head_aside():
    """The old host's head file (when VAR_DIR survived) names entries that were lost: kept aside,
    never chained onto. The anchors in the locations keep what it said."""
    head = Path(settings.JOURNAL_HEAD_FILE)
    if not head.exists():
        return ""
    aside = head.with_name(f"{head.name}.before-restore-{timezone.now():%Y%m%dT%H%M%S}")
    os.replace(head, aside)
    return str(aside)
