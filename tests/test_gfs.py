"""GFS retention with a floor, and legal holds whose release needs a second person. Catalog rows
only (retention of files is tested in test_logical_schedule_retention): no cluster is needed."""

import json
from datetime import date, datetime, timedelta
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import call_command

from backupportal.models import JournalEntry
from backups import retention
from backups.models import BackupHold, BackupRun, ChangeRequest, Database, Server

MALE = ZoneInfo("Indian/Maldives")


def make_server(**policy):
    return Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/postgres", **policy)


def backup(server, when, kind="logical", status="succeeded", database=None):
    return BackupRun.objects.create(
        server=server, kind=kind, status=status, database=database, started_at=when, finished_at=when
    )


def kept_days(server, kind="logical"):
    good = server.runs.good().filter(kind=kind).order_by("finished_at")
    return [r.finished_at.astimezone(MALE).date() for r in good]


def a_year_of_daily_backups(server, first, last, kind="logical"):
    """A backup every day at 02:00 Maldives time from `first` to `last`, retention at 03:00 each day."""
    day = first
    while day <= last:
        at = datetime(day.year, day.month, day.day, 2, tzinfo=MALE)
        with time_machine.travel(at + timedelta(hours=1), tick=False):
            backup(server, at, kind)
            retention.apply()
        day += timedelta(days=1)


def test_gfs_keeps_exactly_the_expected_backups_over_a_year_of_daily_backups(db):
    server = make_server(logical_retention_days=7, keep_weekly=4, keep_monthly=6, keep_yearly=2, retention_floor=3)
    a_year_of_daily_backups(server, date(2025, 12, 4), date(2026, 12, 3))

    assert kept_days(server) == [
        date(2025, 12, 31),  # yearly 2025: the newest of last year
        date(2026, 7, 31),  # monthly: July .. November, the newest of each
        date(2026, 8, 31),
        date(2026, 9, 30),
        date(2026, 10, 31),
        date(2026, 11, 15),  # weekly 2026-W46 (Monday 9 .. Sunday 15 November)
        date(2026, 11, 22),  # weekly 2026-W47
        date(2026, 11, 27),  # daily: the last 7 days (from 26 November 03:00, the run of the 27th on)
        date(2026, 11, 28),
        date(2026, 11, 29),  # also the newest of 2026-W48
        date(2026, 11, 30),  # also the newest of November
        date(2026, 12, 1),
        date(2026, 12, 2),
        date(2026, 12, 3),  # also the newest of 2026-W49, of December, of 2026
    ]
    assert server.runs.filter(deleted_at__isnull=False).count() == 365 - 14

    with time_machine.travel(datetime(2026, 12, 3, 12, tzinfo=MALE), tick=False):
        rules = {row["finished_at"][:10]: row["kept_by"] for row in retention.describe(server)}
    assert rules == {
        "2025-12-31": "yearly 2025",  # finished_at in the portal's time zone, as the pages show it
        "2026-07-31": "monthly 2026-07",
        "2026-08-31": "monthly 2026-08",
        "2026-09-30": "monthly 2026-09",
        "2026-10-31": "monthly 2026-10",
        "2026-11-15": "weekly 2026-W46",
        "2026-11-22": "weekly 2026-W47",
        "2026-11-27": "daily 2026-11-27",
        "2026-11-28": "daily 2026-11-28",
        "2026-11-29": "daily 2026-11-29",
        "2026-11-30": "daily 2026-11-30",
        "2026-12-01": "daily 2026-12-01",
        "2026-12-02": "daily 2026-12-02",
        "2026-12-03": "daily 2026-12-03",
    }


def test_the_default_policy_keeps_thirty_days_as_before(db):
    server = make_server()
    assert (server.logical_retention_days, server.keep_weekly, server.keep_monthly, server.keep_yearly) == (30, 0, 0, 0)
    a_year_of_daily_backups(server, date(2026, 9, 1), date(2026, 12, 3))
    assert kept_days(server) == [date(2026, 11, 4) + timedelta(days=n) for n in range(30)]


