"""A journal restored from a selfbackup: entries written after the backup were lost with the host.

The anchors in the storage locations outlive the host: written after the selfbackup, they name
entries (and counts) the restored journal never held. `manage.py restoreportal` journals where
the restored journal ends (a "portal_restored" entry: restored_up_to #N) and which anchors the
old host left behind naming entries past #N that the restored journal does not hold (old_anchors).
From then on the check sets aside those anchors, and only those, and reports them as one thing,
not as tampering:
"intact up to #N; entries after #N were lost with the host". Everything up to #N is still held
to every anchor. The verdict stays failed until a person acknowledges the loss
(verifyjournal --acknowledge-loss --reason "..."), which journals each lost mark by entry and
HMAC; those marks are then no longer this journal's to meet, and it verifies again.

Without a portal_restored entry nothing is set aside: entries cut off the end are tampering.
Nor is anything written after the restore: the head file (restoreportal moves the old host's
aside, so the one in place is this host's) and the anchors this host writes name entries of the
restored journal, and entries cut off after the restore are tampering like any other. The old
host's head file, when a restore on the same host found it naming entries past #N (written since
the last anchor), is recorded in the portal_restored entry (old_head) and counts as one more
lost mark: the loss is named up to the newest entry the old host is known to have written.
"""

import hashlib
import hmac

from django.core.management.base import CommandError

from backupportal import journal_anchors

# restoreportal: the journal now in the database was restored from a selfbackup, up to an entry.
RESTORED = "portal_restored"
# The source of the head file's Mark (journal.read_head).
HEAD = "the head file"
# The old host's head file, as a restore recorded it before moving it aside.
OLD_HEAD = "the old host's head file"
# A person said the entries the anchors name past the restored end were lost with the host.
LOSS_ACKNOWLEDGED = "journal_loss_acknowledged"


# A selfbackup's `.json` carries the journal key's MAC of this constant: a new host tells that it
# holds the right JOURNAL_KEY_FILE before it restores anything, and the MAC gives the key away to nobody.
KEY_CHECK_TEXT = b"backupportal: the journal key that signs this journal"


def key_check():
    """HMAC-SHA256 of KEY_CHECK_TEXT under JOURNAL_KEY_FILE (JournalKeyMissing when there is none)."""
    from backupportal.journal import _read_key

    return hmac.new(_read_key(), KEY_CHECK_TEXT, hashlib.sha256).hexdigest()


class NothingLost(CommandError):
    """--acknowledge-loss found no lost entry to acknowledge."""


def _restores():
    """The details of every portal_restored entry, oldest first."""
    from backupportal.models import JournalEntry

    return list(JournalEntry.objects.filter(action=RESTORED).order_by("id").values_list("details", flat=True))


def restore_points():
    """The restored_up_to entry id of every portal_restored entry, oldest first."""
    return [d["restored_up_to"] for d in _restores() if isinstance(d.get("restored_up_to"), int)]


def old_anchors(restored_up_to):
    """For the portal_restored entry: the anchors of this journal that name an entry past
    `restored_up_to` which the restored journal does not hold, read before this host writes any."""
    from backupportal import journal

    anchors, _ = journal_anchors.read()
    ours = [m for m in anchors if m.journal == journal.journal_id() and m.entry > restored_up_to]
    return [{"entry": entry, "hmac": mark_hmac} for entry, mark_hmac in sorted(_not_held(ours))]


def lost_head(head, restored_up_to):
    """For the portal_restored entry: the old host's head file (restoreportal moves it aside) when
    it names an entry of this journal past `restored_up_to` that the restored journal does not
    hold. It knows the entries written since the last anchor, lost too: without it they go unnamed."""
    from backupportal import journal

    if head is None or head.journal != journal.journal_id() or head.entry <= restored_up_to:
        return None
    if not _not_held([head]):
        return None
    return {"journal": head.journal, "entry": head.entry, "hmac": head.hmac, "count": head.count}


def old_heads():
    """The old host's head files the restores set aside, as marks: verify() and acknowledge()
    hold the journal to them with the anchors (set_aside takes out those past the restored end)."""
    from backupportal.journal_anchors import Mark

    kept = [d["old_head"] for d in _restores() if isinstance(d.get("old_head"), dict)]
    return [Mark(OLD_HEAD, h["journal"], h["entry"], h["hmac"], h.get("count")) for h in kept]


def _old_anchors():
    """(entry, HMAC) of every mark a restore found left behind by the old host (its head file too)."""
    restores = _restores()
    marks = {(m["entry"], m["hmac"]) for details in restores for m in details.get("old_anchors", [])}
    return marks | {(d["old_head"]["entry"], d["old_head"]["hmac"]) for d in restores if d.get("old_head")}


def _not_held(marks):
    from backupportal.models import JournalEntry

    held = set(JournalEntry.objects.filter(pk__in={m.entry for m in marks}).values_list("id", "hmac"))
    return {(m.entry, m.hmac) for m in marks} - held


def _acknowledged():
    from backupportal.models import JournalEntry

    rows = JournalEntry.objects.filter(action=LOSS_ACKNOWLEDGED).values_list("details", flat=True)
    return {(m["entry"], m["hmac"]) for details in rows for m in details.get("lost", [])}


def set_aside(journal, marks):
    """(marks still to check, lost marks not yet acknowledged); both empty-handed without a restore."""
    left = _old_anchors()
    # Never the head file: restoreportal moved the old host's aside, the one in place is ours.
    candidates = [m for m in marks if m.source != HEAD and m.journal == journal and (m.entry, m.hmac) in left]
    if not candidates:
        return marks, []
    not_held = _not_held(candidates)
    away = [m for m in candidates if (m.entry, m.hmac) in not_held]
    acknowledged = _acknowledged()
    return [m for m in marks if m not in away], [m for m in away if (m.entry, m.hmac) not in acknowledged]


def intact_up_to():
    points = restore_points()
    return points[-1] if points else None


def problem(lost):
    """The verdict's line while lost entries wait for a person's acknowledgment; '' when none."""
    if not lost:
        return ""
    up_to = intact_up_to()
    newest = max(lost, key=lambda m: (m.count or 0, m.entry))
    sources = sorted({m.source for m in lost})
    counted = f", {newest.count} entries" if newest.count else ""
    return (
        f"intact up to #{up_to}; entries after #{up_to} were lost with the host: {', '.join(sources)} "
        f"name entries up to #{newest.entry}{counted}, which the restored journal does not hold. "
        'Once you have checked that this is the restored portal, run: manage.py verifyjournal --acknowledge-loss --reason "..."'
    )


def acknowledge(reason, actor):
    """Journal the person's acknowledgment of the lost entries; NothingLost when there are none."""
    from backupportal import journal

    head = journal.read_head()
    anchors, _ = journal_anchors.read()
    _, lost = set_aside(journal.journal_id(), ([head] if head else []) + anchors + old_heads())
    if not lost:
        raise NothingLost(
            "nothing to acknowledge: no anchor names an entry past the restored end of this journal "
            "(acknowledging a loss needs a journal restored by manage.py restoreportal)"
        )
    newest = max(lost, key=lambda m: (m.count or 0, m.entry))
    details = {
        "restored_up_to": intact_up_to(),
        "lost_up_to": newest.entry,
        "lost_count": newest.count,
        "lost": [{"entry": m.entry, "hmac": m.hmac, "count": m.count, "seen_in": m.source} for m in lost],
    }
    return journal.record(LOSS_ACKNOWLEDGED, actor=actor, outcome="info", reason=reason, **details), details
