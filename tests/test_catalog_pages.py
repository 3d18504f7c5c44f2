"""The catalogs stay fast with a million WAL segments (and their copies, and a journal as long):
the same few queries whatever the number of rows, none per row, no COUNT(*) or DISTINCT over the
whole table, and (on PostgreSQL) index scans for the lists a DBA filters by server, day, location
or status. Timings are the benchmarks' business; this counts queries and reads their plans."""

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from backups.models import BackupCopy, Server, StorageLocation, WalSegment
from tests.helpers import make_user

pytestmark = pytest.mark.django_db
POSTGRES = connection.vendor == "postgresql"
# PostgreSQL loads a million rows with one INSERT ... SELECT in well under a minute; SQLite gets fewer.
SMALL, LARGE = (2_000, 1_000_000) if POSTGRES else (2_000, 200_000)
# Copies: one per segment here (three tiers make three times as many in production).
COPIES = 300_000 if POSTGRES else 50_000
# The segments of one load are spread over this many days before "now".
DAYS = 7
CHANGELIST = reverse("admin:backups_walsegment_changelist")


def load_segments(server, first, n):
    """n catalogued segments of server, numbers first.. first+n-1, archived evenly over DAYS days,
    made by the database itself (generate_series / a recursive CTE): no Python loop per row."""
    end = timezone.now()
    step_us = int(DAYS * 86400 * 1e6 / n)
    table = WalSegment._meta.db_table
    columns = "server_id, timeline, name, segno, size, sha256, key, archived_at, ingested_at, source"
    if POSTGRES:
        sql = f"""
            INSERT INTO {table} ({columns})
            SELECT %s, 1, '00000001' || lpad(upper(to_hex(g / 256)), 8, '0') || lpad(upper(to_hex(g %% 256)), 8, '0'),
                   g, 16777216, md5(g::text) || md5(g::text), '',
                   %s - (%s - g)::bigint * %s * interval '1 microsecond', %s, 'push'
            FROM generate_series(%s, %s) AS g"""
        params = [server.pk, end, first + n, step_us, end, first, first + n - 1]
    else:
        sql = f"""
            WITH RECURSIVE g(x) AS (SELECT %s UNION ALL SELECT x + 1 FROM g WHERE x < %s)
            INSERT INTO {table} ({columns})
            SELECT %s, 1, printf('00000001%%08X%%08X', x / 256, x %% 256), x, 16777216,
                   printf('%%064x', x), '',
                   strftime('%%Y-%%m-%%d %%H:%%M:%%f', %s, '-' || ((%s - x) * %s / 1000000.0) || ' seconds'), %s, 'push'
            FROM g"""
        params = [first, first + n - 1, server.pk, end.strftime("%Y-%m-%d %H:%M:%S.%f"), first + n, step_us, end]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if POSTGRES:
            cursor.execute(f"ANALYZE {table}")  # what autovacuum does after a load, before the pages are read


def pages(server, other):
    """The lists a DBA opens: everything, one server, one server's day, a deep page, another server."""
    day = timezone.localdate() - timedelta(days=2)
    by_server = {"server__id__exact": server.pk}
    return {
        "everything": {},
        "server": by_server,
        "server and day": by_server | {"archived_on": day.isoformat()},
        "day": {"archived_on": day.isoformat()},
        "deep page": by_server | {"p": "15"},
        "other server": {"server__id__exact": other.pk},
        "search": {"q": "00000001000000000000000a"},  # segment 10, typed in lower case
    }


def capture(client, params, url=CHANGELIST):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, params)
    assert response.status_code == 200, response.content[-2000:]
    return response, [q["sql"] for q in queries.captured_queries]


def explain(sql):
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql)
        return "\n".join(row[0] for row in cursor.fetchall())


def full_counts(sqls, table):
    """COUNT(*) over the table that no LIMIT bounds: the query that grows with the table."""
    return [s for s in sqls if re.search(r"COUNT\(", s, re.I) and table in s and "LIMIT" not in s]


def assert_same_few_queries(small, large, table):
    for name, (response, sqls) in large.items():
        assert len(sqls) == len(small[name][1]), (name, sqls, small[name][1])  # nothing per row, nothing per size
        assert len(sqls) <= 12, (name, sqls)
        assert not full_counts(sqls, table), (name, full_counts(sqls, table))
        assert "Traceback" not in response.content.decode()


def assert_index_scans(pages, names, table):
    """On PostgreSQL, no query of the filtered pages reads the table from end to end."""
    if not POSTGRES:
        return
    for name in names:
        for sql in pages[name][1]:
            if table in sql:
                plan = explain(sql)
                assert f"Seq Scan on {table}" not in plan, (name, sql, plan)