def test_the_floor_holds_when_every_recent_job_failed(db):
    """pgbackweb #121: jobs failed for a month and retention emptied the catalog. Not here."""
    server = make_server()  # 30 days, a floor of 3
    shop = Database.objects.create(server=server, name="shop")
    for day in range(1, 32):  # October: good backups of the cluster and of shop
        at = datetime(2026, 10, day, 2, tzinfo=MALE)
        backup(server, at, "base")
        backup(server, at, database=shop)
    for day in range(1, 31):  # November: every job failed
        at = datetime(2026, 11, day, 2, tzinfo=MALE)
        backup(server, at, "base", status="failed")
        backup(server, at, status="failed", database=shop)

    with time_machine.travel(datetime(2026, 12, 3, 3, tzinfo=MALE), tick=False):
        retention.apply()
        rows = retention.describe(server)
    october_end = [date(2026, 10, 29), date(2026, 10, 30), date(2026, 10, 31)]
    assert kept_days(server, "base") == october_end
    assert kept_days(server, "logical") == october_end
    assert [r["kept_by"] for r in rows] == ["floor"] * 6


def test_the_floor_is_per_database(db):
    server = make_server(retention_floor=2)
    shop, hr = (Database.objects.create(server=server, name=n) for n in ("shop", "hr"))
    for day in range(1, 6):
        backup(server, datetime(2026, 10, day, 2, tzinfo=MALE), database=shop)
    backup(server, datetime(2026, 9, 1, 2, tzinfo=MALE), database=hr)
    with time_machine.travel(datetime(2026, 12, 3, tzinfo=MALE), tick=False):
        retention.apply()
    assert sorted(r.finished_at.astimezone(MALE).day for r in server.runs.good().filter(database=shop)) == [4, 5]
    assert server.runs.good().filter(database=hr).count() == 1


def test_a_held_backup_survives_retention_and_its_release_needs_a_second_person(db, alice, bob, charlie, sam):
    server = make_server(retention_floor=1)
    old = backup(server, datetime(2026, 6, 1, 2, tzinfo=MALE))
    backup(server, datetime(2026, 12, 2, 2, tzinfo=MALE))
    hold = BackupHold.place(old, alice, "case 2026-114: tax audit of June")
    with pytest.raises(PermissionDenied):
        BackupHold.place(old, charlie, "auditors change nothing")

    at = datetime(2026, 12, 3, 3, tzinfo=MALE)
    with time_machine.travel(at, tick=False):
        assert retention.apply() == []
        assert retention.describe(server)[-1]["kept_by"] == "legal hold"

    change = hold.request_release(alice, "the audit is closed")
    for not_allowed in (alice, charlie):  # the requester; an auditor
        with pytest.raises(PermissionDenied):
            change.approve(not_allowed)
        with pytest.raises(PermissionDenied):
            change.reject(not_allowed)
    with time_machine.travel(at, tick=False):
        assert retention.apply() == []  # until approved, the hold stays
    hold.refresh_from_db()
    assert hold.released_at is None

    change.approve(sam)  # a Sysadmin (or another DBA) approves
    hold.refresh_from_db()
    assert hold.released_at is not None and change.state == "approved" and change.decided_by == sam
    with time_machine.travel(at, tick=False):
        assert [d["id"] for d in retention.apply()] == [old.pk]
    actions = list(
        JournalEntry.objects.exclude(action="journal_started").order_by("pk").values_list("action", flat=True)
    )
    assert actions == ["backup_held", "change_requested", "change_approved", "backup_deleted"]


