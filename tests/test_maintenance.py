"""The maintenance calendar: recurring tasks with due days, completed with evidence by a DBA or
a Sysadmin, and the "maintenance overdue" alert when one is missed."""

import datetime
import io
import json
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.urls import reverse

from backupportal import journal
from backupportal.models import JournalEntry
from backups.models import Server
from restores.models import DrDrill, RestoreTest
from watching import maintenance
from watching.models import Alert, MaintenanceTask

MALE = ZoneInfo("Indian/Maldives")
Kind = MaintenanceTask.Kind


def at(day, hour=10):
    """A moment in the portal's time zone."""
    return datetime.datetime.combine(day, datetime.time(hour), tzinfo=MALE)


START = datetime.date(2026, 1, 5)


@pytest.fixture
def calendar(db):
    """The calendar as set up on START."""
    with time_machine.travel(at(START), tick=False):
        maintenance.ensure_calendar()
    return {t.kind: t for t in MaintenanceTask.objects.all()}


@pytest.fixture
def restore_test(db):
    server = Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/atoll")
    return RestoreTest.objects.create(server=server, status="passed", monthly=True, duration_s=512.0)


def open_alerts():
    return Alert.objects.filter(condition="maintenance_overdue").exclude(state="resolved")


def test_the_calendar_holds_each_task_of_the_strategy_once(calendar):
    assert {k: t.due_on for k, t in calendar.items()} == {
        Kind.WEEKLY_VERIFY: datetime.date(2026, 1, 12),
        Kind.MONTHLY_RESTORE_TEST: datetime.date(2026, 2, 5),
        Kind.QUARTERLY_RETENTION_REVIEW: datetime.date(2026, 4, 5),
        Kind.ANNUAL_DR_DRILL: datetime.date(2027, 1, 5),
        Kind.STRATEGY_REVIEW: datetime.date(2025, 12, 2),  # the document's "Next Review"
    }
    assert maintenance.ensure_calendar() == []  # idempotent
    assert JournalEntry.objects.filter(action="maintenance_scheduled").count() == 5


def test_a_task_not_done_by_its_due_date_raises_the_overdue_alert(calendar):
    weekly = calendar[Kind.WEEKLY_VERIFY]
    with time_machine.travel(at(datetime.date(2026, 1, 12), 23), tick=False):  # the due day itself: not yet
        result = maintenance.check_overdue()
    assert weekly.pk not in result["overdue"]
    with time_machine.travel(at(datetime.date(2026, 1, 13), 0), tick=False):
        result = maintenance.check_overdue()
        maintenance.check_overdue()  # every minute: still one alert
    assert weekly.pk in result["overdue"]
    alert = open_alerts().get(subject=f"task:{weekly.pk}")
    assert "Weekly: verify backup completion and integrity was due on 2026-01-12" in alert.message
    entry = JournalEntry.objects.get(action="alert_opened", object_id=str(alert.pk))
    assert entry.details["condition"] == "maintenance_overdue"
    # The strategy review (due 2025-12-02) is overdue too; the others are not.
    assert set(open_alerts().values_list("subject", flat=True)) == {
        f"task:{weekly.pk}",
        f"task:{calendar[Kind.STRATEGY_REVIEW].pk}",
    }


def complete_on_page(client, task, when, **data):
    with time_machine.travel(when, tick=False):
        return client.post(reverse("maintenance-complete", args=[task.pk]), data)


