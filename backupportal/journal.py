"""The operations journal: append-only, HMAC-chained, checked by `manage.py verifyjournal`.

Each entry's HMAC covers its content and the previous entry's HMAC, keyed by a key kept
outside the database (JOURNAL_KEY_FILE): someone who edits rows and recomputes plain hashes
is still caught. The newest entry's id, HMAC and the count of entries are also written outside
the database (JOURNAL_HEAD_FILE), and as anchors in every storage location
(journal_anchors.py), so that cutting entries off the end is caught too, even after new
entries were appended (they chain onto the head's entry, not onto the cut-down table), and
even by someone who rewrote VAR_DIR.

Each journal has a random id, named by its journal_started entry, by the head file and by its
anchors: a portal pointed at a new database (VAR_DIR kept) says so instead of calling the new
journal tampered, until a person acknowledges the move (verifyjournal --start-new-chain).
"""

import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from collections import namedtuple
from pathlib import Path

from django.apps import apps
from django.conf import settings
from django.core.management.base import CommandError
from django.db import connection, connections, transaction
from django.utils import timezone

from backupportal import journal_anchors, journal_loss
from backupportal.journal_actions import ACTIONS  # noqa: F401 (callers read journal.ACTIONS)
from backupportal.journal_anchors import Mark
from backupportal.lib.redact import redact

log = logging.getLogger(__name__)

GENESIS = "0" * 64
# The first entry of every journal names its id; a journal from before ids gets one appended.
STARTED = "journal_started"
# A person said this database's journal replaces another one (verifyjournal --start-new-chain).
MOVE_ACKNOWLEDGED = "journal_move_acknowledged"
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


# An object the entry is about when only its name is at hand (say, after it was deleted).
Ref = namedtuple("Ref", "label pk text")

# Entries are signed with the label of their object's model (obj._meta.label), so an entry
# written before a model moved to another app names its old label for ever: this says where
# each old label lives now. The watching app's models were born in backupportal/.
MOVED_LABELS = {
    "backupportal.Alert": "watching.Alert",
    "backupportal.RpoStatus": "watching.RpoStatus",
    "backupportal.RpoSample": "watching.RpoSample",
    "backupportal.MaintenanceTask": "watching.MaintenanceTask",
}


def model_for(label):
    """The model an entry's object_type names, old labels included. LookupError or ValueError when none."""
    return apps.get_model(MOVED_LABELS.get(label, label))


def labels_of(model):
    """Every label the entries about `model` may carry: its own, and those it had before a move."""
    label = model._meta.label
    return [label, *sorted(old for old, new in MOVED_LABELS.items() if new == label)]


# Who can name the servers, for the auditor's server filter: the ground knows no server, so
# backups registers a source (backups/apps.py), as it does for the journal's anchors.
_server_name_sources = []


def register_server_names(source):
    """`source()` returns server names to suggest in the journal's filter. Idempotent."""
    if source not in _server_name_sources:
        _server_name_sources.append(source)


def server_names():
    return sorted({name for source in _server_name_sources for name in source()})


class JournalKeyMissing(CommandError):
    """The HMAC key is not where JOURNAL_KEY_FILE says: one line saying what to do."""


class JournalUnwritable(CommandError):
    """The head file cannot be written (a read-only mount, a full disk): one line saying what to do.

    Raised after the entry's transaction committed (the head is written on commit): the entry is
    in the database, the head file still names an older one, which verify() accepts.
    """


def _unwritable(error):
    return JournalUnwritable(
        f"the journal's head file {settings.JOURNAL_HEAD_FILE} (JOURNAL_HEAD_FILE) cannot be written "
        f"({error.strerror or error}): free space on it or make its directory writable (remount read-write, "
        "chattr -i), then run the backup again"
    )


def _read_key() -> bytes:
    path = Path(settings.JOURNAL_KEY_FILE)
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        # Never made here: a new key on a worker would sign entries no other host can verify,
        # and would make every entry signed with the real key look forged.
        raise JournalKeyMissing(
            f"the journal key {path} (JOURNAL_KEY_FILE) is missing: copy it from the portal's host "
            "(mode 0600); only the first migrate of a new portal creates one"
        ) from None
    if not key:
        raise JournalKeyMissing(f"the journal key {path} (JOURNAL_KEY_FILE) is empty: restore it from its copy")
    return key


