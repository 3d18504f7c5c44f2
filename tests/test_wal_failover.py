"""After a failover the archive holds two branches of the same segment numbers: the old
primary's timeline 1 past the switch point, and the new primary's timeline 2. The WAL gap
check and WAL retention follow the lineage a PITR to latest follows (backups/timelines.py).

Real clusters: production on timeline 1, a copy of it restored and promoted onto timeline 2
that becomes the primary, the old primary going on writing on timeline 1 for a while (split
brain); both archive into production's spool.
"""

from datetime import timedelta

import psycopg
import pytest
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backups import binaries, retention, walchain, walhealth, walingest, walnames, walspool
from backups.models import BackupRun, WalSegment
from tests.helpers import (
    DB,
    archive_as_postgres,
    archive_some_wal,
    enable_push,
    rows,
    run_command,
    wait_archived,
    wait_for,
)
from tests.helpers import pitr as restore

pytest_plugins = ["tests.walfixtures"]


def on(port, sql):
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=DB, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else None


def switch(port, table):
    on(port, f"CREATE TABLE {table}(x int); INSERT INTO {table} VALUES (1)")
    return on(port, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]


def catalogued(server, name):
    walingest.ingest(server)
    return WalSegment.objects.filter(server=server, name=name, deleted_at=None).exists()


@pytest.fixture
def failover(server, sample_cluster, passphrase_file, backup_root, wal_spool, restored):
    """(server, base on timeline 1 before the switch, base on the old primary's branch after it, new
    primary's port). The portal's server is the new primary (timeline 2) at the end."""
    enable_push(sample_cluster)
    before = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    archive_some_wal(sample_cluster, tables=2)
    walingest.ingest(server)
    # The standby that takes over: a copy to latest, promoted onto timeline 2, archiving into the spool.
    copy, port = restored(), free_port()
    assert restore(copy, port, "--target", "latest")["status"] == "succeeded"
    command = walspool.archive_command(server).replace("'", "''")
    on(port, "ALTER SYSTEM SET archive_mode = 'on'")
    on(port, f"ALTER SYSTEM SET archive_command = '{command}'")
    proc = binaries.pg_ctl(copy, "restart", "-w", "-m", "fast", "-l", str(copy / "log" / "restart.log"), major=15)
    assert proc.returncode == 0, proc.stderr
    history = archive_as_postgres(server, copy / "pg_wal" / "00000002.history", "00000002.history")
    assert history.returncode == 0, history.stderr
    # The old primary goes on for a while on timeline 1, past the switch point, and is backed up there.
    for i in range(3):
        last = switch(sample_cluster.port, f"old_{i}")
    wait_archived(sample_cluster, last)
    after = BackupRun.objects.get(pk=run_command("backup", "maldives", "--kind", "base")["id"])
    assert after.status == "succeeded" and after.timeline == 1
    wait_archived(sample_cluster, switch(sample_cluster.port, "old_3"))
    # The new primary writes on timeline 2, over the same segment numbers.
    names = [switch(port, f"new_{i}") for i in range(6)]
    wait_for(lambda: catalogued(server, names[-1]), timeout=30, what="timeline 2's segments in the catalog")
    server.dsn = f"postgresql://postgres@127.0.0.1:{port}/{DB}"
    server.save(update_fields=["dsn"])
    server.refresh_from_db()
    return server, before, after, port


