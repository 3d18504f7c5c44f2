"""The operations journal: append-only, HMAC-chained, checked by `manage.py verifyjournal`.

Each entry's HMAC covers its content and the previous entry's HMAC, keyed by a key kept
outside the database (JOURNAL_KEY_FILE): someone who edits rows and recomputes plain hashes
is still caught. The newest entry's id and HMAC are also written outside the database
(JOURNAL_HEAD_FILE), so that cutting entries off the end is caught too, even after new
entries were appended (they chain onto the head file's entry, not onto the cut-down table).
"""

import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
from collections import namedtuple
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from backupportal.lib.redact import redact

GENESIS = "0" * 64
# Serialises appends on PostgreSQL so that two workers never chain onto the same entry.
_PG_LOCK_ID = 0x6A6F75726E616C  # "journal"

# The fields the HMAC covers, in the order verify() reads them from the table.
SIGNED_FIELDS = [
    "id",
    "at",
    "actor",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "server",
    "outcome",
    "details",
    "prev_hmac",
]

# What the portal writes, for the auditor's action filter (a hint: any action can be searched).
ACTIONS = {
    "login": "a user logged in",
    "login_failed": "a login was refused",
    "logout": "a user logged out",
    "server_added": "a server was registered",
    "server_changed": "a server's settings were changed",
    "location_added": "a storage location was added",
    "location_changed": "a storage location was changed",
    "schedule_changed": "a backup schedule was changed",
    "admin_added": "an object was added in the admin",
    "admin_changed": "an object was changed in the admin",
    "admin_deleted": "an object was deleted in the admin",
    "backup_started": "a backup started",
    "backup_succeeded": "a backup succeeded",
    "backup_failed": "a backup failed",
    "backup_deleted": "retention deleted a backup",
    "copy_made": "a copy reached a storage tier",
    "copy_failed": "a copy to a storage tier failed",
    "copy_bad": "a copy was missing or failed its sha256 check",
    "copy_good_again": "a bad copy verified good again",
    "copy_fallback": "a read skipped a bad or unreachable copy",
    "copy_deleted": "retention deleted a copy",
    "copy_delete_failed": "a location refused to delete a copy (retried)",
    "wal_deleted": "retention deleted a WAL segment",
    "verify": "a run's copies were verified",
    "verify_all": "every copy was verified",
    "verify_requested": "a DBA asked for a run's copies to be verified",
    "restore_requested": "a restore was requested",
    "restore_approved": "a restore request was approved",
    "restore_rejected": "a restore request was rejected",
    "restore_approval_refused": "an approval was refused (one's own request, or no right)",
    "restore_started": "a restore started",
    "restore_succeeded": "a restore succeeded",
    "restore_failed": "a restore failed",
    "sandbox_removed": "a restore request's sandbox cluster was stopped and removed",
    "restore_test_requested": "a DBA asked for a restore test",
    "restore_test_started": "a restore test started",
    "restore_test_passed": "a restore test passed",
    "restore_test_failed": "a restore test failed",
    "alert_opened": "an alert was raised",
    "alert_acknowledged": "an alert was acknowledged",
    "alert_resolved": "an alert was resolved",
    "drill_logged": "a DR drill was logged",
    "drill_changed": "a DR drill was changed",
    "drill_step_recorded": "a DR drill step was recorded",
    "maintenance_scheduled": "a maintenance task was put on the calendar",
    "maintenance_completed": "a maintenance task was completed",
    "journal_exported": "an auditor exported the journal as CSV",
}

# An object the entry is about when only its name is at hand (say, after it was deleted).
Ref = namedtuple("Ref", "label pk text")


def _read_key() -> bytes:
    path = Path(settings.JOURNAL_KEY_FILE)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def canonical(entry) -> bytes:
    """The bytes the HMAC covers: every field but the HMAC itself, in a fixed form."""
    body = {name: getattr(entry, name) for name in SIGNED_FIELDS}
    body["at"] = entry.at.isoformat(timespec="microseconds")
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def compute_hmac(entry, key=None) -> str:
    return hmac.new(key or _read_key(), canonical(entry), hashlib.sha256).hexdigest()


def _clean_text(value: str) -> str:
    # PostgreSQL refuses NUL in text and jsonb; a failed login's user name may carry one.
    return redact(value).replace("\x00", "")


