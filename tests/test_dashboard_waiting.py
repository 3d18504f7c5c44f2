"""The dashboard's "Waiting for you": restore requests and change requests another DBA or Sysadmin
must decide on, open alerts to acknowledge, overdue maintenance; and its alert counts, which are the
alerts page's counts."""

import datetime
import re
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from backups.models import ChangeRequest, Server
from restores.models import RestoreRequest
from watching import maintenance
from watching.models import Alert, MaintenanceTask

TODAY = datetime.date(2026, 1, 20)
NOON = datetime.datetime.combine(TODAY, datetime.time(12), tzinfo=ZoneInfo("Indian/Maldives"))


@pytest.fixture
def maldives(db):
    return Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/maldives")


def request_restore(server, user, **fields):
    fields = {"destination": "new_database", "target_database": "copy"} | fields
    return RestoreRequest.objects.create(server=server, reason="a table was dropped", requested_by=user, **fields)


def panel(client, user):
    client.force_login(user)
    with time_machine.travel(NOON, tick=False):
        response = client.get(reverse("dashboard"))
    assert response.status_code == 200
    return re.search(r'<section class="card" id="waiting">(.*?)</section>', response.content.decode(), re.S)[1]


def items(html, kind):
    """The links of one kind of item in the panel."""
    return re.findall(rf'<li class="{kind}">.*?<a href="([^"]+)"', html, re.S)


def test_a_dba_sees_the_other_dbas_request_to_decide_and_his_own_as_waiting(client, alice, bob, charlie, maldives):
    mine, theirs = request_restore(maldives, alice), request_restore(maldives, bob)
    RestoreRequest.objects.create(
        server=maldives, destination="new_database", reason="done", requested_by=bob, status="approved"
    )
    html = panel(client, alice)
    assert items(html, "to-decide") == [theirs.get_absolute_url()]
    assert items(html, "own-request") == [mine.get_absolute_url()]
    assert "approve or reject" in html and "waiting for another DBA" in html
    assert items(panel(client, bob), "to-decide") == [mine.get_absolute_url()]
    # Charlie audits: nothing waits for him, though he reads the requests on their page.
    html = panel(client, charlie)
    assert items(html, "to-decide") == items(html, "own-request") == []
    assert "Nothing waits for you." in html


def test_each_request_says_where_it_restores_into_as_its_approver_approves_it(client, alice, bob, maldives):
    """The HOST:PORT recorded with the request, the place the approver approves, is on the panel:
    a replace of production, a new database on another server, a sandbox cluster (no place)."""
    staging = Server.objects.create(name="staging", dsn="postgresql://postgres@10.0.0.7:6543/x")
    replace = request_restore(maldives, bob, destination="replace", target_database="")
    elsewhere = request_restore(maldives, bob, target_database="copy_0120", into_server=staging)
    sandbox = request_restore(maldives, alice, destination="sandbox_cluster", target_database="")
    html = panel(client, alice)
    lines = dict(
        re.findall(r'<li class="(?:to-decide|own-request)">.*?<a href="([^"]+)">.*?</a>(.*?)</li>', html, re.S)
    )
    assert (
        "maldives, replace the production database on maldives at <code>127.0.0.1:1</code>,"
        in lines[replace.get_absolute_url()]
    )
    assert (
        "maldives, a new database (copy_0120) on staging at <code>10.0.0.7:6543</code>,"
        in lines[elsewhere.get_absolute_url()]
    )
    assert "maldives, a new sandbox cluster (pitr)," in lines[sandbox.get_absolute_url()]
    assert " at <code>" not in lines[sandbox.get_absolute_url()]


def request_change(server, user, **changes):
    kind = ChangeRequest.Kind.SHORTEN_RETENTION
    return ChangeRequest.open(
        kind, server, user, "disk is full", {k: {"from": 30, "to": v} for k, v in changes.items()}
    )


