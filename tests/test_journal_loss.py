"""A journal restored from a selfbackup: the old host's anchors past the restored end are entries
lost with the host, and only those. Whatever this host writes after the restore (its head file,
its anchors) is held to the journal like before it: entries cut off later are tampering."""

import os
from pathlib import Path

import pytest
from django.conf import settings

from backupportal import journal, journal_loss
from backupportal.models import JournalEntry
from tests.test_journal_anchors import record, tamper, verifyjournal


def restore_up_to(entry, django_capture_on_commit_callbacks):
    """What restoreportal leaves on a new host: the journal as the selfbackup held it (up to
    `entry`), the old head file moved aside, and the portal_restored entry."""
    tamper("DELETE FROM backupportal_journalentry WHERE id > %s", [entry.pk])
    head = Path(settings.JOURNAL_HEAD_FILE)
    os.replace(head, head.with_name(head.name + ".before-restore"))
    with django_capture_on_commit_callbacks(execute=True):
        return journal.record(
            journal_loss.RESTORED,
            actor="os:root",
            outcome="info",
            restored_up_to=entry.pk,
            entries=JournalEntry.objects.count(),
            old_anchors=journal_loss.old_anchors(entry.pk),
        )


@pytest.fixture
def restored(backup_root, django_capture_on_commit_callbacks):
    """A portal restored from the selfbackup taken at its third entry; the old host went on to
    its fifth, anchored in the primary location, before it burnt. The loss is acknowledged."""
    old = record(5, django_capture_on_commit_callbacks)
    journal.write_anchors()
    entry = restore_up_to(old[2], django_capture_on_commit_callbacks)
    assert entry.details["old_anchors"] == [{"entry": old[-1].pk, "hmac": old[-1].hmac}]
    code, text = verifyjournal()
    assert code == 1 and f"intact up to #{old[2].pk}; entries after #{old[2].pk} were lost with the host" in text
    with django_capture_on_commit_callbacks(execute=True):
        journal_loss.acknowledge("host burnt; restored from the selfbackup", "os:root")
    assert verifyjournal()[0] == 0
    return old


def test_entries_cut_off_after_a_restore_are_tampering_not_entries_lost_with_the_host(
    restored, django_capture_on_commit_callbacks
):
    # Months on this host: entries, anchored; then the newest four are deleted (an approval among them).
    new = record(20, django_capture_on_commit_callbacks)
    assert verifyjournal()[0] == 0
    tamper("DELETE FROM backupportal_journalentry WHERE id > %s", [new[-5].pk])

    code, text = verifyjournal()
    assert code == 1 and "lost with the host" not in text, text
    assert f"entries after #{new[-5].pk} are missing" in text and f"names #{new[-1].pk} as the newest" in text
    with pytest.raises(journal_loss.NothingLost):
        journal_loss.acknowledge("restored from selfbackup", "os:root")


def test_an_anchor_written_after_a_restore_still_catches_a_cut_the_head_file_was_rewritten_to_hide(
    restored, django_capture_on_commit_callbacks
):
    new = record(6, django_capture_on_commit_callbacks)
    journal.write_anchors()
    tamper("DELETE FROM backupportal_journalentry WHERE id > %s", [new[2].pk])
    count = JournalEntry.objects.count()
    journal._write_head(journal.Mark("the head file", journal.journal_id(), new[2].pk, new[2].hmac, count), force=True)

    code, text = verifyjournal()
    assert code == 1 and "lost with the host" not in text, text
    assert f"the anchor in location primary kept outside the database names #{new[-1].pk}" in text


def test_a_restore_records_no_anchor_this_journal_holds_and_none_before_the_restored_end(
    backup_root, django_capture_on_commit_callbacks
):
    old = record(4, django_capture_on_commit_callbacks)
    journal.write_anchors()  # at the old host's fourth entry: before the selfbackup below
    more = record(2, django_capture_on_commit_callbacks)
    journal.write_anchors()
    entry = restore_up_to(more[0], django_capture_on_commit_callbacks)
    assert entry.details["old_anchors"] == [{"entry": more[1].pk, "hmac": more[1].hmac}]
    assert old[-1].pk < more[0].pk
