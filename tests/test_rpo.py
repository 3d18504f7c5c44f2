"""Achieved RPO against real clusters: WAL that piles up unarchived breaches the objective; an idle
server whose WAL is all archived never does, however long it stays idle."""

import subprocess
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from backups import walingest, walspool
from backups.models import Server
from tests.helpers import enable_push, mails, ours, register, wait_for
from watching.dashboard import server_health
from watching.models import Alert, RpoSample, RpoStatus
from watching.monitor import run_once
from watching.rpo import segment_end_lsn

pytest_plugins = ["tests.walfixtures"]


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
    failing_archive, pg_cluster, smtp_server, wal_spool, passphrase_file, backup_root
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

    catch_up(pg_cluster, server)
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


def catch_up(cluster, server):
    """The portal's archive command in place: every segment archived to the spool, then ingested."""
    enable_push(cluster)
    cluster.execute("CHECKPOINT")
    cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: all_archived(cluster), timeout=30, what="the archive to catch up")
    walingest.ingest(server)


def test_an_archive_that_catches_up_part_of_the_way_leaves_the_rest_as_old_as_it_was(
    failing_archive, pg_cluster, smtp_server, wal_spool, passphrase_file, backup_root
):
    """The WAL past the archive's end was dated by the first pass that saw it; an archive that
    then got through its first segments only was taken for all archived: RPO 0, and RESOLVED mailed
    while WAL written an hour before was still unarchived."""
    server = failing_archive
    server.rpo_minutes = 15
    server.save()
    write_wal(pg_cluster)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        run_once()
    for _ in range(3):
        write_wal(pg_cluster)
    with time_machine.travel(start + timedelta(minutes=60), tick=False):
        run_once()
    assert Alert.objects.get(condition="rpo_breached").state == "open"

    # The spool gets every segment, the ingest only the first two of those the first pass saw.
    enable_push(pg_cluster)
    pg_cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: all_archived(pg_cluster), timeout=30, what="the archive to reach the spool")
    spool = walspool.spool_dir(server)
    spooled = sorted(p.name for p in spool.iterdir() if len(p.name) == 24)
    aside = spool.parent / "aside"
    aside.mkdir()
    for name in spooled[2:]:
        (spool / name).rename(aside / name)
    walingest.ingest(server)
    with time_machine.travel(start + timedelta(minutes=120), tick=False):
        run_once()
    status = RpoStatus.objects.get(server=server)
    assert status.seconds >= 60 * 60, status.seconds  # written before the pass at 60 min, still unarchived
    alert = Alert.objects.get(condition="rpo_breached")
    assert alert.state == "open" and "is still not archived" in alert.message
    assert "The spool holds WAL through" in alert.message
    assert not [m for m in rpo_mails(smtp_server) if "RESOLVED" in m["Subject"]]

    for name in spooled[2:]:  # the ingest gets through the rest
        (aside / name).rename(spool / name)
    walingest.ingest(server)
    with time_machine.travel(start + timedelta(minutes=121), tick=False):
        run_once()
    status.refresh_from_db()
    assert status.seconds == 0 and status.points == []
    assert Alert.objects.get(condition="rpo_breached").state == "resolved"