def test_change_requests_wait_for_another_dba_or_sysadmin_never_their_requester(
    client, alice, bob, sam, charlie, maldives
):
    mine = request_change(maldives, alice, base_retention_days=7)
    hr = Server.objects.create(name="hr", dsn="postgresql://postgres@127.0.0.1:1/hr")
    theirs = request_change(hr, sam, logical_retention_days=14)
    theirs_url = f"{reverse('changes')}#change-{theirs.pk}"
    mine_url = f"{reverse('changes')}#change-{mine.pk}"
    html = panel(client, alice)
    assert items(html, "change-to-decide") == [theirs_url]
    assert items(html, "own-change") == [mine_url]
    assert "logical retention days: 30 -&gt; 14" in html
    assert items(panel(client, bob), "change-to-decide") == [mine_url, theirs_url]
    assert items(panel(client, sam), "change-to-decide") == [mine_url]
    html = panel(client, charlie)  # an auditor decides nothing
    assert items(html, "change-to-decide") == items(html, "own-change") == []
    theirs.approve(bob)
    assert items(panel(client, alice), "change-to-decide") == []


def test_open_alerts_and_overdue_maintenance_link_to_where_they_are_handled(client, sam, charlie, maldives):
    with time_machine.travel(NOON, tick=False):
        maintenance.check_overdue()  # the strategy review was due on 2025-12-02
    review = MaintenanceTask.objects.get(kind="strategy_review")
    overdue_alert = Alert.objects.get(condition="maintenance_overdue")
    rpo = Alert.objects.create(condition="rpo_breached", subject="server:maldives", server=maldives, message="m")
    Alert.objects.create(
        condition="backup_failed", subject="server:maldives", server=maldives, message="m", state="acknowledged"
    )
    html = panel(client, sam)
    assert items(html, "to-acknowledge") == [overdue_alert.get_absolute_url(), rpo.get_absolute_url()]
    assert items(html, "overdue") == [reverse("maintenance-complete", args=[review.pk])]
    assert "due 2025-12-02, 49 days ago" in html
    # An auditor acknowledges nothing and completes nothing.
    html = panel(client, charlie)
    assert items(html, "to-acknowledge") == items(html, "overdue") == []


def test_the_open_alerts_count_is_what_the_alerts_page_lists_as_open(client, charlie, maldives):
    with time_machine.travel(NOON, tick=False):
        maintenance.check_overdue()  # an alert about a task: no server, so no server card counts it
    Alert.objects.create(condition="rpo_breached", subject="server:maldives", server=maldives, message="m")
    Alert.objects.create(
        condition="backup_failed", subject="server:maldives", server=maldives, message="m", state="acknowledged"
    )
    Alert.objects.create(condition="wal_gap", subject="server:maldives", server=maldives, message="m", state="resolved")
    html = panel(client, charlie)
    assert "2 open</a>, " in html and "1 acknowledged</a>" in html
    listed = client.get(reverse("alerts"), {"state": "open"}).context["page"]
    assert listed.paginator.count == 2
    assert {a.condition for a in listed} == {"maintenance_overdue", "rpo_breached"}
    assert client.get(reverse("alerts"), {"state": "acknowledged"}).context["page"].paginator.count == 1
    # The server's card counts its own the same way: the acknowledged one is not open.
    card = client.get(reverse("dashboard")).content.decode()
    assert re.search(r'<tr class="alerts">.*?>1 open</a>, 1 acknowledged', card, re.S)


def count_queries(client):
    with CaptureQueriesContext(connection) as queries, time_machine.travel(NOON, tick=False):
        assert client.get(reverse("dashboard")).status_code == 200
    return len(queries)


def test_the_panel_costs_the_same_queries_for_one_item_of_each_kind_or_many(client, alice, bob, maldives):
    request_restore(maldives, bob)
    request_restore(maldives, alice)
    request_change(maldives, bob, keep_weekly=0)
    Alert.objects.create(condition="rpo_breached", subject="server:maldives", server=maldives, message="m")
    MaintenanceTask.objects.create(kind="weekly_verify", due_on=TODAY - datetime.timedelta(days=3))
    client.force_login(alice)
    one = count_queries(client)
    for n in range(2, 6):
        other = Server.objects.create(name=f"s{n}", dsn="postgresql://postgres@127.0.0.1:1/x")
        request_restore(maldives, bob, into_server=other)
        request_restore(maldives, alice, into_server=other)
        request_change(other, bob, keep_yearly=0)
        Alert.objects.create(condition="wal_gap", subject=f"server:s{n}", message="m")
    for kind in ("monthly_restore_test", "annual_dr_drill", "strategy_review"):
        MaintenanceTask.objects.create(kind=kind, due_on=TODAY - datetime.timedelta(days=1))
    assert count_queries(client) == one