def test_the_wal_catalog_runs_the_same_few_queries_for_two_thousand_or_a_million_segments(client):
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/db", archiving="push")
    other = Server.objects.create(name="addu", dsn="postgresql://postgres@127.0.0.1:2/db", archiving="pull")
    client.force_login(make_user("alice", "DBA"))
    load_segments(server, 1, SMALL)
    load_segments(other, 1, 50)
    small = {name: capture(client, params) for name, params in pages(server, other).items()}

    load_segments(server, SMALL + 1, LARGE - SMALL)
    assert WalSegment.objects.filter(server=server).count() == LARGE
    large = {name: capture(client, params) for name, params in pages(server, other).items()}

    assert_same_few_queries(small, large, "backups_walsegment")

    # The pages show what they say: the newest segment first, the day's segments only.
    newest = WalSegment.objects.filter(server=server).order_by("-archived_at").first()
    assert newest.name in large["server"][0].content.decode()
    day_page = large["server and day"][0].content.decode()
    day = timezone.localdate() - timedelta(days=2)
    in_day = WalSegment.objects.filter(server=server, archived_at__date=day).order_by("-archived_at")
    assert in_day.first().name in day_page and newest.name not in day_page
    assert "10000+" in large["server"][0].content.decode()  # counted no further than the cap
    assert "addu" in large["other server"][0].content.decode()
    found = large["search"][0].content.decode()
    assert found.count("00000001000000000000000A") == 2 and "2 WAL segments" in found  # one per server

    filtered = ["everything", "server", "server and day", "day", "deep page", "other server", "search"]
    assert_index_scans(large, filtered, "backups_walsegment")


