"""Second approval for destructive changes: shorter retention, a schedule disabled or, over the
next year, firing less often or with a longer gap, a backup deleted by hand, a storage location
removed or retired. Each
waits as a ChangeRequest until another DBA or Sysadmin approves it (never its requester), from every
way in (the admin, the server page, the run page); approval makes it, rejection leaves it.

Catalog rows and real files under a private BACKUP_ROOT; the admin's server form probes its
server, so that test has a real cluster."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.core.exceptions import PermissionDenied, ValidationError
from django.urls import reverse
from django_q.models import Schedule

from backupportal.lib.cron import firings, longest_gap, next_run
from backupportal.models import JournalEntry
from backups import databases
from backups.changes import schedule_turned_down
from backups.models import BackupCopy, BackupHold, BackupRun, BackupSchedule, ChangeRequest, Server, StorageLocation
from tests.adminform_helpers import admin_form_data
from tests.helpers import make_user, register

MALE = ZoneInfo("Indian/Maldives")
NOW = datetime(2026, 12, 3, 12, tzinfo=MALE)  # a Thursday; the 30 days are 3 December .. 1 January
# The year a change of schedule is judged over: 3 December 2026 .. 3 December 2027.
YEAR_START, YEAR_END = datetime(2026, 12, 3, tzinfo=MALE), datetime(2027, 12, 4, tzinfo=MALE)


def make_server(name="atoll", **policy):
    return Server.objects.create(name=name, dsn="postgresql://postgres@127.0.0.1:1/postgres", **policy)


def journal(action):
    return list(JournalEntry.objects.filter(action=action).order_by("pk"))


# --- Fewer firings over the next 30 days ------------------------------------------------------


@pytest.mark.parametrize(
    "cron, expected",
    [
        ("0 2 * * *", 30),  # every day
        ("0 8,14,20 * * *", 90),  # three a day
        ("0 5 * * 3", 4),  # Wednesdays: 9, 16, 23, 30 December
        ("0 3 * * 0#1", 1),  # the first Sunday: 6 December (3 January is past the 30 days)
        ("0 2 L * *", 1),  # the last day of the month: 31 December
        ("*/15 2,3 * * 1-5", 22 * 8),  # 22 weekdays, 8 firings each
        ("5 4 1 * 1", 5),  # the 1st or a Monday (cron's OR): 7, 14, 21, 28 December, 1 January
        ("* * * * *", 30 * 24 * 60),
    ],
)
def test_firings_over_the_next_30_days_are_counted_exactly(cron, expected):
    assert firings(cron, 30, NOW) == expected


@pytest.mark.parametrize("cron", ["0 5 * * 3", "0 3 * * 0#1", "5 4 1 * 1", "*/15 2,3 * * 1-5", "0 2 L * *"])
def test_firings_agree_with_the_next_runs_django_q2_computes(cron):
    """The same count, walked firing by firing with next_run (as django-q2 does)."""
    start = datetime(2026, 12, 3, tzinfo=MALE)
    end, moment, walked = start + timedelta(days=30), start - timedelta(seconds=1), 0
    while (moment := next_run(cron, moment)) is not None and moment < end:
        walked += 1
    assert firings(cron, 30, NOW) == walked


@pytest.mark.parametrize(
    "old, new, enabled, waits",
    [
        ("0 2 * * *", "0 2 * * 0", True, True),  # daily to weekly: 30 to 4
        ("0 8,14,20 * * *", "0 8,20 * * *", True, True),  # 90 to 60
        ("0 2 * * *", "0 2 1 * *", True, True),  # daily to monthly: 30 to 1
        ("0 2 * * *", "0 2 * * *", False, True),  # disabled
        ("0 2 * * *", "0 3 * * *", True, False),  # another hour, as often: at once
        ("0 2 * * *", "0 */6 * * *", True, False),  # more often: at once
        ("0 5 * * 3", "0 5 * * 1,3", True, False),  # 53 to 104 a year; 7 to 5 days
        ("0 3 * * 0#1", "0 3 L * *", True, False),  # 12 and 12 a year; 35 to 31 days
        ("0 2 * * *", "0 2,14 * 12 *", True, True),  # December only: 58 in 30 days, 64 in a year
        ("0 2 * * *", "* * * 12 *", True, True),  # 46,080 a year, all in December: 334 days silent
        ("0 2 * * *", "0 2 * * 1-5", True, True),  # weekdays: 366 to 262, 1 to 3 days
        ("0 2 * * *", "0 2,14 * * 1-5", True, True),  # 524 a year, yet 2.5 days over each weekend
        ("0 5 * * 3", "0 5 * 12 3", True, True),  # the weekly restore test, in December only
    ],
)
def test_a_schedule_change_waits_when_it_disables_fires_less_often_or_leaves_a_longer_gap(old, new, enabled, waits):
    stored = BackupSchedule(cron=old, enabled=True)
    assert bool(schedule_turned_down(stored, new, enabled, NOW)) is waits
    assert schedule_turned_down(BackupSchedule(cron=old, enabled=False), new, True, NOW) == {}  # enabling: at once


@pytest.mark.parametrize(
    "cron, expected",
    [
        ("0 2 * * *", timedelta(days=1)),
        ("0 2,23 * * *", timedelta(hours=21)),  # 02:00 to 23:00 is the longer of the two
        ("0 2 * * 1-5", timedelta(days=3)),  # Friday to Monday
        ("0 2,14 * * 1-5", timedelta(days=2, hours=12)),  # Friday 14:00 to Monday 02:00
        ("0 2,14 * 12 *", timedelta(days=334, hours=12)),  # 31 December 14:00 to 1 December 02:00
        ("0 3 * * 0#1", timedelta(days=35)),  # 2 May to 6 June 2027
        ("0 3 L * *", timedelta(days=31)),
        ("0 0 29 2 *", datetime(2028, 2, 29, tzinfo=MALE) - YEAR_START),  # none this year: until the next
    ],
)
def test_the_longest_gap_over_a_year_is_measured_exactly(cron, expected):
    assert longest_gap(cron, 366, NOW) == expected


@pytest.mark.parametrize("cron", ["0 2,14 * 12 *", "0 3 * * 0#1", "5 4 1 * 1", "0 2,14 * * 1-5", "0 2 L * *"])
def test_the_longest_gap_agrees_with_the_next_runs_django_q2_computes(cron):
    """The same gap, walked firing by firing with next_run over the year, the last to its next."""
    moments, moment = [], YEAR_START - timedelta(seconds=1)
    while (moment := next_run(cron, moment)) is not None and (not moments or moments[-1] < YEAR_END):
        moments.append(moment)
    assert longest_gap(cron, 366, NOW) == max(b - a for a, b in zip(moments, moments[1:], strict=False))


# The day a review found these waiting: the window (5 December 2026 .. 5 December 2027) holds the
# 5th of December twice and no 29 February, which a yearly firing in July meets in 2028.
REVIEW_DAY = datetime(2026, 12, 5, 12, tzinfo=MALE)


@pytest.mark.parametrize(
    "old, new, waits",
    [
        ("0 2 5 * *", "0 2 6 * *", False),  # 13 to 12 firings at the window's edge; 31 and 31 days
        ("0 3 * * 0#1", "0 3 1 * *", False),  # 13 to 12; 35 to 31 days
        ("0 2 1 1 *", "0 2 1 7 *", False),  # 1 and 1; 365 to 366 days across 29 February 2028
        ("0 2 1 1,7 *", "0 2 1 1 *", True),  # one firing fewer, judged by the gap: 184 to 365 days
        ("0 2 * * *", "0 2,14 * 12 *", True),  # December only
        ("0 2 * * *", "0 2 * * 1-5", True),  # weekdays: 366 to 260, 1 to 3 days
        ("0 2 * * *", "0 2,14 * * 1-5", True),  # more firings, yet 2.5 days over each weekend
        ("0 5 * * 3", "0 5 * 12 3", True),  # the weekly restore test, in December only
        ("0 2 * * *", "0 2 */2 * *", True),  # every other day: 1 to 2 days is longer
    ],
)
def test_a_schedule_shifted_across_the_years_edges_applies_at_once_a_weakened_one_waits(old, new, waits):
    changes = schedule_turned_down(BackupSchedule(cron=old, enabled=True), new, True, REVIEW_DAY)
    assert bool(changes) is waits, changes


def test_one_firing_fewer_is_judged_by_the_longest_gap_and_both_are_shown():
    assert (firings("0 2 5 * *", 366, REVIEW_DAY), firings("0 2 6 * *", 366, REVIEW_DAY)) == (13, 12)
    assert longest_gap("0 2 1 7 *", 366, REVIEW_DAY) == timedelta(days=366)
    assert schedule_turned_down(BackupSchedule(cron="0 2 1 1,7 *", enabled=True), "0 2 1 1 *", True, REVIEW_DAY) == {
        "firings in 366 days": {"from": 2, "to": 1},
        "longest gap": {"from": "184 days", "to": "365 days"},
        "cron": {"from": "0 2 1 1,7 *", "to": "0 2 1 1 *"},
    }


def test_a_shifted_schedule_applies_at_once_in_the_admin(client, alice, db):
    server = make_server()
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    BackupSchedule.objects.filter(pk=schedule.pk).update(cron="0 2 5 * *")
    url = reverse("admin:backups_backupschedule_change", args=[schedule.pk])
    client.force_login(alice)
    with time_machine.travel(REVIEW_DAY, tick=False):
        assert client.post(url, admin_form_data(client, url, cron="0 2 6 * *")).status_code == 302
    assert BackupSchedule.objects.get(pk=schedule.pk).cron == "0 2 6 * *" and not ChangeRequest.objects.exists()
    assert Schedule.objects.get(name="logical:atoll").cron == "0 2 6 * *"


def test_only_in_december_waits_though_it_fires_more_often_this_month(db):
    """The reviewer's case: more firings over the next 30 days, none for eleven months after."""
    stored = BackupSchedule(cron="0 2 * * *", enabled=True)
    assert firings("0 2,14 * 12 *", 30, NOW) > firings("0 2 * * *", 30, NOW)
    assert schedule_turned_down(stored, "0 2,14 * 12 *", True, NOW) == {
        "firings in 366 days": {"from": 366, "to": 64},
        "longest gap": {"from": "1 day", "to": "334 days 12 hours"},
        "cron": {"from": "0 2 * * *", "to": "0 2,14 * 12 *"},
    }
    # Firing more often all year applies at once: neither measure is worse.
    assert schedule_turned_down(stored, "0 */6 * * *", True, NOW) == {}