def test_wal_in_the_spool_that_no_ingest_takes_is_not_archived(
    pg_cluster, db, smtp_server, wal_spool, passphrase_file, backup_root
):
    """Push: pg_stat_archiver says archived once the segment is in the spool; until the ingest has
    encrypted and catalogued it, it is on no tier and no restore uses it."""
    pg_cluster.configure(autovacuum="off")
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "push", 5
    server.save()
    enable_push(pg_cluster)
    write_wal(pg_cluster)  # and switched
    wait_for(lambda: all_archived(pg_cluster), timeout=30, what="the spool")
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        run_once()
    with time_machine.travel(start + timedelta(hours=6), tick=False):
        run_once()
    status = RpoStatus.objects.get(server=server)
    assert status.seconds == 6 * 3600
    alert = Alert.objects.get(condition="rpo_breached")
    assert "The spool holds WAL through" in alert.message and "is the worker running" in alert.message
    assert server_health(Server.objects.get(pk=server.pk))["rpo"]["colour"] == "red"
    # Whatever the objective, the spool's own age says so within minutes: archiving is failing.
    failing = Alert.objects.get(condition="archive_failing")
    assert "has waited in the spool since" in failing.message and "manage.py qcluster" in failing.message

    walingest.ingest(server)
    with time_machine.travel(start + timedelta(hours=6, minutes=1), tick=False):
        run_once()
    status.refresh_from_db()
    assert status.seconds == 0
    assert Alert.objects.get(condition="rpo_breached").state == "resolved"
    assert Alert.objects.get(condition="archive_failing").state == "resolved"


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
    pg_cluster.execute("SELECT pg_create_physical_replication_slot(%s, true)", [server.replication_slot])
    receiver = subprocess.Popen(
        [
            str(server.bin_dir() / "pg_receivewal"),
            *("-D", target, "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres"),
            *("-S", server.replication_slot, "--synchronous", "--status-interval=1", "--no-loop"),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        start = timezone.now()
        run_once()
        write_wal(pg_cluster, switch=False)
        ((current,),) = pg_cluster.execute("SELECT pg_current_wal_lsn()")
        wait_for(
            lambda: pg_cluster.execute("SELECT count(*) FROM pg_stat_replication WHERE flush_lsn >= %s", [current])[0][
                0
            ],
            timeout=30,
            what="pg_receivewal to flush",
        )
        with time_machine.travel(start + timedelta(minutes=3), tick=False):
            run_once()  # what was written since the first pass is flushed: nothing waits
        assert RpoStatus.objects.get(server=server).seconds == 0
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    write_wal(pg_cluster, switch=False)  # nobody receives it
    with time_machine.travel(start + timedelta(minutes=3), tick=False):
        run_once()
    with time_machine.travel(start + timedelta(minutes=6), tick=False):
        run_once()
    status = RpoStatus.objects.get(server=server)
    assert status.seconds >= 120
    assert Alert.objects.get(condition="rpo_breached").state == "open"
    assert len(rpo_mails(smtp_server)) == 1


def test_a_standbys_slot_is_not_the_portals_archive(pg_cluster, db, smtp_server):
    """Found by review: any physical slot's position counted as archived for a pull server; a
    standby keeping up made the RPO 0 while the portal received nothing."""
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "pull", 1
    server.save()
    pg_cluster.execute("SELECT pg_create_physical_replication_slot('standby_1', true)")
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        run_once()
    write_wal(pg_cluster, switch=False)
    pg_cluster.execute("SELECT pg_replication_slot_advance('standby_1', pg_current_wal_lsn())")  # the standby keeps up
    with time_machine.travel(start + timedelta(hours=2), tick=False):
        run_once()
    assert RpoStatus.objects.get(server=server).seconds >= 3600


def test_a_segment_name_gives_the_lsn_just_past_it():
    one_mb = 1024 * 1024
    assert segment_end_lsn("000000010000000000000006", one_mb) == 7 * one_mb
    assert segment_end_lsn("000000020000000100000003", 16 * one_mb) == (256 + 4) * 16 * one_mb
    assert segment_end_lsn("00000002.history", one_mb) is None
    assert segment_end_lsn("000000010000000000000006.partial", one_mb) is None


def test_a_file_the_ingest_left_with_its_marker_does_not_say_the_worker_is_down(db, wal_spool):
    """A segment that came again with other contents is left in the spool on purpose, with a
    marker saying so: the worker that left it runs."""
    import os

    from backups import walhealth

    server = Server.objects.create(
        name="maldives", dsn="postgresql://postgres@127.0.0.1:1/reliabilitymaldives", archiving="push"
    )
    spool = walspool.spool_dir(server)
    (spool / "errors").mkdir(parents=True)
    an_hour_ago = timezone.now().timestamp() - 3600
    for name in ("000000010000000000000003", "000000010000000000000004"):
        (spool / name).write_bytes(b"\0" * 16)
        os.utime(spool / name, (an_hour_ago, an_hour_ago))
    walspool.write_error_marker(spool, "000000010000000000000003", "conflict", "came again with other contents")
    said = walhealth.waiting_in_spool(server)
    assert said.startswith("WAL segment 000000010000000000000004 has waited in the spool since") and "more" not in said
    walspool.write_error_marker(spool, "000000010000000000000004", "conflict", "came again with other contents")
    assert walhealth.waiting_in_spool(server) == ""


def test_wal_left_unarchived_while_the_monitor_was_stopped_is_as_old_as_the_gap(
    pg_cluster, db, smtp_server, wal_spool, passphrase_file, backup_root
):
    """Found by review: WAL written while nobody looked was dated at the pass that first saw it:
    three hours of failed archiving read as 0 s, green, and the hour's sample 0."""
    pg_cluster.configure(autovacuum="off")
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "push", 15
    server.save()
    enable_push(pg_cluster)
    pg_cluster.execute("CREATE TABLE bookings AS SELECT g AS id FROM generate_series(1, 1000) g")
    pg_cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: all_archived(pg_cluster), timeout=30, what="the spool")
    walingest.ingest(server)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        run_once()
    assert RpoStatus.objects.get(server=server).seconds == 0  # all archived

    # The monitor stops. Meanwhile archiving breaks and WAL is written (and switched).
    pg_cluster.execute("ALTER SYSTEM SET archive_command = 'false'")
    pg_cluster.execute("SELECT pg_reload_conf()")
    pg_cluster.execute("INSERT INTO bookings SELECT g FROM generate_series(1, 5000) g")
    pg_cluster.execute("SELECT pg_switch_wal()")

    # Three hours later the monitor runs again.
    with time_machine.travel(start + timedelta(hours=3), tick=False):
        run_once()
        figure = server_health(Server.objects.get(pk=server.pk))["rpo"]
    status = RpoStatus.objects.get(server=server)
    worst = max(RpoSample.objects.filter(server=server).values_list("worst_seconds", flat=True))
    # Not "0 s, green": the WAL may be as old as the pass before (the worst case).
    assert status.seconds >= 3 * 3600 and figure["colour"] == "red" and worst >= 3 * 3600


def test_a_healthy_server_after_a_gap_in_the_monitors_passes_is_not_given_the_gap_as_its_rpo(
    pg_cluster, db, smtp_server, wal_spool, passphrase_file, backup_root
):
    """Found by review of the fix above: with the archive current (its end moved a moment ago),
    the WAL written into the current segment was dated at the pass 20 minutes before: RPO 1200 s,
    an alert, on a healthy server."""
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "push", 15
    server.save()
    enable_push(pg_cluster)
    with time_machine.travel(timezone.now() - timedelta(minutes=20), tick=False):
        run_once()  # the pass before the monitor's restart
    pg_cluster.execute("CREATE TABLE bookings AS SELECT g AS id FROM generate_series(1, 1000) g")
    pg_cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: all_archived(pg_cluster), timeout=30, what="the spool")
    walingest.ingest(server)  # the archive's end moves now
    pg_cluster.execute("INSERT INTO bookings SELECT g FROM generate_series(1, 100) g")  # the current segment
    run_once()
    status = RpoStatus.objects.get(server=server)
    assert status.seconds is not None and status.seconds < 120, status.seconds
    assert not Alert.objects.filter(condition="rpo_breached").exists()


