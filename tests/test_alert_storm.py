"""Whoever may create databases on a monitored cluster chooses how many there are: 300 databases
the portal cannot reach make one "Database not backed up" alert for their server, one mail through
a real SMTP server and one message to a real webhook on 127.0.0.1, naming the first ten and how
many more; the set changing updates that alert, and it resolves once, when none is left. The
Database rows are made as the daily pass's discovery makes them; the rest is the real monitor."""

import pytest
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import BackupRun, Database
from tests.test_alert_channels import Sink, bodies, channel
from watching.alerts import LISTED
from watching.channel_models import ChannelDelivery
from watching.models import MAIL_PENDING, Alert
from watching.monitor import alert_backup_failures, check_databases, run_once

UNCOVERED = "database_uncovered"
N = 300


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def junk(server, count=N):
    """Databases whose CONNECT a role revoked: what discovery records for each."""
    Database.objects.bulk_create(
        Database(server=server, name=f"junk{i:03}", state="unreachable", problem="permission denied (CONNECT)")
        for i in range(count)
    )


def uncovered_mails(smtp):
    return [m["Subject"] for m in smtp.messages if m["Subject"].endswith(": Database not backed up")]


def journaled(action):
    return JournalEntry.objects.filter(action=action, details__condition=UNCOVERED).count()


def test_three_hundred_unreachable_databases_are_one_alert_one_mail_and_one_post(catalog_server, smtp_server, sink):
    channel("ops webhook", sink.url(), conditions=[UNCOVERED])
    junk(catalog_server)
    run_once()
    run_once()  # it still holds: nothing more is sent

    alert = Alert.objects.get(condition=UNCOVERED)
    assert alert.subject == "server:maldives" and alert.server == catalog_server
    named = [f"junk{i:03}" for i in range(LISTED)]
    assert all(f"database {name} on maldives cannot be backed up" in alert.message for name in named)
    assert "junk010" not in alert.message
    assert alert.message.endswith(
        f"and {N - LISTED} more databases of maldives are not backed up ({N} in all, listed on the Coverage page)"
    )
    assert uncovered_mails(smtp_server) == ["[backupportal] maldives: Database not backed up"]
    [opened] = bodies(sink)
    assert opened["event"] == "opened" and opened["message"].startswith(alert.message)

    # The set shrinks (and the first names are backed up now): the same alert, its message updated, nothing sent.
    Database.objects.filter(name__lt="junk005").update(state="gone")
    run_once()
    alert.refresh_from_db()
    assert alert.state == "open" and "junk000" not in alert.message and "database junk005 on" in alert.message
    assert f"({N - 5} in all" in alert.message
    assert Alert.objects.filter(condition=UNCOVERED).count() == 1 and len(bodies(sink)) == 1

    Database.objects.update(state="gone")  # dropped again
    run_once()
    run_once()
    alert.refresh_from_db()
    assert alert.state == "resolved" and Alert.objects.filter(condition=UNCOVERED).count() == 1
    assert uncovered_mails(smtp_server) == [
        "[backupportal] maldives: Database not backed up",
        "[backupportal] RESOLVED maldives: Database not backed up",
    ]
    assert [b["event"] for b in bodies(sink)] == ["opened", "resolved"]
    assert journaled("alert_opened") == 1 and journaled("alert_resolved") == 1


def test_a_few_uncovered_databases_are_all_named_without_a_count(catalog_server):
    junk(catalog_server, count=2)
    check_databases(catalog_server)
    assert Alert.objects.get(condition=UNCOVERED).message == (
        "database junk000 on maldives cannot be backed up: permission denied (CONNECT); "
        "database junk001 on maldives cannot be backed up: permission denied (CONNECT)"
    )


def test_alerts_per_database_left_open_by_an_older_version_end_quietly_and_once(catalog_server, sink):
    """Resolved one by one, as usual, they would mail and post the storm this replaced once more;
    an opening a channel was still owed (it was down) would be posted with no end following."""
    junk(catalog_server, count=50)
    now = timezone.now()
    ops = channel("ops webhook", sink.url(), conditions=[UNCOVERED])
    for database in Database.objects.all():
        old = Alert.objects.create(
            condition=UNCOVERED,
            subject=f"database:{database.pk}",
            server=catalog_server,
            message=f"database {database.name}",
            opened_mail_sent_at=now,
        )
        ChannelDelivery.objects.create(alert=old, channel=ops, event="opened")  # not sent yet
    check_databases(catalog_server)
    assert not ChannelDelivery.objects.filter(alert__subject__startswith="database:").exists()
    check_databases(catalog_server)
    old = Alert.objects.filter(subject__startswith="database:")
    assert old.count() == 50 and not old.exclude(state="resolved").exists()
    assert not old.filter(MAIL_PENDING).exists()  # no mail owed for them
    assert Alert.objects.exclude(state="resolved").get().subject == "server:maldives"
    assert Alert.objects.filter(MAIL_PENDING).count() == 1  # the server's one alert, opened
    assert journaled("alert_resolved") == 1


def test_three_hundred_failed_backups_are_one_bounded_message(catalog_server):
    junk(catalog_server)
    now = timezone.now()
    BackupRun.objects.bulk_create(
        BackupRun(
            server=catalog_server, database=d, kind="logical", status="failed", error="no CONNECT", finished_at=now
        )
        for d in Database.objects.all()
    )
    alert_backup_failures(catalog_server)
    alert = Alert.objects.get(condition="backup_failed")
    assert alert.message.count("failed: no CONNECT") == LISTED
    assert alert.message.endswith(f"and {N - LISTED} more failed backups of maldives ({N} in all)")