def load_copies(location, server, first_segno):
    """One copy in location of each of server's segments from first_segno on; one in a thousand bad."""
    copy, segment = BackupCopy._meta.db_table, WalSegment._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO {copy} (wal_segment_id, location_id, artifact, key, size, sha256, status, attempts,
                                    last_error, created_at)
                SELECT id, %s, 'wal', name, size, sha256, CASE WHEN segno %% 1000 = 0 THEN 'bad' ELSE 'ok' END, 1,
                       '', archived_at
                FROM {segment} WHERE server_id = %s AND segno >= %s""",
            [location.pk, server.pk, first_segno],
        )
        if POSTGRES:
            cursor.execute(f"ANALYZE {copy}")


def test_the_copies_catalog_runs_the_same_few_queries_whatever_its_size(client):
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/db", archiving="push")
    wal = StorageLocation.objects.get(name="wal")  # made by migrate from WAL_ROOT
    s3 = StorageLocation.objects.create(name="offsite", kind="s3", bucket="b")
    client.force_login(make_user("alice", "DBA"))
    url = reverse("admin:backups_backupcopy_changelist")
    lists = {
        "everything": {},
        "location": {"location__id__exact": s3.pk},
        "bad": {"status__exact": "bad"},
        "bad in a location": {"status__exact": "bad", "location__id__exact": wal.pk},
        "deep page": {"p": "15"},
    }
    load_segments(server, 1, SMALL)
    load_copies(wal, server, 1)
    load_copies(s3, server, 1)
    small = {name: capture(client, params, url) for name, params in lists.items()}

    load_segments(server, SMALL + 1, COPIES - SMALL)
    load_copies(wal, server, SMALL + 1)
    load_copies(s3, server, SMALL + 1)
    assert BackupCopy.objects.count() == 2 * COPIES
    large = {name: capture(client, params, url) for name, params in lists.items()}

    assert_same_few_queries(small, large, "backups_backupcopy")
    assert_index_scans(large, ["everything", "location", "bad", "bad in a location", "deep page"], "backups_backupcopy")
    bad = large["bad"][0].content.decode()
    newest_bad = (COPIES // 1000) * 1000
    assert f"00000001{newest_bad // 256:08X}{newest_bad % 256:08X}" in bad
    assert f"{2 * (COPIES // 1000)} backup copies" in bad


def test_a_filter_value_that_is_not_understood_is_a_message_not_an_error(client):
    client.force_login(make_user("alice", "DBA"))
    response = client.get(CHANGELIST, {"archived_on": "yesterday"}, follow=True)
    assert response.status_code == 200
    assert "is not a day: use YYYY-MM-DD" in response.content.decode()
    # Django's own filters send a value they cannot use to ?e=1, the whole list, silently: not here.
    runs = reverse("admin:backups_backuprun_changelist")
    response = client.get(runs, {"created_at__gte": "not a date"}, follow=True)
    assert response.status_code == 200 and "was not understood" in response.content.decode()
    assert "was not understood" not in client.get(runs).content.decode()


def populate(n, start):
    """n servers, each with two runs (main file on two tiers), two WAL segments and a verification."""
    from backups.models import BackupRun, Verification

    primary, wal = StorageLocation.objects.get(name="primary"), StorageLocation.objects.get(name="wal")
    now = timezone.now()
    for i in range(start, start + n):
        server = Server.objects.create(name=f"db{i}", dsn=f"postgresql://postgres@127.0.0.1:{i + 1}/db")
        for k in range(2):
            run = BackupRun.objects.create(
                server=server,
                kind="logical",
                status="succeeded",
                size=10240 * (k + 1),
                sha256=f"{i:04d}" + "c" * 60,
                started_at=now - timedelta(minutes=3),
                finished_at=now - timedelta(minutes=1),
            )
            for location, status in ((primary, "ok"), (wal, "failed")):
                BackupCopy.objects.create(run=run, location=location, key=f"k{run.pk}", size=run.size, status=status)
            Verification.objects.create(run=run, status="verified", copies_checked=2, copies_total=2)
        for segno in (1, 2):
            segment = WalSegment.objects.create(
                server=server,
                timeline=1,
                name=f"0000000100000000000000{segno:02X}",
                segno=segno,
                size=16 * 1024 * 1024,
                sha256="e" * 64,
                archived_at=now,
            )
            BackupCopy.objects.create(
                wal_segment=segment, location=wal, key=segment.name, size=segment.size, status="ok"
            )


def test_every_catalog_list_runs_the_same_queries_for_a_few_rows_or_many(client):
    client.force_login(make_user("alice", "DBA"))
    lists = ["server", "backuprun", "backupcopy", "walsegment", "verification"]
    urls = {name: reverse(f"admin:backups_{name}_changelist") for name in lists}
    populate(3, 0)
    few = {name: capture(client, {}, url) for name, url in urls.items()}
    populate(30, 3)
    many = {name: capture(client, {}, url) for name, url in urls.items()}
    for name in lists:
        assert len(many[name][1]) == len(few[name][1]), (name, many[name][1])

    runs = many["backuprun"][0].content.decode()
    # Human sizes and shortened sha256 (whichever runs are newest, on the first page).
    assert re.search(r"\d+\.\d\xa0KB", runs) and re.search(r"\d{4}c{8}", runs) and "c" * 13 not in runs
    assert "primary ok" in runs and "wal failed" in runs  # where the copies are
    assert "wal ok" in many["walsegment"][0].content.decode() and "16.0\xa0MB" in many["walsegment"][0].content.decode()
    assert "1\xa0minute ago" in many["server"][0].content.decode()  # the newest good logical backup


def load_journal(first, n):
    """n journal entries in one statement (unsigned: the admin list does not check the chain)."""
    columns = "at, actor, action, object_type, object_id, object_repr, server, outcome, details, prev_hmac, hmac"
    if POSTGRES:
        numbers = "generate_series(%s, %s) AS g(x)"
        at = "now() - (%s - x) * interval '1 second'"
    else:
        numbers = "(WITH RECURSIVE g(x) AS (SELECT %s UNION ALL SELECT x + 1 FROM g WHERE x < %s) SELECT x FROM g)"
        at = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || (%s - x) || ' seconds')"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO backupportal_journalentry ({columns})
                SELECT {at}, 'job:backup', CASE WHEN x %% 2 = 0 THEN 'backup_started' ELSE 'copy_made' END,
                       'backups.BackupRun', x, 'run', 'maldives', 'ok', '{{}}', '', ''
                FROM {numbers}""",
            [first + n, first, first + n - 1],
        )
        if POSTGRES:
            cursor.execute("ANALYZE backupportal_journalentry")


def test_the_journal_admin_list_does_not_count_or_scan_the_whole_journal(client):
    client.force_login(make_user("charlie", "Auditor"))
    url = reverse("admin:backupportal_journalentry_changelist")
    lists = {"everything": {}, "action": {"action": "copy_made"}, "deep page": {"p": "15"}}
    load_journal(1, SMALL)
    few = {name: capture(client, params, url) for name, params in lists.items()}
    load_journal(SMALL + 1, COPIES - SMALL)
    many = {name: capture(client, params, url) for name, params in lists.items()}

    assert_same_few_queries(few, many, "backupportal_journalentry")
    for name, (_, sqls) in many.items():
        assert not [s for s in sqls if "DISTINCT" in s.upper() and "backupportal_journalentry" in s], name
    assert_index_scans(many, list(lists), "backupportal_journalentry")
    assert "10000+" in many["action"][0].content.decode()