def test_a_december_only_schedule_waits_in_the_admin_and_on_the_server_page(client, alice, bob, db):
    server = make_server()
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    url = reverse("admin:backups_backupschedule_change", args=[schedule.pk])
    client.force_login(alice)
    with time_machine.travel(NOW, tick=False):
        response = client.post(url, admin_form_data(client, url, cron="0 2,14 * 12 *", change_reason="December"))
        assert response.status_code == 302
        # The restore test's schedule on the server page: Wednesdays of December only.
        edit = reverse("schedule-edit", args=[server.name])
        client.post(edit, {"job": "restoretest", "cron": "0 5 * 12 3", "enabled": "on", "change_reason": "busy"})
    assert BackupSchedule.objects.get(pk=schedule.pk).cron == "0 2 * * *"
    assert Schedule.objects.get(name="logical:atoll").cron == "0 2 * * *"
    assert Schedule.objects.get(name="restoretest:atoll").cron == "0 5 * * 3"
    changes = ChangeRequest.objects.order_by("pk")
    assert [c.changes["longest gap"]["to"] for c in changes] == ["334 days 12 hours", "336 days"]
    changes[0].approve(bob)
    assert Schedule.objects.get(name="logical:atoll").cron == "0 2,14 * 12 *"


# --- Schedules: the server page and the admin -------------------------------------------------