def test_completing_a_task_resolves_its_alert_and_schedules_the_next_one(client, alice, calendar, restore_test):
    monthly = calendar[Kind.MONTHLY_RESTORE_TEST]
    with time_machine.travel(at(datetime.date(2026, 2, 6)), tick=False):
        maintenance.check_overdue()
    assert open_alerts().filter(subject=f"task:{monthly.pk}").exists()
    client.force_login(alice)
    response = complete_on_page(
        client, monthly, at(datetime.date(2026, 2, 7)), evidence=f"restore_test:{restore_test.pk}", notes="all good"
    )
    assert response.status_code == 302
    monthly.refresh_from_db()
    assert monthly.completed_by == alice and monthly.evidence_restore_test == restore_test and monthly.completed_late()
    assert not open_alerts().filter(subject=f"task:{monthly.pk}").exists()
    following = MaintenanceTask.objects.get(kind=Kind.MONTHLY_RESTORE_TEST, completed_at=None)
    assert following.due_on == datetime.date(2026, 3, 5)
    assert response["Location"] == following.get_absolute_url()
    done = JournalEntry.objects.get(action="maintenance_completed")
    assert done.actor == "alice" and done.details["next_due_on"] == "2026-03-05"
    assert (
        done.details["evidence_link"]
        == restore_test.get_absolute_url()
        == reverse("restore-test", args=[restore_test.pk])
    )
    # The calendar links the evidence.
    # The session was last saved in February (time_machine): it has expired by now's clock.
    client.force_login(alice)
    page = client.get(reverse("maintenance")).content.decode()
    assert done.details["evidence_link"] in page and "late" in page


def test_a_late_completion_skips_occurrences_already_past(calendar, alice, restore_test):
    weekly = calendar[Kind.WEEKLY_VERIFY]  # due 2026-01-12
    with time_machine.travel(at(datetime.date(2026, 1, 28)), tick=False):
        _, following = maintenance.complete(weekly, by=alice, evidence=("restore_test", restore_test))
    assert following.due_on == datetime.date(2026, 2, 2)  # not 01-19 or 01-26: those are past


def test_the_strategy_review_recurs_every_quarter_from_the_documents_date(calendar, sam):
    review = calendar[Kind.STRATEGY_REVIEW]
    with time_machine.travel(at(datetime.date(2025, 12, 1)), tick=False):
        _, following = maintenance.complete(
            review, by=sam, evidence=("url", "https://docs.example.mv/backup-strategy-v1.1.pdf")
        )
    assert following.due_on == datetime.date(2026, 3, 2)


@pytest.mark.parametrize(
    "kind, evidence, message",
    [
        (Kind.MONTHLY_RESTORE_TEST, None, "Give the evidence that the task was done: a restore test"),
        (Kind.MONTHLY_RESTORE_TEST, ("url", "https://x.example"), "A link is not evidence"),
        (Kind.ANNUAL_DR_DRILL, ("drill", "unfinished"), "has not gone live yet"),
        (Kind.WEEKLY_VERIFY, ("entry", "login"), "is a “login”, not a verify run"),
        (Kind.STRATEGY_REVIEW, ("url", "ftp://files/strategy"), "is not a link"),
        (Kind.STRATEGY_REVIEW, ("url", "/no/such/page/"), "is not a page of the portal"),
    ],
)
def test_evidence_that_proves_nothing_is_refused(calendar, alice, kind, evidence, message):
    if evidence and evidence[1] == "unfinished":
        evidence = ("drill", DrDrill.objects.create(title="half a drill", logged_by=alice))
    if evidence and evidence[1] == "login":
        evidence = ("entry", journal.record("login", actor="alice"))
    with pytest.raises(ValidationError) as refused:
        maintenance.complete(calendar[kind], by=alice, evidence=evidence)
    assert message in refused.value.messages[0]
    assert calendar[kind].__class__.objects.get(pk=calendar[kind].pk).completed_at is None


def test_good_evidence_of_each_kind_is_taken(calendar, alice, restore_test):
    verify = journal.record("verify", actor="job:verify", copies=12, bad=0)
    drill = DrDrill.objects.create(title="Annual drill", logged_by=alice)
    drill.steps.filter(step="go_live").update(started_at=drill.started_at, finished_at=drill.started_at)
    maintenance.complete(calendar[Kind.WEEKLY_VERIFY], by=alice, evidence=("entry", verify))
    maintenance.complete(calendar[Kind.ANNUAL_DR_DRILL], by=alice, evidence=("drill", drill))
    maintenance.complete(
        calendar[Kind.QUARTERLY_RETENTION_REVIEW], by=alice, evidence=("url", "/journal/?action=verify")
    )
    links = [t.evidence_link()[0] for t in MaintenanceTask.objects.exclude(completed_at=None).order_by("id")]
    assert links == [verify.get_absolute_url(), "/journal/?action=verify", drill.get_absolute_url()]