def test_a_segment_missing_on_the_new_timeline_is_a_gap_though_the_old_timeline_has_its_number(failover, restored):
    server, _, _, _ = failover
    assert walhealth.health(server)[0].get("wal_gap") is None
    size = server.wal_segment_size
    on_1 = set(
        WalSegment.objects.filter(server=server, timeline=1, segno__isnull=False).values_list("segno", flat=True)
    )
    on_2 = WalSegment.objects.filter(server=server, timeline=2, segno__isnull=False).order_by("segno")
    # Not the switch segment (the first of timeline 2): one the old primary archived too.
    lost = next(s for s in on_2[1:] if s.segno in on_1)
    WalSegment.objects.filter(pk=lost.pk).update(deleted_at=timezone.now())  # gone from the catalog

    assert lost.name == walnames.segment_name(2, lost.segno, size)
    message = walhealth.health(server)[0].get("wal_gap")
    assert message, f"{lost.name} is missing and the WAL health finds no gap"
    assert f"segment {lost.name} (timeline 2) is missing" in message and "PITR cannot cross it" in message
    # What the gap check says is what a PITR to latest finds.
    result = restore(restored(), free_port(), "--target", "latest")
    assert result["status"] == "refused", result
    assert f"WAL segment {lost.name} is missing" in result["error"], result


def age(run, days, now):
    """Make a run look `days` old in the catalog, on both clocks."""
    when = now - timedelta(days=days)
    run.finished_at = when
    run.details.update(stop_time=when.isoformat(), stop_time_portal=when.isoformat())
    run.save(update_fields=["finished_at", "details"])


def test_wal_retention_anchors_on_a_base_of_the_current_timeline_not_the_old_primarys_branch(failover, restored):
    server, before, after, port = failover
    server.retention_floor, server.base_retention_days = 1, 15  # the older base goes unless it anchors
    server.save(update_fields=["retention_floor", "base_retention_days"])
    size, now = server.wal_segment_size, timezone.now()
    # 20 and 9 days old; the WAL before the old primary's base archived 15 days ago: the window
    # (7 days) starts after both bases.
    age(before, 20, now)
    age(after, 9, now)
    start = walnames.segno_of(after.start_wal, size)
    WalSegment.objects.filter(server=server, segno__lt=start).update(archived_at=now - timedelta(days=15))

    plan = retention.plan(server, now)
    assert plan[next(r for r in plan if r.pk == before.pk)] == "start of the WAL window"
    result = retention.wal_retention(server, now, dry_run=False, actor="test")
    assert result["kept_from"] == before.start_wal, result

    lineage = walchain.Lineage.of(2, walchain.history_text(server, 2), size)
    assert str(lineage) == "1 -> 2"
    first = walnames.segno_of(before.start_wal, size)
    assert walchain.missing_segments(server, first, walchain.last_segno(server, lineage), lineage) == []
    # PITR to latest on timeline 2 starts from the base before the switch and replays through it.
    into = free_port()
    result = restore(restored(), into, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert rows(into, "SELECT count(*) FROM new_5") == [(1,)]


def test_the_wal_chain_starts_from_a_base_on_productions_timelines_not_the_old_primarys_branch(failover):
    """Found by reading the code: the WAL chain run took the oldest kept base by name, and after a
    failover a name's timeline comes first: the old primary's base on the branch it left sorted
    before every base of timeline 2. Once the base before the switch had gone, the chain was
    checked from that branch's base, across WAL that retention had rightly let go (no PITR to
    latest starts before timeline 2's base), and the run failed on a gap that PITR never crosses."""
    server, before, after, _ = failover
    new = run_command("backup", "maldives", "--kind", "base")
    assert new["status"] == "succeeded", new
    new = BackupRun.objects.get(pk=new["id"])
    assert new.timeline == 2
    now, size = timezone.now(), server.wal_segment_size
    BackupRun.objects.filter(pk=before.pk).update(deleted_at=now)  # expired: timeline 2's base is the oldest PITR uses
    start = walnames.segno_of(new.start_wal, size)
    between = WalSegment.objects.filter(server=server, timeline=2, segno__lt=start, segno__gt=0)
    assert between.exists() and walnames.segno_of(after.start_wal, size) < start
    between.update(deleted_at=now)  # what retention lets go: no PITR to latest starts before `new`

    chain = run_command("backup", "maldives", "--kind", "incremental")
    assert chain["status"] == "succeeded", chain.get("error")
    run = BackupRun.objects.get(pk=chain["id"])
    assert run.details["chain_base_run"] == new.pk and run.details["chain_from"] == new.start_wal
