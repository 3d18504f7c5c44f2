"""Achieved RPO against real clusters: WAL that piles up unarchived breaches the objective; an idle
server whose WAL is all archived never does, however long it stays idle."""

import subprocess
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from backups.models import Server
from tests.helpers import mails, ours, register, wait_for
from watching.dashboard import server_health
from watching.models import Alert, RpoStatus
from watching.monitor import run_once
from watching.rpo import segment_end_lsn


def rpo_alerts():
    # A failing archive_command also (rightly) opens "WAL archiving failing": these tests judge the RPO rule alone.
    return ours().filter(condition=Alert.Condition.RPO_BREACHED)


def rpo_mails(smtp):
    return [m for m in mails(smtp) if "RPO breached" in m["Subject"]]


def write_wal(cluster, switch=True):
    cluster.execute("CREATE TABLE IF NOT EXISTS bookings (id serial PRIMARY KEY, note text)")
    cluster.execute("INSERT INTO bookings (note) SELECT md5(g::text) FROM generate_series(1, 2000) g")
    if switch:
        cluster.execute("SELECT pg_switch_wal()")


def all_archived(cluster):
    ((archived, current),) = cluster.execute(
        "SELECT last_archived_wal, pg_walfile_name(pg_current_wal_lsn()) FROM pg_stat_archiver"
    )
    return archived is not None and archived >= current


@pytest.fixture
def failing_archive(pg_cluster, db):
    """archive_mode on with an archive_command that always fails: WAL accumulates unarchived."""
    # autovacuum off: nothing but the test writes WAL, so "idle" means idle.
    pg_cluster.configure(wal_level="replica", archive_mode="on", archive_command="false", autovacuum="off")
    pg_cluster.restart()
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "push", 1
    server.save()
    return server


def test_unarchived_wal_older_than_the_objective_breaches_the_rpo_and_archiving_it_resolves(
    failing_archive, pg_cluster, smtp_server, postgres_dir
):
    server = failing_archive
    write_wal(pg_cluster)
    wait_for(
        lambda: pg_cluster.execute("SELECT failed_count FROM pg_stat_archiver")[0][0] > 0, timeout=30, what="a failure"
    )
    run_once()
    status = RpoStatus.objects.get(server=server)
    assert status.seconds == 0 and status.pending_since is not None  # first seen now: not old yet
    assert not rpo_alerts().exists()
    start = status.pending_since

    with time_machine.travel(start + timedelta(seconds=59), tick=False):
        run_once()
    assert not rpo_alerts().exists()  # 59 s old: within the objective of 1 min
    with time_machine.travel(start + timedelta(seconds=90), tick=False):
        run_once()
        run_once()
    status.refresh_from_db()
    assert status.seconds == 90
    alert = Alert.objects.get(condition="rpo_breached")
    assert "achieved RPO 1.5 min against an objective of 1 min" in alert.message
    assert "The archive command fails on 0000000" in alert.message
    assert [m["Subject"] for m in rpo_mails(smtp_server)] == ["[backupportal] maldives: RPO breached"]

    # Unreachable: the RPO is unknown, and an unknown is neither a breach nor a recovery.
    pg_cluster.stop()
    with time_machine.travel(start + timedelta(seconds=120), tick=False):
        run_once()
    status.refresh_from_db()
    assert status.seconds is None and "connection refused" in status.error
    assert Alert.objects.get(condition="rpo_breached").state == "open"
    pg_cluster.start()

    archive = postgres_dir
    pg_cluster.configure(archive_command=f"cp %p {archive}/%f")
    pg_cluster.reload()
    pg_cluster.execute("CHECKPOINT")
    pg_cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: all_archived(pg_cluster), timeout=30, what="the archive to catch up")
    with time_machine.travel(start + timedelta(seconds=180), tick=False):
        run_once()
    status.refresh_from_db()
    assert status.seconds == 0 and status.pending_lsn is None
    assert Alert.objects.get(condition="rpo_breached").state == "resolved"
    assert len(rpo_mails(smtp_server)) == 2 and rpo_mails(smtp_server)[1]["Subject"].startswith(
        "[backupportal] RESOLVED"
    )

    # Idle for hours with everything archived: never in breach.
    for hours in (1, 5):
        with time_machine.travel(start + timedelta(hours=hours), tick=False):
            run_once()
        status.refresh_from_db()
        assert status.seconds == 0
    assert rpo_alerts().filter(state="open").count() == 0 and len(rpo_mails(smtp_server)) == 2


def test_a_server_without_wal_archiving_is_not_measured(db, smtp_server):
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/reliabilitymaldives")
    run_once()
    assert not RpoStatus.objects.exists()
    assert server_health(server)["rpo"]["note"].startswith("no WAL archiving")


def test_pull_rpo_follows_what_pg_receivewal_has_flushed(pg_cluster, db, smtp_server, postgres_dir):
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "pull", 1
    server.save()
    target = str(postgres_dir)
    receiver = subprocess.Popen(
        [
            str(server.bin_dir() / "pg_receivewal"),
            *("-D", target, "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres"),
            *("--synchronous", "--status-interval=1", "--no-loop"),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        write_wal(pg_cluster, switch=False)
        ((current,),) = pg_cluster.execute("SELECT pg_current_wal_lsn()")
        wait_for(
            lambda: pg_cluster.execute("SELECT count(*) FROM pg_stat_replication WHERE flush_lsn >= %s", [current])[0][
                0
            ],
            timeout=30,
            what="pg_receivewal to flush",
        )
        start = timezone.now()
        run_once()
        assert RpoStatus.objects.get(server=server).seconds == 0
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    write_wal(pg_cluster, switch=False)  # nobody receives it
    run_once()
    with time_machine.travel(start + timedelta(minutes=3), tick=False):
        run_once()
    status = RpoStatus.objects.get(server=server)
    assert status.seconds >= 120
    assert Alert.objects.get(condition="rpo_breached").state == "open"
    assert len(rpo_mails(smtp_server)) == 1


def test_a_segment_name_gives_the_lsn_just_past_it():
    one_mb = 1024 * 1024
    assert segment_end_lsn("000000010000000000000006", one_mb) == 7 * one_mb
    assert segment_end_lsn("000000020000000100000003", 16 * one_mb) == (256 + 4) * 16 * one_mb
    assert segment_end_lsn("00000002.history", one_mb) is None
    assert segment_end_lsn("000000010000000000000006.partial", one_mb) is None