def create_key_on_first_migrate(using="default"):
    """Make the key (0600) when there is none and the journal is empty; True when made.

    A missing key with entries in the journal is an error, never a new key: the entries were
    signed with the lost one.
    """
    from backupportal.models import JournalEntry

    path = Path(settings.JOURNAL_KEY_FILE)
    if path.exists() or JournalEntry._meta.db_table not in connections[using].introspection.table_names():
        return False  # a key already, or a migrate of other apps only: the journal is not there yet
    entries = JournalEntry.objects.using(using).count()
    if entries:
        raise JournalKeyMissing(
            f"the journal key {path} (JOURNAL_KEY_FILE) is missing but the journal has {entries} entries: "
            "restore the key from where it was kept (a new key would make every entry look forged)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False  # another process's migrate made it a moment ago
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return True


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
    object_type, object_id, object_repr, server = _describe(obj, server)
    with transaction.atomic():
        _lock()
        journal = _start_if_new()
        entry = _append(
            journal,
            actor=_clean_text(str(actor))[:150],
            action=str(action)[:64],
            object_type=object_type[:64],
            object_id=object_id[:64],
            object_repr=object_repr[:200],
            server=_clean_text(server)[:63],
            outcome=outcome,
            details=json.loads(json.dumps(_scrub(details))),
        )
    return entry


def _lock():
    # Serialises appends on PostgreSQL so that two workers never chain onto the same entry
    # (SQLite takes its write lock at BEGIN: settings.py's transaction_mode IMMEDIATE).
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_LOCK_ID])


def journal_id():
    """This database's journal: the id its journal_started entry names; None before it has one."""
    from backupportal.models import JournalEntry

    details = JournalEntry.objects.filter(action=STARTED).order_by("id").values_list("details", flat=True).first()
    return details.get("journal") if details else None


def _start_if_new():
    """The journal's id, giving it one first when it has none (a new journal, or one from before ids).

    A new journal's first entry names its id. A journal written before journals had ids keeps
    its entries as signed; the id comes in an entry appended to them.
    """
    from backupportal.models import JournalEntry

    journal = journal_id()
    if journal is None:
        journal = secrets.token_hex(16)
        before = JournalEntry.objects.count()
        details = {"journal": journal} | ({"entries_before_the_id": before} if before else {})
        _append(journal, giving_the_id=True, actor="system", action=STARTED, outcome="info", details=details)
    return journal


def _append(journal, giving_the_id=False, **fields):
    from backupportal.models import JournalEntry

    last = JournalEntry.objects.order_by("-id").values_list("id", "hmac").first()
    head = read_head()
    prev_hmac = _chain_tip(journal, last, head, giving_the_id)
    entry = JournalEntry(at=timezone.now(), prev_hmac=prev_hmac, hmac="", **fields)
    # The id is part of what is signed, so the row is inserted first, then signed.
    entry.save()
    entry.hmac = compute_hmac(entry)
    JournalEntry.objects.filter(pk=entry.pk, hmac="").update(hmac=entry.hmac)
    newest = Mark("the head file", journal, entry.pk, entry.hmac, _count_with_new(journal, last, head))
    transaction.on_commit(lambda: _write_head(newest))
    return entry


def _chain_tip(journal, last, head, giving_the_id=False):
    """The HMAC a new entry chains onto: the newest row's, unless this journal's head is ahead of it.

    The head is only ever ahead when entries were cut off the end: chaining onto the head
    keeps that cut visible to verify() after new entries are appended. Another journal's head
    (the portal was pointed at a new database) is never chained onto: verify() names it. A head
    from before ids is taken as this journal's only by the entry that gives an old journal its id.
    """
    old_journal = giving_the_id and last is not None
    ours = head is not None and (head.journal == journal or (head.journal is None and old_journal))
    if ours and (last is None or head.entry > last[0]):
        return head.hmac
    return last[1] if last else GENESIS


def _count_with_new(journal, last, head):
    """Entries in the journal, the one just inserted included: from the head when it is current."""
    from backupportal.models import JournalEntry

    if head and head.journal == journal and head.count and last and head.entry == last[0]:
        return head.count + 1
    return JournalEntry.objects.count()