def test_a_hold_placed_between_retentions_plan_and_its_deletion_keeps_the_backup(db, alice, monkeypatch):
    """Retention plans every backup of a server, then deletes one by one (minutes, on S3): a hold
    placed meanwhile on a backup the plan let go is seen before that one is deleted."""
    server = make_server(retention_floor=1)
    old = backup(server, datetime(2026, 6, 1, 2, tzinfo=MALE))
    older = backup(server, datetime(2026, 5, 1, 2, tzinfo=MALE))
    backup(server, datetime(2026, 12, 2, 2, tzinfo=MALE))
    planned = retention.plan

    def hold_after_the_plan(server, now=None):
        rules = planned(server, now)
        assert {r.pk for r, rule in rules.items() if rule is None} == {old.pk, older.pk}
        BackupHold.place(old, alice, "case 2026-131: subpoena arrived during the pass")
        return rules

    monkeypatch.setattr(retention, "plan", hold_after_the_plan)
    with time_machine.travel(datetime(2026, 12, 3, 3, tzinfo=MALE), tick=False):
        assert [d["id"] for d in retention.apply()] == [older.pk]
    old.refresh_from_db()
    assert old.deleted_at is None and old.holds.active().exists()
    with pytest.raises(ValidationError, match="deleted: only a kept good backup can be held"):
        BackupHold.place(BackupRun.objects.get(pk=older.pk), alice, "too late")


def test_a_rejected_release_keeps_the_hold(db, alice, bob):
    server = make_server()
    run = backup(server, datetime(2026, 6, 1, 2, tzinfo=MALE))
    change = BackupHold.place(run, alice, "litigation hold").request_release(bob, "no longer needed")
    change.reject(alice)
    assert change.state == ChangeRequest.State.REJECTED and run.holds.active().count() == 1
    assert JournalEntry.objects.filter(action="change_rejected").count() == 1


def test_a_held_incremental_keeps_its_chain(db, alice):
    server = make_server(retention_floor=1)
    old = datetime(2026, 6, 1, 2, tzinfo=MALE)
    full = backup(server, old, "base")
    inc = BackupRun.objects.create(
        server=server,
        kind="incremental",
        status="succeeded",
        finished_at=old + timedelta(hours=6),
        details={"method": "block", "parent": full.pk},
    )
    backup(server, datetime(2026, 12, 2, 2, tzinfo=MALE), "base")
    BackupHold.place(inc, alice, "case 7")
    with time_machine.travel(datetime(2026, 12, 3, 3, tzinfo=MALE), tick=False):
        rules = {r.pk: rule for r, rule in retention.plan(server).items()}
    assert rules[inc.pk] == "legal hold" and rules[full.pk] == f"chain of #{inc.pk}"


def test_retention_dry_run_says_what_keeps_each_backup_or_when_it_goes(db):
    server = make_server(retention_floor=1)
    old = backup(server, datetime(2026, 10, 1, 2, tzinfo=MALE))
    new = backup(server, datetime(2026, 12, 2, 2, tzinfo=MALE))
    with time_machine.travel(datetime(2026, 12, 3, 3, tzinfo=MALE), tick=False):
        out = StringIO()
        call_command("retention", "--dry-run", stdout=out)
        text = out.getvalue()
        out = StringIO()
        call_command("retention", "--dry-run", "--json", stdout=out)
    assert f"#{new.pk} maldives logical" in text and "kept: daily 2026-12-02 (until 2027-01-01)" in text
    assert f"#{old.pk} maldives logical" in text and "goes: 2026-12-03" in text
    plan = json.loads(out.getvalue().splitlines()[-1])["plan"]
    assert [(p["id"], p["kept_by"], p["goes"]) for p in plan] == [
        (new.pk, "daily 2026-12-02", None),
        (old.pk, None, "2026-12-03"),
    ]
    assert server.runs.good().count() == 2  # a dry run deletes nothing