def test_a_task_is_completed_once(client, calendar, alice, sam, restore_test):
    monthly = calendar[Kind.MONTHLY_RESTORE_TEST]
    maintenance.complete(monthly, by=alice, evidence=("restore_test", restore_test))
    with pytest.raises(ValidationError, match="already completed"):
        maintenance.complete(monthly, by=sam, evidence=("restore_test", restore_test))
    client.force_login(sam)
    again = client.post(
        reverse("maintenance-complete", args=[monthly.pk]), {"evidence": f"restore_test:{restore_test.pk}"}
    )
    assert again.status_code == 302
    assert MaintenanceTask.objects.filter(kind=Kind.MONTHLY_RESTORE_TEST).count() == 2


def test_the_completion_form_offers_the_evidence_the_task_takes_and_explains_a_refusal(
    client, sam, calendar, restore_test
):
    client.force_login(sam)
    url = reverse("maintenance-complete", args=[calendar[Kind.MONTHLY_RESTORE_TEST].pk])
    form = client.get(url).content.decode()
    assert f'value="restore_test:{restore_test.pk}"' in form and "…or a link" not in form
    refused = client.post(url, {})
    assert refused.status_code == 200 and "Give the evidence that the task was done" in refused.content.decode()
    review = client.get(reverse("maintenance-complete", args=[calendar[Kind.STRATEGY_REVIEW].pk])).content.decode()
    assert "…or a link" in review


def test_auditors_read_the_calendar_and_complete_nothing(client, charlie, calendar, restore_test):
    client.force_login(charlie)
    assert client.get(reverse("maintenance")).status_code == 200
    task = calendar[Kind.MONTHLY_RESTORE_TEST]
    url = reverse("maintenance-complete", args=[task.pk])
    assert client.get(url).status_code == 403
    assert client.post(url, {"evidence": f"restore_test:{restore_test.pk}"}).status_code == 403
    task.refresh_from_db()
    assert task.completed_at is None


def test_a_stale_alert_is_resolved_when_the_due_date_moves(calendar):
    weekly = calendar[Kind.WEEKLY_VERIFY]
    when = at(datetime.date(2026, 1, 20))
    with time_machine.travel(when, tick=False):
        maintenance.check_overdue()
        MaintenanceTask.objects.filter(pk=weekly.pk).update(due_on=datetime.date(2026, 1, 25))  # a superuser moved it
        result = maintenance.check_overdue()
    assert weekly.pk in result["resolved"] and not open_alerts().filter(subject=f"task:{weekly.pk}").exists()


def test_the_maintenance_command_checks_and_lists_the_calendar(calendar):
    out = io.StringIO()
    with time_machine.travel(at(datetime.date(2026, 1, 13)), tick=False):
        call_command("maintenance", "--json", stdout=out)
    result = json.loads(out.getvalue().splitlines()[-1])
    overdue = {t["kind"] for t in result["tasks"] if t["overdue"]}
    assert overdue == {"weekly_verify", "strategy_review"} and len(result["overdue"]) == 2
    text = io.StringIO()
    with time_machine.travel(at(datetime.date(2026, 1, 13)), tick=False):
        call_command("maintenance", stdout=text)
    assert "OVERDUE Weekly: verify backup completion and integrity" in text.getvalue()


def test_logins_are_not_offered_as_evidence_of_a_review(client, sam, calendar):
    """Found by review: the strategy review's list of journal entries was every login."""
    journal.record("login", actor="sam")
    review = journal.record("retention_reviewed", actor="sam")
    client.force_login(sam)
    page = client.get(reverse("maintenance-complete", args=[calendar[Kind.STRATEGY_REVIEW].pk])).content.decode()
    assert f'value="entry:{review.pk}"' in page
    for entry in JournalEntry.objects.filter(action__in=("login", "logout")):
        assert f'value="entry:{entry.pk}"' not in page