def _scrub(value):
    """Details never carry a secret; and they must read back from jsonb exactly as signed."""
    if isinstance(value, dict):
        return {
            _clean_text(str(k)): (
                "***" if any(w in str(k).lower() for w in ("password", "passphrase", "secret")) else _scrub(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        # jsonb prints 1e20 as 100000000000000000000, which reads back as an int: sign an int.
        if not math.isfinite(value):
            return str(value)
        return int(value) if value.is_integer() else value
    return _clean_text(str(value))


def _describe(obj, server):
    """(object_type, object_id, object_repr, server name) of what an entry is about."""
    if obj is None:
        return "", "", "", str(server or "")
    if isinstance(obj, Ref):
        label, pk, text = obj
    else:
        label, pk, text = obj._meta.label, obj.pk, str(obj)
        if label == "backups.Server" and not server:
            server = obj.name
    server = server or getattr(obj, "server", "") or ""
    return label, str(pk), _clean_text(str(text)), str(server)


def record(action, *, actor="system", obj=None, server="", outcome="ok", **details):
    """Append one entry. `obj` is a model instance (or a Ref) the entry is about."""
    from backupportal.models import JournalEntry

    object_type, object_id, object_repr, server = _describe(obj, server)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_LOCK_ID])
        entry = JournalEntry(
            at=timezone.now(),
            actor=_clean_text(str(actor))[:150],
            action=str(action)[:64],
            object_type=object_type[:64],
            object_id=object_id[:64],
            object_repr=object_repr[:200],
            server=_clean_text(server)[:63],
            outcome=outcome,
            details=json.loads(json.dumps(_scrub(details))),
            prev_hmac=_chain_tip(),
            hmac="",
        )
        # The id is part of what is signed, so the row is inserted first, then signed.
        entry.save()
        entry.hmac = compute_hmac(entry)
        type(entry).objects.filter(pk=entry.pk, hmac="").update(hmac=entry.hmac)
        transaction.on_commit(lambda: _write_head(entry.pk, entry.hmac))
    return entry


def _chain_tip():
    """The HMAC a new entry chains onto: the newest row's, unless the head file is ahead of it.

    The head file is only ever ahead when entries were cut off the end: chaining onto the
    head keeps that cut visible to verify() after new entries are appended.
    """
    from backupportal.models import JournalEntry

    last = JournalEntry.objects.order_by("-id").values_list("id", "hmac").first()
    head = read_head()
    if head and (last is None or head[0] > last[0]):
        return head[1]
    return last[1] if last else GENESIS


def _write_head(entry_id, entry_hmac):
    path = Path(settings.JOURNAL_HEAD_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # Two processes commit entries 7 and 8 and race to write the head: never move it back.
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        current = read_head()
        if current and current[0] > entry_id:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{entry_id} {entry_hmac}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        os.close(lock_fd)


def read_head():
    path = Path(settings.JOURNAL_HEAD_FILE)
    try:
        entry_id, entry_hmac = path.read_text().split()
        return int(entry_id), entry_hmac
    except (FileNotFoundError, ValueError):
        return None


class _Row:
    """A journal row read as plain values: verify() reads a million of them."""

    __slots__ = SIGNED_FIELDS + ["hmac"]

    def __init__(self, values):
        for name, value in zip(self.__slots__, values, strict=True):
            setattr(self, name, value)


def verify(batch=5000):
    """Walk the chain. Returns (ok, message, count); the message names the first bad entry."""
    from backupportal.models import JournalEntry

    key = _read_key()
    prev_hmac, prev_id, count = GENESIS, 0, 0
    qs = JournalEntry.objects.order_by("id").values_list(*SIGNED_FIELDS, "hmac")
    while chunk := [_Row(v) for v in qs.filter(id__gt=prev_id)[:batch]]:
        for row in chunk:
            if row.prev_hmac != prev_hmac:
                where = f"entry #{prev_id}" if prev_id else "the start of the journal"
                return (
                    False,
                    f"entry #{row.id}: it does not follow {where} (entries between them were deleted, "
                    f"or #{row.id} was inserted)",
                    count,
                )
            if not hmac.compare_digest(row.hmac, compute_hmac(row, key)):
                return False, f"entry #{row.id}: its HMAC does not match its content (changed or forged)", count
            prev_hmac, prev_id, count = row.hmac, row.id, count + 1
    return _verify_head(prev_id, prev_hmac, count)


def _verify_head(last_id, last_hmac, count):
    head = read_head()
    if head is None:
        if count:
            return (
                False,
                f"the head file {settings.JOURNAL_HEAD_FILE} is missing but the journal has {count} entries",
                count,
            )
        return True, "journal intact: no entries yet", count
    head_id, head_hmac = head
    if last_id < head_id:
        return (
            False,
            f"entries after #{last_id} are missing: the head file kept outside the database names #{head_id} "
            "as the newest (entries were cut off the end)",
            count,
        )
    from backupportal.models import JournalEntry

    signed = (
        last_hmac
        if last_id == head_id
        else JournalEntry.objects.filter(pk=head_id).values_list("hmac", flat=True).first()
    )
    if signed != head_hmac:
        return False, f"entry #{head_id}: does not match the head file kept outside the database", count
    return True, f"journal intact: {count} entries, newest #{last_id}", count