def test_the_run_page_holds_and_the_changes_page_approves_by_a_second_person(db, client, alice, bob, charlie):
    from django.urls import reverse

    server = make_server()
    run = backup(server, datetime(2026, 6, 1, 2, tzinfo=MALE))
    client.force_login(charlie)  # an Auditor sees the run page, with no hold button, and may not hold
    assert b'id="hold-this"' not in client.get(reverse("run", args=[run.pk])).content
    assert client.post(reverse("run-hold", args=[run.pk]), {"reason": "x"}).status_code == 403

    client.force_login(alice)
    assert b'id="hold-this"' in client.get(reverse("run", args=[run.pk])).content
    client.post(reverse("run-hold", args=[run.pk]), {"reason": "case 2026-114"})
    page = client.get(reverse("run", args=[run.pk])).content.decode()
    assert "Legal hold" in page and "case 2026-114" in page and 'id="release"' in page
    client.post(reverse("run-release", args=[run.pk]), {"reason": "closed"})
    change = ChangeRequest.objects.get()
    assert "waiting for" in client.get(reverse("run", args=[run.pk])).content.decode()
    # Alice sees it waiting but gets no buttons; posting anyway is refused, journaled.
    assert f'id="approve-{change.pk}"' not in client.get(reverse("changes")).content.decode()
    assert client.post(reverse("change-approve", args=[change.pk])).status_code == 403
    assert JournalEntry.objects.filter(action="change_decision_refused", outcome="refused").count() == 1
    client.force_login(charlie)
    assert client.post(reverse("change-approve", args=[change.pk])).status_code == 403

    client.force_login(bob)
    assert f'id="approve-{change.pk}"' in client.get(reverse("changes")).content.decode()
    assert client.post(reverse("change-approve", args=[change.pk])).status_code == 302
    assert run.holds.active().count() == 0
    assert 'id="hold-this"' in client.get(reverse("run", args=[run.pk])).content.decode()


def test_the_server_page_shows_the_rule_of_each_backup_in_flat_queries(db, client, alice):
    import re

    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    from backups.models import BackupCopy, StorageLocation

    server = make_server(keep_monthly=3, retention_floor=1)
    nas = StorageLocation.objects.create(name="nas1", kind="nas", path="/nonexistent/nas1")
    client.force_login(alice)

    def copied(run):  # whether each backup restores is asked of its copies: in flat queries too
        BackupCopy.objects.create(run=run, location=nas, key=f"k{run.pk}", size=1, sha256="a" * 64, status="ok")

    def card():
        with CaptureQueriesContext(connection) as queries:
            page = client.get(reverse("server", args=[server.name])).content.decode()
        return re.search(r'<section class="card" id="retention">(.*?)</section>', page, re.S)[1], len(queries)

    with time_machine.travel(datetime(2026, 12, 3, 3, tzinfo=MALE), tick=False):
        copied(backup(server, datetime(2026, 12, 2, 2, tzinfo=MALE)))
        copied(backup(server, datetime(2026, 12, 1, 2, tzinfo=MALE), "base"))
        _, few = card()
        for month in range(1, 12):
            copied(backup(server, datetime(2026, month, 10, 2, tzinfo=MALE)))
            copied(backup(server, datetime(2026, month, 20, 2, tzinfo=MALE), "base"))
        text, many = card()
        listed = client.get(reverse("server-retention", args=[server.name])).content.decode()
    assert few == many
    assert "daily 2026-12-02" in text and "<small>until 2027-01-01</small>" in text
    assert "daily 2026-11-10" in text and "monthly 2026-10" in text  # November's is within the 30 days
    # 12 of each kind: December's, November's (both daily) and October's (monthly) are kept.
    going = text.split("<h3>Newest</h3>")[0]
    assert going.count("goes 2026-12-03") == 9 + 9
    assert "24 good backups: 18 goes on the next pass, 4 daily, 2 monthly." in text
    # The whole list, on a page of its own: every backup once, with its rule.
    assert listed.count("goes 2026-12-03") == 18 and listed.count("daily 2026-") == 4
    assert listed.count("monthly 2026-10") == 2


def test_the_retention_card_stays_small_with_thousands_of_backups(db, client, alice):
    """The card shows the counts, the next pass's deletions (at most 20) and the newest 10;
    the retention page shows the rest, 100 a page."""
    from django.urls import reverse

    server = make_server(retention_floor=1)
    first = datetime(2024, 12, 1, 2, tzinfo=MALE)  # the newest: 2026-10-31, older than the 30 days
    BackupRun.objects.bulk_create(
        BackupRun(server=server, kind="logical", status="succeeded", started_at=at, finished_at=at)
        for at in (first + timedelta(days=n) for n in range(700))
    )
    client.force_login(alice)
    with time_machine.travel(datetime(2026, 12, 3, 3, tzinfo=MALE), tick=False):
        page = client.get(reverse("server", args=[server.name])).content.decode()
        second = client.get(reverse("server-retention", args=[server.name]), {"page": 2}).content.decode()
        shown, rows = retention.card(server), retention.describe(server)
    # The card makes rows for the backups it shows alone: the same rows as the whole list's.
    gone = [row for row in rows if not row["kept_by"]]
    assert shown["newest"] == rows[:10] and shown["going"] == gone[:20] and shown["total"] == 700
    card = page.split('id="retention">')[1].split("</section>")[0]
    assert "700 good backups: 699 goes on the next pass, 1 floor." in card
    assert card.count("goes 2026-12-03") == 20 + 9 and "and 679 more" in card
    assert "page 2 of 7" in second and second.count("goes 2026-12-03") == 100