def test_turning_a_schedule_down_on_the_server_page_waits_for_another_person(client, alice, bob, sam, charlie, db):
    server = make_server()
    edit = reverse("schedule-edit", args=[server.name])
    client.force_login(alice)
    with time_machine.travel(NOW, tick=False):
        response = client.post(edit, {"job": "logical", "cron": "0 2 * * 0", "enabled": "on"}, follow=True)
        assert "give its reason" in response.content.decode()
        assert not ChangeRequest.objects.exists()
        client.post(edit, {"job": "logical", "cron": "0 2 * * 0", "enabled": "on", "change_reason": "weekly is enough"})
    change = ChangeRequest.objects.get()
    assert change.kind == "schedule_less_often"
    assert change.changes["firings in 366 days"] == {"from": 366, "to": 52}
    assert change.changes["longest gap"] == {"from": "1 day", "to": "7 days"}
    assert BackupSchedule.objects.get(server=server, job="logical").cron == "0 2 * * *"
    assert Schedule.objects.get(name="logical:atoll").cron == "0 2 * * *"  # django-q2 fires as before

    # A second request for the same schedule waits for the first to be decided.
    client.post(edit, {"job": "logical", "cron": "0 2 * * *", "change_reason": "off"})
    assert ChangeRequest.objects.count() == 1

    # More often applies at once, even with a request waiting on another schedule.
    client.post(edit, {"job": "restoretest", "cron": "0 5 * * 1,3", "enabled": "on"})
    assert Schedule.objects.get(name="restoretest:atoll").cron == "0 5 * * 1,3"

    assert client.post(reverse("change-approve", args=[change.pk])).status_code == 403  # the requester
    for nobody in (alice, charlie):
        with pytest.raises(PermissionDenied):
            change.approve(nobody)
    change.approve(sam)
    assert Schedule.objects.get(name="logical:atoll").cron == "0 2 * * 0"
    entry = journal("schedule_changed")[-1]
    assert entry.actor == "alice (approved by sam)" and entry.details["cron"] == "0 2 * * 0"
    assert [e.details["kind"] for e in journal("change_approved")] == ["schedule_less_often"]


