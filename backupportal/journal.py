"""The operations journal: append-only, HMAC-chained, checked by `manage.py verifyjournal`.

Each entry's HMAC covers its content and the previous entry's HMAC, keyed by a key kept
outside the database (JOURNAL_KEY_FILE): someone who edits rows and recomputes plain hashes
is still caught. The newest entry's id and HMAC are also written outside the database
(JOURNAL_HEAD_FILE), so that cutting entries off the end is caught too.
"""

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from backupportal.lib.redact import redact

GENESIS = "0" * 64
# Serialises appends on PostgreSQL so that two workers never chain onto the same entry.
_PG_LOCK_ID = 0x6A6F75726E616C  # "journal"


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
    """The bytes the HMAC covers: every field but the HMAC itself, in a fixed order."""
    body = {
        "id": entry.pk,
        "at": entry.at.isoformat(timespec="microseconds"),
        "actor": entry.actor,
        "action": entry.action,
        "object_type": entry.object_type,
        "object_id": entry.object_id,
        "object_repr": entry.object_repr,
        "server": entry.server,
        "outcome": entry.outcome,
        "details": entry.details,
        "prev_hmac": entry.prev_hmac,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def compute_hmac(entry, key=None) -> str:
    return hmac.new(key or _read_key(), canonical(entry), hashlib.sha256).hexdigest()


def _scrub(value):
    """Details never carry a secret: redact strings, drop keys that name one."""
    if isinstance(value, dict):
        return {
            k: ("***" if any(w in k.lower() for w in ("password", "passphrase", "secret")) else _scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def record(action, *, actor="system", obj=None, server="", outcome="ok", **details):
    """Append one entry. `obj` is any model instance the entry is about."""
    from backupportal.models import JournalEntry

    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_LOCK_ID])
        last = JournalEntry.objects.order_by("-id").values_list("hmac", flat=True).first()
        entry = JournalEntry(
            at=timezone.now(),
            actor=str(actor)[:150],
            action=action,
            object_type=obj._meta.label if obj is not None else "",
            object_id=str(obj.pk) if obj is not None else "",
            object_repr=redact(str(obj))[:200] if obj is not None else "",
            server=str(server or getattr(obj, "server", "") or "")[:63],
            outcome=outcome,
            details=json.loads(json.dumps(_scrub(details), default=str)),
            prev_hmac=last or GENESIS,
            hmac="",
        )
        # The id is part of what is signed, so the row is inserted first, then signed.
        entry.save()
        entry.hmac = compute_hmac(entry)
        type(entry).objects.filter(pk=entry.pk, hmac="").update(hmac=entry.hmac)
        transaction.on_commit(lambda: _write_head(entry.pk, entry.hmac))
    return entry


def _write_head(entry_id, entry_hmac):
    path = Path(settings.JOURNAL_HEAD_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{entry_id} {entry_hmac}\n")
        f.flush()
        os.fsync(f.fileno())
    # Another process may have appended after us: never move the head backwards.
    current = read_head()
    if current and current[0] > entry_id:
        tmp.unlink()
        return
    os.replace(tmp, path)


def read_head():
    path = Path(settings.JOURNAL_HEAD_FILE)
    try:
        entry_id, entry_hmac = path.read_text().split()
        return int(entry_id), entry_hmac
    except (FileNotFoundError, ValueError):
        return None


def verify(batch=5000):
    """Walk the chain. Returns (ok, message); the message names the first bad entry."""
    from backupportal.models import JournalEntry

    key = _read_key()
    prev, last_id, count = GENESIS, None, 0
    qs = JournalEntry.objects.order_by("id")
    while True:
        chunk = list(qs.filter(id__gt=last_id or 0)[:batch])
        if not chunk:
            break
        for entry in chunk:
            if entry.prev_hmac != prev:
                return (
                    False,
                    f"entry #{entry.pk}: its chain link does not match the entry before it (an entry before it was deleted, or it was inserted)",
                )
            if not hmac.compare_digest(entry.hmac, compute_hmac(entry, key)):
                return False, f"entry #{entry.pk}: its HMAC does not match its content (changed or forged)"
            prev, last_id, count = entry.hmac, entry.pk, count + 1
    head = read_head()
    if head:
        head_id, head_hmac = head
        if last_id is None or last_id < head_id:
            return (
                False,
                f"entries after #{last_id or 0} are missing: the head file names entry #{head_id} (cut off the end)",
            )
        signed = JournalEntry.objects.filter(pk=head_id).values_list("hmac", flat=True).first()
        if signed != head_hmac:
            return False, f"entry #{head_id}: does not match the head file kept outside the database"
    elif count:
        return False, f"the head file {settings.JOURNAL_HEAD_FILE} is missing but the journal has {count} entries"
    return True, f"journal intact: {count} entries"