def test_a_held_backups_files_stay_on_their_location_until_the_release_is_approved(db, settings, tmp_path, alice, bob):
    from backups.models import BackupCopy, StorageLocation

    settings.BACKUP_ROOT = tmp_path
    StorageLocation.sync_from_settings()
    primary = StorageLocation.objects.get(name="primary")
    server = make_server(retention_floor=1)
    old = backup(server, datetime(2026, 6, 1, 2, tzinfo=MALE))
    backup(server, datetime(2026, 12, 2, 2, tzinfo=MALE))
    dump = tmp_path / "maldives" / "old.dump.gpg"
    dump.parent.mkdir()
    dump.write_bytes(b"not really a dump")
    BackupCopy.objects.create(run=old, location=primary, key="maldives/old.dump.gpg", size=17, status="ok")

    hold = BackupHold.place(old, alice, "case 9")
    at = datetime(2026, 12, 3, 3, tzinfo=MALE)
    with time_machine.travel(at, tick=False):
        call_command("retention", stdout=StringIO())
    assert dump.exists()
    hold.request_release(alice, "case closed").approve(bob)
    with time_machine.travel(at, tick=False):
        call_command("retention", stdout=StringIO())
    assert not dump.exists() and old.copies.get().status == "deleted"


def test_the_floor_counts_only_backups_that_still_restore(db, backup_root):
    """Three newer backups whose every copy the verify found corrupt do not fill the floor: the
    last one that restores stays."""
    from backups.models import BackupCopy, StorageLocation

    StorageLocation.sync_from_settings()
    primary = StorageLocation.objects.get(name="primary")
    server = make_server(logical_retention_days=7)  # a floor of 3
    now = datetime(2026, 12, 3, 3, tzinfo=MALE)
    restorable = backup(server, now - timedelta(days=20))
    BackupCopy.objects.create(run=restorable, location=primary, key="k0", size=1, sha256="a" * 64, status="ok")
    for n, days in enumerate((12, 11, 10), 1):
        corrupt = backup(server, now - timedelta(days=days))
        BackupCopy.objects.create(run=corrupt, location=primary, key=f"k{n}", size=1, sha256="b" * 64, status="bad")
    kept = {r.pk: rule for r, rule in retention.plan(server, now).items()}
    assert kept[restorable.pk] == "floor"
    # The floor's two other places go to the newest of the others (the verify may find them back).
    assert [rule for pk, rule in kept.items() if pk != restorable.pk] == ["floor", "floor", None]


def test_with_no_backup_that_restores_the_newest_others_still_fill_the_floor(db, backup_root):
    """Every copy marked missing while its mount was away: nothing is proven gone for good, and
    retention keeps the floor's newest as before, for the verify to find them again."""
    from backups.models import BackupCopy, StorageLocation

    StorageLocation.sync_from_settings()
    primary = StorageLocation.objects.get(name="primary")
    server = make_server(logical_retention_days=7)
    now = datetime(2026, 12, 3, 3, tzinfo=MALE)
    runs = [backup(server, now - timedelta(days=days)) for days in (20, 12, 11, 10)]
    for n, run in enumerate(runs):
        BackupCopy.objects.create(run=run, location=primary, key=f"k{n}", size=1, sha256="a" * 64, status="bad")
    kept = {r.pk: rule for r, rule in retention.plan(server, now).items()}
    assert [kept[r.pk] for r in runs] == [None, "floor", "floor", "floor"]