def _write_head(mark, entry_hmac=None, force=False):
    """Write the head file: a Mark, or (entry id, HMAC) for a journal without an id yet.

    Never moves the head back, and never replaces another journal's head: that one stays until
    a person acknowledges the move (verifyjournal --start-new-chain).
    """
    if not isinstance(mark, Mark):
        mark = Mark("the head file", None, mark, entry_hmac, None)
    try:
        _replace_head(mark, force)
    except OSError as e:
        raise _unwritable(e) from None


def check_head_writable():
    """JournalUnwritable unless the head file can be written now: it is written again as it is
    (the newest entry's mark when there is none yet). A backup run asks before it is recorded as
    succeeded: a success the journal cannot record is no success (backups.runner)."""
    head = read_head()
    _write_head(head or newest_mark()._replace(source="the head file"))


def _replace_head(mark, force):
    path = Path(settings.JOURNAL_HEAD_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # Two processes commit entries 7 and 8 and race to write the head: never move it back.
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        current = read_head()
        if current and not force and not _may_replace(current, mark):
            return
        values = {"journal": mark.journal, "entry": mark.entry, "hmac": mark.hmac, "count": mark.count}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(values) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        os.close(lock_fd)


def _may_replace(current, new):
    from backupportal.models import JournalEntry

    if current.journal is not None and current.journal != new.journal:
        return False
    if current.journal is None and new.journal is not None:
        # A head from before journals had ids: ours only if this database holds its entry.
        if not JournalEntry.objects.filter(pk=current.entry, hmac=current.hmac).exists():
            return False
    return current.entry <= new.entry


def read_head():
    """The head file as a Mark; None when there is none (or it cannot be read)."""
    path = Path(settings.JOURNAL_HEAD_FILE)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        values = json.loads(text)
        return Mark("the head file", values["journal"], int(values["entry"]), values["hmac"], values["count"])
    except (ValueError, KeyError, TypeError):
        pass
    try:
        entry_id, entry_hmac = text.split()  # written before journals had ids: "ID HMAC"
        return Mark("the head file", None, int(entry_id), entry_hmac, None)
    except ValueError:
        return None


def newest_mark():
    """The journal's newest entry as stored in the database, for an anchor (started first if new)."""
    from backupportal.models import JournalEntry

    with transaction.atomic():
        _lock()
        journal = _start_if_new()
        entry_id, entry_hmac = JournalEntry.objects.order_by("-id").values_list("id", "hmac").first()
        count = JournalEntry.objects.count()
    return Mark("the database", journal, entry_id, entry_hmac, count)


def write_anchors():
    """The newest entry as an anchor object in every registered store (see journal_anchors)."""
    mark = newest_mark()
    results = journal_anchors.write(mark, timezone.now().isoformat(timespec="seconds"))
    for failed in (r for r in results if r["error"]):
        log.warning("journal anchor not written to %s: %s", failed["location"], failed["error"])
    return {"journal": mark.journal, "entry": mark.entry, "count": mark.count, "locations": results}


class _Row:
    """A journal row read as plain values: verify() reads a million of them."""

    __slots__ = SIGNED_FIELDS + ["hmac"]

    def __init__(self, values):
        for name, value in zip(self.__slots__, values, strict=True):
            setattr(self, name, value)


# What verifyjournal reports: the first problem (or that all is well), the entries walked, the
# journal's id, and one summary per anchor store (what it held, or why it could not be read).
Verdict = namedtuple("Verdict", "ok message count journal anchors")


def verify(batch=5000):
    """Walk the chain. Returns (ok, message, count); the message names the first problem."""
    verdict = check(batch)
    return verdict.ok, verdict.message, verdict.count


def check(batch=5000):
    """Walk the chain and hold it against the head file and every anchor that can be read."""
    key = _read_key()
    journal, moved_from = journal_id(), _acknowledged_moves()
    anchors, summaries = journal_anchors.read()
    head = read_head()
    # An acknowledged journal's anchors stay in the locations: they are no longer this journal's to meet.
    marks = ([head] if head else []) + anchors + journal_loss.old_heads()
    marks = [m for m in marks if m.journal is None or m.journal not in moved_from]
    marks, lost = journal_loss.set_aside(journal, marks)  # restored from a selfbackup: see journal_loss
    foreign = [m for m in marks if m.journal not in (None, journal)]
    wanted = {}
    for mark in marks:
        if mark not in foreign:
            wanted.setdefault(mark.entry, []).append(mark)
    walked = _walk(key, wanted, batch)
    if walked.problem:
        return Verdict(False, walked.problem, walked.count, journal, summaries)
    problem = (
        journal_anchors.foreign_problem(foreign, journal, walked)
        or journal_anchors.missing_problem(wanted, walked)
        or walked.mismatch
        or journal_anchors.head_problem(head, walked)
        or journal_loss.problem(lost)
    )
    if problem:
        return Verdict(False, problem, walked.count, journal, summaries)
    return Verdict(
        True, journal_anchors.intact_message(journal, walked, anchors, marks), walked.count, journal, summaries
    )


Walked = namedtuple("Walked", "count last_id problem mismatch")


def _walk(key, wanted, batch):
    """Follow the chain from the start; check each mark (head, anchors) at the entry it names."""
    from backupportal.models import JournalEntry

    prev_hmac, prev_id, count, mismatch = GENESIS, 0, 0, ""
    qs = JournalEntry.objects.order_by("id").values_list(*SIGNED_FIELDS, "hmac")
    while chunk := [_Row(v) for v in qs.filter(id__gt=prev_id)[:batch]]:
        for row in chunk:
            if row.prev_hmac != prev_hmac:
                where = f"entry #{prev_id}" if prev_id else "the start of the journal"
                problem = (
                    f"entry #{row.id}: it does not follow {where} (entries between them were deleted, "
                    f"or #{row.id} was inserted)"
                )
                return Walked(count, prev_id, problem, "")
            if not hmac.compare_digest(row.hmac, compute_hmac(row, key)):
                return Walked(
                    count, prev_id, f"entry #{row.id}: its HMAC does not match its content (changed or forged)", ""
                )
            prev_hmac, prev_id, count = row.hmac, row.id, count + 1
            for mark in wanted.pop(row.id, []):
                mismatch = mismatch or journal_anchors.mark_mismatch(mark, row, count)
    return Walked(count, prev_id, "", mismatch)


def _acknowledged_moves():
    """Journals a person said this database replaces (verifyjournal --start-new-chain)."""
    from backupportal.models import JournalEntry

    moves = JournalEntry.objects.filter(action=MOVE_ACKNOWLEDGED).values_list("details", flat=True)
    return {m["journal"] for details in moves for m in details.get("left_behind", [])}


def start_new_chain(reason, actor):
    """Acknowledge that this database's journal replaces another (named by the head or anchors).

    Journaled, with the other journal's id and last known entry; the head file then names this
    journal. Raises JournalMoveRefused when there is nothing to acknowledge.
    """
    journal, moved_from = journal_id(), _acknowledged_moves()
    anchors, _ = journal_anchors.read()
    head = read_head()
    others = {}
    for mark in ([head] if head else []) + anchors:
        if mark.journal == journal or (mark.journal is not None and mark.journal in moved_from):
            continue
        if mark.journal is None and _holds(mark):
            continue
        newest = others.get(mark.journal)
        if newest is None or (mark.count or 0, mark.entry) > (newest.count or 0, newest.entry):
            others[mark.journal] = mark
    if not others:
        raise JournalMoveRefused(
            "nothing to acknowledge: the head file and every anchor found belong to this database's journal"
        )
    left_behind = [
        {"journal": m.journal, "last_entry": m.entry, "count": m.count, "seen_in": m.source} for m in others.values()
    ]
    with transaction.atomic():
        entry = record(MOVE_ACKNOWLEDGED, actor=actor, outcome="info", reason=reason, left_behind=left_behind)
        # record() leaves another journal's head alone; this is the one place that replaces it.
        newest = Mark("the head file", journal_id(), entry.pk, entry.hmac, _count())
        transaction.on_commit(lambda: _write_head(newest, force=True))
    return entry, left_behind


class JournalMoveRefused(CommandError):
    """--start-new-chain found no other journal to acknowledge."""


def _holds(mark):
    from backupportal.models import JournalEntry

    return JournalEntry.objects.filter(pk=mark.entry, hmac=mark.hmac).exists()


def _count():
    from backupportal.models import JournalEntry

    return JournalEntry.objects.count()