def test_an_idle_server_after_a_base_backup_is_not_in_rpo_breach(
    pg_cluster, db, smtp_server, wal_spool, passphrase_file, backup_root
):
    """Found by a probe: a backup leaves a .backup file as PostgreSQL's last archived one; it named
    no segment, so "nothing archived" was read, and an idle server's RPO grew with the hours since
    (rpo_breached opened) though every byte it wrote was archived and catalogued."""
    pg_cluster.configure(autovacuum="off")
    pg_cluster.restart()
    server = register(pg_cluster, dbname="postgres")
    server.archiving, server.rpo_minutes = "push", 5
    server.save()
    enable_push(pg_cluster)
    pg_cluster.execute("CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
    with pg_cluster.connect("postgres") as conn:  # a backup, as pg_basebackup or any tool takes one
        conn.execute("SELECT pg_backup_start('a backup', true)")
        conn.execute("SELECT * FROM pg_backup_stop(true)")
    archived = "SELECT last_archived_wal FROM pg_stat_archiver"
    wait_for(lambda: (pg_cluster.execute(archived)[0][0] or "").endswith(".backup"), what="the .backup archived")
    walingest.ingest(server)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        run_once()
    with time_machine.travel(start + timedelta(hours=2), tick=False):
        run_once()
    assert pg_cluster.execute(archived)[0][0].endswith(".backup")  # nothing written since
    status = RpoStatus.objects.get(server=server)
    assert status.seconds == 0, (status.seconds, status.archived_wal, status.current_wal, status.error)
    assert not Alert.objects.filter(condition="rpo_breached", state="open").exists()


def test_a_clock_stepped_back_does_not_resolve_a_breach_while_wal_stays_unarchived(
    failing_archive, pg_cluster, smtp_server, wal_spool, passphrase_file, backup_root
):
    """Found by a probe: NTP stepped the portal's clock back an hour while archive_command still
    failed; the RPO read -1800 s and rpo_breached resolved. It stays open: not measured until the
    clock has caught up."""
    server = failing_archive
    write_wal(pg_cluster)
    failed = "SELECT failed_count FROM pg_stat_archiver"
    wait_for(lambda: pg_cluster.execute(failed)[0][0] > 0, timeout=30, what="a failure")
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        run_once()
    with time_machine.travel(start + timedelta(minutes=30), tick=False):
        run_once()
    assert Alert.objects.get(condition="rpo_breached").state == "open"
    with time_machine.travel(start - timedelta(minutes=30), tick=False):
        run_once()
    assert Alert.objects.get(condition="rpo_breached").state == "open"
    assert "the portal's clock reads" in RpoStatus.objects.get(server=server).error
