"""The server page shows backup chains: each full base backup, then the incrementals taken on top
of it (block-level on 17+, WAL-chain checks on 15 and 16) with their sizes, times and parents;
the 08:00/14:00/20:00 schedule; the incremental retention, a per-server setting. Catalog rows
only: no cluster is needed to read the catalog."""

import re
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from backups import retention
from backups.models import BackupRun, Server

NOW = timezone.now()


def make_server(name="maldives", version=180006):
    return Server.objects.create(
        name=name, dsn="postgresql://postgres@127.0.0.1:1/postgres", pg_version=version, archiving="push"
    )


def run(server, kind, hours_ago, size, parent=None, status="succeeded"):
    details = {}
    if kind == "incremental":
        details = {"method": "block", "parent": parent.pk} if parent else {"method": "wal-chain"}
    finished = NOW - timedelta(hours=hours_ago)
    return BackupRun.objects.create(
        server=server,
        kind=kind,
        status=status,
        size=size,
        started_at=finished - timedelta(seconds=30),
        finished_at=finished,
        details=details,
    )


def chain_card(client, server):
    page = client.get(reverse("server", args=[server.name]))
    assert page.status_code == 200
    return re.search(r'<section class="card" id="chains">(.*?)</section>', page.content.decode(), re.S)[1]


def listed_runs(card):
    """The run numbers of the card's rows, in order."""
    return [int(n) for n in re.findall(r'<a href="/runs/(\d+)/">\d+</a>', card)]


@pytest.fixture
def block_chains(db):
    """Two chains of an 18 server: yesterday's full and two incrementals, today's full and one."""
    server = make_server()
    old = run(server, "base", 30, 800 * 2**20)
    old_1 = run(server, "incremental", 24, 12 * 2**20, old)
    old_2 = run(server, "incremental", 18, 9 * 2**20, old_1)
    full = run(server, "base", 6, 810 * 2**20)
    new_1 = run(server, "incremental", 1, 3 * 2**20, full)
    run(server, "incremental", 0.5, 1, full, status="failed")  # failed: not a link
    return server, [full, new_1, old, old_1, old_2]


def test_the_chain_card_lists_each_full_then_its_incrementals_in_order_with_sizes_and_parents(
    client, charlie, block_chains
):
    server, (full, new_1, old, old_1, old_2) = block_chains
    client.force_login(charlie)  # an auditor reads it
    card = chain_card(client, server)
    # Newest chain first; in a chain, the full and then its incrementals, oldest first.
    assert listed_runs(card) == [full.pk, new_1.pk, old.pk, old_1.pk, old_2.pk]
    assert "810.0\xa0MB" in card and "12.0\xa0MB" in card and "9.0\xa0MB" in card
    assert f'against <a href="{old_1.get_absolute_url()}">#{old_1.pk}</a>' in card  # the second link's parent
    assert f'against <a href="{old.get_absolute_url()}">#{old.pk}</a>' in card
    assert "the chain: 821.0\xa0MB" in card  # 800 + 12 + 9: what a restore to its newest link reads
    assert "30.0 s" in card  # durations
    assert "pg_combinebackup" in card and "WAL-chain check" not in card
    assert "at 08:00, 14:00 and 20:00, every day" in card and "<code>0 8,14,20 * * *</code>" in card
    assert "at 02:30, every day" in card
    assert "incrementals 7 days" in card


def test_a_postgresql_15_server_says_its_incrementals_are_wal_chain_checks_and_why(client, alice, db):
    server = make_server(version=150014)
    full = run(server, "base", 10, 500 * 2**20)
    check = run(server, "incremental", 4, 48 * 2**20)
    client.force_login(alice)
    card = chain_card(client, server)
    assert "PostgreSQL 15.14 has no block-level incremental backups: they came with PostgreSQL 17" in card
    assert "Here an incremental is a WAL-chain check" in card
    assert listed_runs(card) == [full.pk, check.pk]
    assert "48.0\xa0MB of WAL" in card and "WAL-chain check" in card and "the chain:" not in card
    page = client.get(reverse("server", args=[server.name])).content.decode()
    assert "Incremental backup <small>WAL-chain check</small>" in page  # the schedules card too
    run_page = client.get(check.get_absolute_url()).content.decode()
    assert "Incremental · WAL-chain check" in run_page
    # A run from before the method was recorded (only 15 was run then) is a WAL-chain check too.
    check.details = {}
    check.save()
    assert check.method_display == "WAL-chain check" and check.parent_run_id is None


def test_the_run_page_and_the_runs_lists_say_block_level_against_which_run(client, sam, block_chains):
    server, (full, new_1, *_rest) = block_chains
    client.force_login(sam)  # a sysadmin reads them too
    expected = f'block-level against <a href="{full.get_absolute_url()}">#{full.pk}</a>'
    assert f"Incremental · {expected}" in client.get(new_1.get_absolute_url()).content.decode()
    newest = client.get(reverse("server", args=[server.name])).content.decode().split("<h2>Newest runs")[1]
    assert expected in newest
    changelist = client.get(reverse("admin:backups_backuprun_changelist")).content.decode()
    assert f"block-level against #{full.pk}" in changelist and "Incremental (WAL chain)" not in changelist


def test_an_incremental_whose_parent_is_gone_is_shown_as_a_broken_link(client, alice, block_chains):
    server, (full, new_1, *_rest) = block_chains
    BackupRun.objects.filter(pk=full.pk).update(deleted_at=NOW)  # as if deleted by hand
    client.force_login(alice)
    card = chain_card(client, server)
    assert "Incrementals whose parent is not listed here" in card
    assert f"broken link: #{full.pk} is not kept, nothing restores past it" in card


def test_the_server_page_costs_the_same_queries_for_one_chain_or_five_long_ones(client, alice, db):
    server = make_server()
    full = run(server, "base", 200, 1)
    run(server, "incremental", 199, 1, full)
    client.force_login(alice)
    url = reverse("server", args=[server.name])

    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url).status_code == 200
        return [q["sql"] for q in captured.captured_queries]

    queries()  # the first visit records the DSN's database (watching.coverage)
    one = queries()
    for day in range(5):
        parent = run(server, "base", 150 - 24 * day, 1)
        for hour in range(1, 8):
            parent = run(server, "incremental", 150 - 24 * day - hour, 1, parent)
    run(server, "incremental", 2, 1)  # a WAL-chain check of before an upgrade to 18
    assert len(listed_runs(chain_card(client, server))) == 5 + 5 * 7 + 1  # the five newest chains
    assert len(queries()) == len(one)


def test_incremental_retention_is_a_setting_of_each_server_of_at_least_one_day(db):
    server = make_server()
    assert server.incremental_retention_days == 7  # the strategy's
    older = run(server, "base", 24 * 4, 1)
    older_1 = run(server, "incremental", 24 * 3, 1, older)
    newer = run(server, "base", 24 * 1.5, 1)
    run(server, "incremental", 12, 1, newer)

    def doomed():
        return {d["id"] for d in retention.apply(now=NOW, dry_run=True)}

    assert doomed() == set()
    server.incremental_retention_days = 2
    server.save()
    assert doomed() == {older_1.pk}  # its full is kept by the base retention (30 days)
    server.incremental_retention_days = 0
    with pytest.raises(ValidationError) as refused:
        server.clean_fields()
    assert list(refused.value.message_dict) == ["incremental_retention_days"]
