"""The server page's charts: real aggregates, a constant number of queries."""

import re
from datetime import timedelta

from django.utils import timezone

from backups.models import BackupRun, Server, WalSegment
from restores.models import RestoreTest
from watching.charts import Chart, server_charts

NOW = timezone.now()


def test_charts_aggregate_per_day_and_hour_and_flag_what_crosses_the_objective(db, django_assert_max_num_queries):
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
    # One point per backup, oldest first: today's two are two bars, not their sum.
    assert [p[1] for p in size.points] == [1.0, 1.0, 3.0]  # MB
    assert [p[1] for p in duration.points] == [31.0, 30.0, 30.0]
    assert sum(v for _, v in wal.points) == 5.0
    svg = str(tests.svg())
    assert svg.count('class="bar over"') == 1 and "RTO objective 240 min" in svg


def test_an_empty_chart_says_so():
    assert "no data yet" in str(Chart("Nothing", []).svg())


def test_labels_are_escaped():
    assert "<script>" not in str(Chart("x", [("<script>", 1.0)]).svg())


def bars(svg):
    """(height, tooltip) of each bar."""
    return [(float(h), tip) for h, tip in re.findall(r'<rect [^>]*height="([\d.]+)"[^>]*><title>([^<]*)</title>', svg)]


def test_axes_say_what_they_measure_in_which_unit(db):
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/x")
    BackupRun.objects.create(
        server=server,
        kind="logical",
        status="succeeded",
        size=5 * 2**20,
        started_at=NOW - timedelta(seconds=42),
        finished_at=NOW,
    )
    RestoreTest.objects.create(server=server, status="passed", duration_s=0.6, started_at=NOW)
    size, duration, _, _, rto = (str(chart.svg()) for chart in server_charts(server, now=NOW))
    assert ">size (MB)</text>" in size and ">date</text>" in size and ">duration (seconds)</text>" in duration
    assert bars(size)[0][1].endswith(": 5 MB") and bars(duration)[0][1].endswith(": 42 s")
    assert ">duration (seconds, log)</text>" in rto and ">restore test date</text>" in rto
    # The value axis is ticked at round numbers, up to one above the largest value.
    assert re.findall(r'class="tick" text-anchor="end">([^<]+)<', size) == ["0", "2", "4", "6"]


def test_a_short_rto_shows_beside_an_objective_of_hours(db):
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/x")
    assert server.rto_critical_minutes == 240
    RestoreTest.objects.create(server=server, status="passed", duration_s=0.6, started_at=NOW - timedelta(days=1))
    RestoreTest.objects.create(server=server, status="passed", duration_s=20_000, started_at=NOW)
    rto = server_charts(server, now=NOW)[-1]
    svg = str(rto.svg())
    (short, _), (long, _) = bars(svg)
    assert short > 15 and long > short  # 0.6 s is 21 px on a log scale; on a linear one, 0.007 px
    assert svg.count('class="bar over"') == 1
    assert "RTO objective 240 min (14,400 s)" in svg
    ticks = re.findall(r'class="tick" text-anchor="end">([^<]+)<', svg)
    assert ticks == ["0.1", "1", "10", "100", "1,000", "10,000", "100,000"]
    objective = float(re.search(r'<line [^>]*y1="([\d.]+)"[^>]*class="objective"', svg)[1])
    assert 18 < objective < 230 - 48  # inside the plot


def test_many_backups_keep_their_labels_apart():
    chart = Chart("many", [(f"{d:02d} Jan", 1.0) for d in range(1, 31)], "MB")
    assert len(re.findall(r'text-anchor="middle">\d\d Jan<', str(chart.svg()))) <= 6
