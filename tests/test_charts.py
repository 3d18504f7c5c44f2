"""The server page's charts: real aggregates, a constant number of queries."""

from datetime import timedelta

from django.utils import timezone

from backups.models import BackupRun, WalSegment
from restores.models import RestoreTest
from watching.charts import Chart, server_charts


def test_charts_aggregate_per_day_and_hour_and_flag_what_crosses_the_objective(db, django_assert_max_num_queries):
    from backups.models import Server

    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/x")
    now = timezone.now()
    for days, size in [(0, 2**20), (0, 3 * 2**20), (1, 2**20)]:
        end = now - timedelta(days=days)
        BackupRun.objects.create(
            server=server,
            kind="logical",
            status="succeeded",
            size=size,
            started_at=end - timedelta(seconds=30 + days),
            finished_at=end,
        )
    for i in range(5):
        WalSegment.objects.create(
            server=server,
            timeline=1,
            name=f"{i:024X}",
            size=2**20,
            sha256="0" * 64,
            archived_at=now - timedelta(minutes=10 * i),
        )
    RestoreTest.objects.create(server=server, status="passed", duration_s=120)
    RestoreTest.objects.create(server=server, status="passed", duration_s=server.rto_critical_minutes * 60 + 1)
    from watching.models import RpoSample

    RpoSample.record(server, now - timedelta(hours=2), 60)
    RpoSample.record(server, now - timedelta(hours=2), 1200)  # the worst of the hour is kept
    RpoSample.record(server, now - timedelta(hours=2), 30)
    RpoSample.record(server, now, 0)
    with django_assert_max_num_queries(4):
        size, duration, wal, rpo, tests = server_charts(server, now=now)
    assert [v for _, v in rpo.points] == [20.0, 0.0]
    assert str(rpo.svg()).count('class="bar over"') == 1  # 20 min against the 15 min objective
    assert [v for _, v in size.points] == [1.0, 4.0]  # MiB per day, oldest first
    assert [v for _, v in duration.points] == [31.0, 30.0]
    assert sum(v for _, v in wal.points) == 5.0
    svg = str(tests.svg())
    assert svg.count('class="bar over"') == 1 and "RTO objective 240 min" in svg


def test_an_empty_chart_says_so():
    assert "no data yet" in str(Chart("Nothing", []).svg())


def test_labels_are_escaped():
    assert "<script>" not in str(Chart("x", [("<script>", 1.0)]).svg())