def test_disabling_a_schedule_in_the_admin_waits_and_a_rejection_leaves_it(client, alice, bob, db):
    server = make_server()
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    url = reverse("admin:backups_backupschedule_change", args=[schedule.pk])
    client.force_login(alice)
    response = client.post(url, admin_form_data(client, url, enabled=None))
    assert response.status_code == 200 and "give its reason" in response.content.decode()
    response = client.post(url, admin_form_data(client, url, enabled=None, change_reason="moved to the NAS job"))
    assert response.status_code == 302
    page = client.get(response.url).content.decode()
    assert "waits for another DBA or Sysadmin" in page and "change request #" in page
    schedule.refresh_from_db()
    assert schedule.enabled and Schedule.objects.filter(name="logical:atoll").exists()
    change = ChangeRequest.objects.get()
    assert change.changes == {"enabled": {"from": True, "to": False}}

    # Deleting a schedule in the admin is not offered: it would stop the job at once.
    delete = reverse("admin:backups_backupschedule_delete", args=[schedule.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403  # a DBA deletes nothing in the admin
    client.force_login(make_user("root", "DBA", superuser=True))
    response = client.post(delete, {"post": "yes"})
    assert response.status_code == 302 and "untick enabled instead" in client.get(response.url).content.decode()
    assert BackupSchedule.objects.filter(pk=schedule.pk).exists()

    client.force_login(bob)
    assert client.post(reverse("change-reject", args=[change.pk])).status_code == 302
    change.refresh_from_db()
    schedule.refresh_from_db()
    assert change.state == "rejected" and schedule.enabled and Schedule.objects.filter(name="logical:atoll").exists()
    assert journal("change_rejected")[0].actor == "bob"

    # A more frequent cron in the admin applies at once.
    response = client.post(url, admin_form_data(client, url, cron="0 2,14 * * *"))
    assert response.status_code == 302
    assert Schedule.objects.get(name="logical:atoll").cron == "0 2,14 * * *"


# --- Retention ----------------------------------------------------------------------------------


def test_shortening_retention_or_disabling_in_the_admin_waits_lengthening_applies_at_once(
    client, pg_cluster, sam, alice, bob
):
    server = register(pg_cluster, name="atoll", dbname="postgres")
    url = reverse("admin:backups_server_change", args=[server.pk])
    client.force_login(sam)
    changes = {"logical_retention_days": 60, "base_retention_days": 7, "retention_floor": 1, "rpo_minutes": 10}
    changes["enabled"] = None  # unticked: no job of the server would run
    response = client.post(url, admin_form_data(client, url, **changes))
    assert response.status_code == 200 and "give its reason" in response.content.decode()
    server.refresh_from_db()
    assert (server.logical_retention_days, server.rpo_minutes) == (30, 15)  # a refused form saves nothing

    response = client.post(url, admin_form_data(client, url, **changes, change_reason="disk is full"))
    assert response.status_code == 302
    server.refresh_from_db()
    assert (server.logical_retention_days, server.rpo_minutes) == (60, 10)  # longer, and the rest: at once
    assert (server.base_retention_days, server.retention_floor, server.enabled) == (30, 3, True)  # these wait
    change = ChangeRequest.objects.get(kind="shorten_retention")
    disable = ChangeRequest.objects.get(kind="disable_server")
    assert disable.changes == {"enabled": {"from": True, "to": False}}
    assert change.changes == {"base_retention_days": {"from": 30, "to": 7}, "retention_floor": {"from": 3, "to": 1}}
    assert journal("server_changed")[-1].details["fields"] == ["logical_retention_days", "rpo_minutes"]
    assert [e.details["changes"] for e in journal("change_requested")] == [change.changes, disable.changes]

    with pytest.raises(PermissionDenied):
        change.approve(sam)
    client.force_login(alice)
    page = client.get(reverse("changes")).content.decode()
    assert f'id="approve-{change.pk}"' in page and "base retention days: 30 -&gt; 7" in page
    client.post(reverse("change-approve", args=[change.pk]))
    server.refresh_from_db()
    assert (server.base_retention_days, server.retention_floor, server.logical_retention_days) == (7, 1, 60)
    entry = journal("server_changed")[-1]
    assert entry.actor == "sam (approved by alice)" and entry.details["fields"] == [
        "base_retention_days",
        "retention_floor",
    ]
    assert server.enabled
    with pytest.raises(PermissionDenied):
        disable.approve(sam)
    disable.approve(bob)
    server.refresh_from_db()
    assert not server.enabled and journal("server_changed")[-1].details["fields"] == ["enabled"]


def test_raising_an_objective_or_the_shrink_threshold_waits_lowering_applies_at_once(client, pg_cluster, sam, alice):
    """A higher RPO or RTO objective, or a higher shrink threshold, mutes alerts and failed
    restore tests: a Sysadmin alone cannot quiet them."""
    server = register(pg_cluster, name="atoll", dbname="postgres")
    url = reverse("admin:backups_server_change", args=[server.pk])
    client.force_login(sam)
    looser = {"rpo_minutes": 1440, "rto_full_minutes": 10000, "shrink_threshold_pct": 100}
    response = client.post(url, admin_form_data(client, url, **looser, rto_critical_minutes=60))
    assert response.status_code == 200 and "give its reason" in response.content.decode()
    response = client.post(url, admin_form_data(client, url, **looser, rto_critical_minutes=60, change_reason="quiet"))
    assert response.status_code == 302
    server.refresh_from_db()
    assert (server.rpo_minutes, server.rto_full_minutes, server.shrink_threshold_pct) == (15, 480, 20)
    assert server.rto_critical_minutes == 60  # stricter: at once
    change = ChangeRequest.objects.get(kind="loosen_objectives")
    assert change.changes == {
        "rpo_minutes": {"from": 15, "to": 1440},
        "rto_full_minutes": {"from": 480, "to": 10000},
        "shrink_threshold_pct": {"from": 20, "to": 100},
    }
    assert journal("server_changed")[-1].details["fields"] == ["rto_critical_minutes"]
    change.approve(alice)
    server.refresh_from_db()
    assert (server.rpo_minutes, server.rto_full_minutes, server.shrink_threshold_pct) == (1440, 10000, 100)
    assert journal("server_changed")[-1].actor == "sam (approved by alice)"


def test_turning_wal_archiving_off_waits_switching_push_and_pull_applies_at_once(client, pg_cluster, sam, alice):
    """No archiving, no PITR after it, and the RPO alert goes quiet: a Sysadmin alone cannot."""
    server = register(pg_cluster, name="atoll", dbname="postgres")
    Server.objects.filter(pk=server.pk).update(archiving="push")
    url = reverse("admin:backups_server_change", args=[server.pk])
    client.force_login(sam)
    response = client.post(url, admin_form_data(client, url, archiving="none"))
    assert response.status_code == 200 and "give its reason" in response.content.decode()
    assert client.post(url, admin_form_data(client, url, archiving="none", change_reason="moving")).status_code == 302
    server.refresh_from_db()
    assert server.archiving == "push"  # until another person approves
    change = ChangeRequest.objects.get(kind="stop_archiving")
    assert change.changes == {"archiving": {"from": "push", "to": "none"}}
    assert "archiving" not in journal("server_changed")[-1].details["fields"]
    assert client.post(url, admin_form_data(client, url, archiving="pull")).status_code == 302  # still archived
    server.refresh_from_db()
    assert server.archiving == "pull"
    with pytest.raises(PermissionDenied):
        change.approve(sam)
    change.approve(alice)
    server.refresh_from_db()
    assert server.archiving == "none" and journal("server_changed")[-1].actor == "sam (approved by alice)"


def protected(server):
    return set(server.databases.filter(protected=True).values_list("name", flat=True))


def test_leaving_out_a_database_it_backs_up_waits_adding_one_applies_at_once(client, pg_cluster, sam, alice):
    """A Sysadmin alone cannot stop a database's backups: naming fewer databases, or pointing the
    DSN at another database while "the DSN's" is the choice, keeps the old ones backed up (with
    the new) until another DBA or Sysadmin approves."""
    for name in ("shop", "ledger"):
        pg_cluster.create_database(name)
    server = register(pg_cluster, name="atoll", dbname="postgres")
    url = reverse("admin:backups_server_change", args=[server.pk])
    client.force_login(sam)
    assert client.post(url, admin_form_data(client, url, protect_databases="all")).status_code == 302
    assert protected(server) == {"ledger", "postgres", "shop"}

    response = client.post(url, admin_form_data(client, url, protect_databases="shop"))
    assert response.status_code == 200 and "give its reason" in response.content.decode()
    response = client.post(url, admin_form_data(client, url, protect_databases="shop", change_reason="ledger moved"))
    assert response.status_code == 302
    server.refresh_from_db()
    assert server.protect_databases == "all" and protected(server) == {"ledger", "postgres", "shop"}
    change = ChangeRequest.objects.get(kind="back_up_fewer")
    assert change.changes == {
        "protect_databases": {"from": "all", "to": "shop"},
        "left out": {"from": "ledger, postgres", "to": "no backups"},
    }
    client.force_login(alice)
    assert "left out: ledger, postgres -&gt; no backups" in client.get(reverse("changes")).content.decode()
    with pytest.raises(PermissionDenied):
        change.approve(sam)
    change.approve(alice)
    server.refresh_from_db()
    assert server.protect_databases == "shop" and protected(server) == {"shop"}
    entry = journal("server_changed")[-1]
    assert entry.actor == "sam (approved by alice)" and entry.details["left_out"] == "ledger, postgres"

    # Adding a database covers every one backed up: at once, no reason asked.
    client.force_login(sam)
    response = client.post(url, admin_form_data(client, url, protect_databases="shop,ledger"))
    assert response.status_code == 302
    assert protected(server) == {"ledger", "shop"}

    # "The DSN's database", then the DSN moved to another database: both until approved.
    server.protect_databases = ""
    server.dsn = pg_cluster.dsn("ledger")
    server.save()
    databases.discover(server)
    assert protected(server) == {"ledger"}
    response = client.post(url, admin_form_data(client, url, dsn=pg_cluster.dsn("shop"), change_reason="renamed"))
    assert response.status_code == 302, response.content.decode()[:2000]
    server.refresh_from_db()
    assert server.dbname == "shop" and server.protect_databases == "ledger,shop"
    assert protected(server) == {"ledger", "shop"}
    change = ChangeRequest.objects.filter(kind="back_up_fewer").latest("pk")
    assert change.changes["protect_databases"] == {"from": "ledger,shop", "to": ""}
    change.reject(alice)
    server.refresh_from_db()
    assert server.protect_databases == "ledger,shop"

    # Judged again at approval: a database added since would stop being backed up unapproved.
    client.force_login(sam)
    response = client.post(url, admin_form_data(client, url, protect_databases="shop", change_reason="one"))
    assert response.status_code == 302
    change = ChangeRequest.objects.filter(kind="back_up_fewer").latest("pk")
    assert change.changes["left out"]["from"] == "ledger"
    pg_cluster.create_database("extra")
    response = client.post(url, admin_form_data(client, url, protect_databases="ledger,shop,extra"))
    assert response.status_code == 302 and protected(server) == {"extra", "ledger", "shop"}
    with pytest.raises(ValidationError, match="would now also stop backing up extra, which this request did not"):
        change.approve(alice)
    server.refresh_from_db()
    assert server.protect_databases == "ledger,shop,extra"
    # The same when the cluster could not be listed at that save: no row yet, the choice names it.
    server.databases.filter(name="extra").delete()
    with pytest.raises(ValidationError, match="would now also stop backing up extra"):
        change.approve(alice)


def test_a_rejected_retention_change_leaves_the_server_as_it_was(alice, bob):
    server = make_server(keep_weekly=4)
    change = ChangeRequest.open(
        ChangeRequest.Kind.SHORTEN_RETENTION, server, alice, "fewer weeklies", {"keep_weekly": {"from": 4, "to": 0}}
    )
    with pytest.raises(PermissionDenied):
        change.reject(alice)
    change.reject(bob)
    server.refresh_from_db()
    assert server.keep_weekly == 4 and change.state == "rejected"
    with pytest.raises(ValidationError, match="not waiting for a decision"):
        change.approve(bob)


# --- Deleting a backup by hand -----------------------------------------------------------------


@pytest.fixture
def kept_backup(settings, tmp_path, db):
    """A good logical backup of 'atoll' with its dump on the primary location, and a newer one."""
    settings.BACKUP_ROOT = tmp_path / "backups"
    settings.WAL_ROOT = tmp_path / "wal"
    StorageLocation.sync_from_settings()
    server = make_server(retention_floor=1)
    at = datetime(2026, 11, 1, 2, tzinfo=MALE)
    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded", started_at=at, finished_at=at)
    BackupRun.objects.create(server=server, kind="logical", status="succeeded", started_at=NOW, finished_at=NOW)
    dump = settings.BACKUP_ROOT / "atoll" / "old.dump.gpg"
    dump.parent.mkdir(parents=True)
    dump.write_bytes(b"an encrypted dump")
    primary = StorageLocation.objects.get(name="primary")
    BackupCopy.objects.create(run=run, location=primary, key="atoll/old.dump.gpg", size=17, status="ok")
    return run, dump


def test_deleting_a_backup_by_hand_waits_for_a_second_person(client, kept_backup, alice, bob, charlie):
    run, dump = kept_backup
    client.force_login(charlie)
    assert b'id="delete-this"' not in client.get(reverse("run", args=[run.pk])).content
    assert client.post(reverse("run-delete", args=[run.pk]), {"reason": "x"}).status_code == 403

    client.force_login(alice)
    assert b'id="delete-this"' in client.get(reverse("run", args=[run.pk])).content
    client.post(reverse("run-delete", args=[run.pk]), {"reason": "restored from by mistake into prod: ticket 88"})
    change = ChangeRequest.objects.get()
    assert change.kind == "delete_backup" and change.target_id == run.pk
    assert "waiting for" in client.get(reverse("run", args=[run.pk])).content.decode()
    assert client.post(reverse("change-approve", args=[change.pk])).status_code == 403
    run.refresh_from_db()
    assert run.is_good and dump.exists()

    client.force_login(bob)
    client.post(reverse("change-approve", args=[change.pk]))
    run.refresh_from_db()
    assert run.deleted_at is not None and not dump.exists() and run.copies.get().status == "deleted"
    assert journal("backup_deleted")[0].actor == "alice (approved by bob)"


def test_a_held_backup_cannot_be_deleted_by_hand_even_when_the_hold_came_after_the_request(
    client, kept_backup, alice, bob
):
    run, dump = kept_backup
    change = ChangeRequest.open(ChangeRequest.Kind.DELETE_BACKUP, run, alice, "not needed")
    BackupHold.place(run, bob, "case 12: litigation")
    with pytest.raises(ValidationError, match="legal hold"):
        change.approve(bob)
    change.refresh_from_db()
    assert change.state == "pending" and run.is_good and dump.exists()  # rolled back: nothing was made

    client.force_login(bob)
    response = client.post(reverse("run-delete", args=[run.pk]), {"reason": "x"}, follow=True)
    assert "under a legal hold" in response.content.decode()
    assert ChangeRequest.objects.count() == 1


def test_the_newest_good_backup_cannot_be_deleted_by_hand(client, kept_backup, alice, bob):
    """Nothing deletes the last good backup: not retention, not two people agreeing."""
    run, _ = kept_backup
    newest = BackupRun.objects.exclude(pk=run.pk).get()
    client.force_login(alice)
    response = client.post(reverse("run-delete", args=[newest.pk]), {"reason": "space"}, follow=True)
    page = response.content.decode()
    assert "is the newest good logical backup of atoll" in page and "nothing deletes the last good backup" in page
    assert not ChangeRequest.objects.exists()
    change = ChangeRequest.open(ChangeRequest.Kind.DELETE_BACKUP, run, alice, "old")  # the older one may go
    newest.status = "failed"  # and if the newer one fails meanwhile, the old one is the last good one
    newest.save()
    with pytest.raises(ValidationError, match="nothing deletes the last good backup"):
        change.approve(bob)


# --- Storage locations in the admin ------------------------------------------------------------


@pytest.fixture
def raid(settings, tmp_path, db):
    settings.BACKUP_ROOT = tmp_path / "backups"
    StorageLocation.sync_from_settings()
    return StorageLocation.objects.create(name="raid", kind="primary", path=str(settings.BACKUP_ROOT / "raid"))


def test_retiring_a_location_in_the_admin_waits_for_approval(client, raid, sam, bob):
    url = reverse("admin:backups_storagelocation_change", args=[raid.pk])
    client.force_login(sam)
    response = client.post(url, admin_form_data(client, url, enabled=None, capacity_bytes="1000", change_reason="x"))
    assert response.status_code == 200 and "Retire the location alone" in response.content.decode()
    response = client.post(url, admin_form_data(client, url, enabled=None, change_reason="the RAID is failing"))
    assert response.status_code == 302
    raid.refresh_from_db()
    assert raid.enabled
    change = ChangeRequest.objects.get(kind="retire_location")
    with pytest.raises(PermissionDenied):
        change.approve(sam)
    change.approve(bob)
    raid.refresh_from_db()
    assert not raid.enabled
    assert journal("location_changed")[-1].actor == "sam (approved by bob)"


def test_deleting_a_location_in_the_admin_becomes_a_request(client, raid, sam, bob):
    root = make_user("root", "Sysadmin", superuser=True)  # only superusers delete locations in the admin
    client.force_login(root)
    delete = reverse("admin:backups_storagelocation_delete", args=[raid.pk])
    page = client.get(delete).content.decode()
    assert "waits on the" in page and 'name="change_reason"' in page
    changelist = client.get(reverse("admin:backups_storagelocation_changelist")).content.decode()
    assert "delete_selected" not in changelist  # no bulk delete

    response = client.post(delete, {"post": "yes"}, follow=True)
    assert "give its reason" in response.content.decode() and StorageLocation.objects.filter(pk=raid.pk).exists()
    response = client.post(delete, {"post": "yes", "change_reason": "replaced by the NAS"}, follow=True)
    text = response.content.decode()
    assert "Removing raid waits for another DBA or Sysadmin" in text and "deleted successfully" not in text
    assert StorageLocation.objects.filter(pk=raid.pk).exists()
    change = ChangeRequest.objects.get(kind="remove_location")
    with pytest.raises(PermissionDenied):
        change.approve(root)  # a superuser is no exception: never the requester
    change.approve(bob)
    assert not StorageLocation.objects.filter(pk=raid.pk).exists()
    assert journal("location_removed")[0].actor == "root (approved by bob)"

    # A location the catalog names (its copies) is never removed: retired instead.
    primary = StorageLocation.objects.get(name="primary")
    server = make_server()
    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded", finished_at=NOW)
    BackupCopy.objects.create(run=run, location=primary, key="atoll/x.dump.gpg", size=1, status="ok")
    response = client.post(
        reverse("admin:backups_storagelocation_delete", args=[primary.pk]),
        {"post": "yes", "change_reason": "gone"},
        follow=True,
    )
    assert StorageLocation.objects.filter(pk=primary.pk).exists()
    assert not ChangeRequest.objects.filter(kind="remove_location", target_id=primary.pk).exists()


def test_holds_and_change_requests_are_read_only_in_the_admin(client, kept_backup, alice, sam):
    run, _ = kept_backup
    hold = BackupHold.place(run, alice, "case 3")
    change = hold.request_release(alice, "closed")
    root = make_user("root", "Sysadmin", superuser=True)
    for user in (sam, root):
        client.force_login(user)
        assert "case 3" in client.get(reverse("admin:backups_backuphold_changelist")).content.decode()
        assert "Release a legal hold" in client.get(reverse("admin:backups_changerequest_changelist")).content.decode()
        for name, pk in (("backuphold", hold.pk), ("changerequest", change.pk)):
            assert client.post(reverse(f"admin:backups_{name}_change", args=[pk]), {}).status_code == 403
            assert client.post(reverse(f"admin:backups_{name}_delete", args=[pk]), {"post": "yes"}).status_code == 403
            assert client.get(reverse(f"admin:backups_{name}_add")).status_code == 403
        # A backup is never deleted in the admin: the run page asks for it.
        assert client.post(reverse("admin:backups_backuprun_delete", args=[run.pk]), {"post": "yes"}).status_code == 403
    assert run.holds.active().count() == 1 and change.state == "pending"
