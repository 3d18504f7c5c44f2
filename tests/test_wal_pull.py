"""Pull archiving against a real cluster: pg_receivewal supervised, killed, restarted; PITR from it."""

import os
import signal
import threading
import time

import pytest

from backupportal.models import JournalEntry
from backups import walchain, walnames, walspool
from backups.models import WalSegment
from tests.helpers import manage, pull, rows, run_command, slot_active, switch_wal, wait_for
from watching.models import Alert
from watching.monitor import check_wal

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"


def test_pg_receivewal_killed_is_restarted_and_the_chain_has_no_gap(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    receiver = pull(server)
    stop, seen = threading.Event(), {}

    def scenario():  # on another thread: PostgreSQL and signals only, the portal's database stays on this one
        try:
            wait_for(lambda: receiver.child and slot_active(sample_cluster, server), what="pg_receivewal streaming")
            seen["first"] = switch_wal(sample_cluster)
            killed = receiver.child.proc.pid
            os.kill(killed, signal.SIGKILL)
            for i in range(3):  # WAL written while nothing receives it: the slot keeps it on the server
                sample_cluster.execute(f"CREATE TABLE while_down_{i}(x int)", dbname=DB)
                seen["last"] = switch_wal(sample_cluster)
            wait_for(lambda: receiver.child and receiver.child.proc.pid != killed, what="a new pg_receivewal")
            sample_cluster.execute("CREATE TABLE after_restart(x int)", dbname=DB)
            seen["last"] = switch_wal(sample_cluster)
            ingested = walspool.spool_dir(server) / "ingested" / seen["last"]
            wait_for(ingested.exists, what=f"{seen['last']} to be received and ingested")
        finally:
            stop.set()

    thread = threading.Thread(target=scenario)
    thread.start()
    receiver.run(stop.is_set)
    thread.join()

    assert receiver.restarts == 1
    first = walnames.segno_of(seen["first"], server.wal_segment_size)
    last = walnames.segno_of(seen["last"], server.wal_segment_size)
    assert walchain.missing_segments(server, first, last) == []
    assert WalSegment.objects.filter(server=server, source="pull", segno__gte=first, segno__lte=last).count() == (
        last - first + 1
    )
    # Stopped cleanly: no pg_receivewal left streaming from the slot.
    assert not slot_active(sample_cluster, server)


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_a_pull_server_restores_the_newest_commit_from_the_partial_segment(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    from backupportal.lib.osuser import free_port

    receiver = pull(server)
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        base = run_command("backup", "maldives", "--kind", "base")
        assert base["status"] == "succeeded", base
        sample_cluster.execute("CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('C')", dbname=DB)
        # No WAL switch: the commit is only in the segment pg_receivewal is still writing.
        lsn = sample_cluster.execute("SELECT pg_current_wal_lsn()")[0][0]
        wait_for(
            lambda: sample_cluster.execute("SELECT flush_lsn >= %s FROM pg_stat_replication", [lsn])[0][0],
            what="pg_receivewal to flush",
        )
        datadir, port = restored(), free_port()
        result = run_command(
            "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(datadir), "--port", str(port)
        )
        assert result["status"] == "succeeded", result
        assert ".partial" in result["notes"]
        assert rows(port, "SELECT tx FROM probe") == [("C",)]
    finally:
        receiver.stop_child()


def test_the_monitor_sees_a_receiver_down_and_a_gap(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    from watching.models import Alert

    receiver = pull(server)
    assert "does not exist" in check_wal(server)["receiver_down"]
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        # Streaming, but for less than RECEIVER_STEADY_SECONDS (10 s): not yet recovered.
        assert "receiver_down" not in check_wal(server)
        assert Alert.objects.get(condition="receiver_down").state == "open"
        settings.RECEIVER_STEADY_SECONDS = 1  # rather than wait 10 s
        time.sleep(1)
        assert "receiver_down" not in check_wal(server)
        assert Alert.objects.get(condition="receiver_down").state == "resolved"
        assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
        for i in range(3):
            sample_cluster.execute(f"CREATE TABLE g{i}(x int)", dbname=DB)
            last = switch_wal(sample_cluster)
        wait_for(lambda: receiver.ingest() and WalSegment.objects.filter(name=last).exists(), what="ingest")
    finally:
        receiver.stop_child()
    assert "nothing streams from slot" in check_wal(server)["receiver_down"]
    lost = WalSegment.objects.filter(segno__isnull=False).order_by("-segno")[1]
    lost.delete()
    assert lost.name in check_wal(server)["wal_gap"]
    assert lost.name in Alert.objects.get(condition="wal_gap", state="open").message


@pytest.mark.django_db(transaction=True)  # receivewal is another process: it must see committed rows
def test_receivewal_runs_until_sigterm_and_leaves_no_pg_receivewal_behind(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    receiver = manage(settings, "receivewal", "maldives")
    streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    wait_for(lambda: sample_cluster.execute(streaming)[0][0] == 1, what="pg_receivewal streaming")
    sample_cluster.execute("CREATE TABLE x(x int)", dbname=DB)
    name = switch_wal(sample_cluster)
    wait_for(lambda: WalSegment.objects.filter(name=name).exists(), what="ingest")
    receiver.send_signal(signal.SIGTERM)
    out, err = receiver.communicate(timeout=30)
    assert receiver.returncode == 0, err
    assert "pg_receivewal stopped" in out
    assert sample_cluster.execute(streaming)[0][0] == 0

    # Killed outright, it takes its pg_receivewal with it: no orphan streams on.
    receiver = manage(settings, "receivewal", "maldives")
    wait_for(lambda: sample_cluster.execute(streaming)[0][0] == 1, what="pg_receivewal streaming again")
    receiver.kill()
    receiver.wait()
    wait_for(lambda: sample_cluster.execute(streaming)[0][0] == 0, what="pg_receivewal to die with its supervisor")


def invalidate_slot(cluster, server, pg_major):
    """The server ends the slot while pg_receivewal is away: 18's idle_replication_slot_timeout, or
    on any version max_slot_wal_keep_size passed by the WAL written meanwhile."""
    if pg_major >= 18:
        cluster.execute("ALTER SYSTEM SET idle_replication_slot_timeout = '1s'")
        cluster.execute("SELECT pg_reload_conf()")
        time.sleep(2.5)
    else:
        cluster.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        cluster.execute("SELECT pg_reload_conf()")
        for n in range(4):  # segments past the limit, each checkpoint removes what it may
            cluster.execute(f"CREATE TABLE filler_{n} AS SELECT g FROM generate_series(1, 50000) g")
            switch_wal(cluster)
            cluster.execute("CHECKPOINT")
    cluster.execute("CHECKPOINT")
    slot = cluster.execute(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", [server.replication_slot]
    )
    assert slot == [("lost",)]


def streamed_then_invalidated(receiver, cluster, server, pg_major=15):
    """The receiver streams, stops, and the server invalidates its slot meanwhile. It stops once
    it has written WAL: with none in its directory, pg_receivewal starts again from the slot's
    position, and from the server's own (streaming on) where the slot has none, as an invalidated
    slot on 15 (a CI run under load stopped it before its first write, about once)."""
    receiver.start_child()
    wait_for(lambda: slot_active(cluster, server), what="pg_receivewal streaming")
    wait_for(lambda: any(receiver.directory.glob("*.partial")), what="pg_receivewal's first WAL written")
    receiver.stop_child()
    wait_for(lambda: not slot_active(cluster, server), what="the slot released")
    invalidate_slot(cluster, server, pg_major)


def streams_again(receiver, cluster, server):
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(cluster, server), timeout=30, what="pg_receivewal streaming again")
        name = switch_wal(cluster)
        wait_for(lambda: (receiver.directory / name).exists(), timeout=30, what="a new segment received")
    finally:
        receiver.stop_child()


@pytest.mark.parametrize("spool", ["partial", "empty"])
@pytest.mark.parametrize("pg_major", [15, 18])
def test_a_slot_the_server_invalidated_is_named_so_by_the_receiver_checkserver_and_the_monitor(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, pg_major, spool
):
    """Found by review: the receiver restarted pg_receivewal on the dead slot for ever, journaling
    "error: disconnected"; checkserver said the slot kept WAL and the monitor that receivewal was
    not running. No restart mends it: drop the slot, and a base backup after the gap.

    Found later, while fixing a test's timing: with no WAL in its directory (a spool emptied, a first
    start on a slot that was there), pg_receivewal asks the dead slot where to begin, finds no
    position and begins at the server's own; 15 lets it stream, and the slot reads 'reserved'
    again: the WAL in between was missing from the archive without a word from the receiver or the
    monitor. The supervisor starts no pg_receivewal on a slot it finds invalidated."""
    receiver = pull(server)
    streamed_then_invalidated(receiver, sample_cluster, server, pg_major)
    if spool == "empty":
        for partial in receiver.directory.glob("*.partial"):
            partial.unlink()
    stopped = receiver.child

    assert not receiver._pause_then_start(lambda: False)
    assert receiver.child is stopped  # none started
    said = JournalEntry.objects.filter(action="receiver_refused").latest("pk").details["error"]
    assert said.startswith(f"replication slot {server.replication_slot} was invalidated by the server ("), said
    assert "SELECT pg_drop_replication_slot" in said and "take a base backup" in said
    time.sleep(1)  # had pg_receivewal been started, it would be streaming by now
    slot = "SELECT active, wal_status FROM pg_replication_slots WHERE slot_name = %s"
    assert sample_cluster.execute(slot, [server.replication_slot]) == [(False, "lost")]
    checked = {c["check"]: c for c in run_command("checkserver", "maldives")["checks"]}["replication slot"]
    assert checked["verdict"] == "fail" and "was invalidated by the server" in checked["detail"]
    assert "keeps WAL for it" not in checked["detail"]
    check_wal(server)
    assert "was invalidated by the server" in Alert.objects.get(condition="receiver_down", state="open").message
    if spool == "empty":  # dropped as told, it is made again and streamed from (with a partial: the next test)
        sample_cluster.execute("SELECT pg_drop_replication_slot(%s)", [server.replication_slot])
        streams_again(receiver, sample_cluster, server)


def test_after_the_invalidated_slot_is_dropped_as_told_the_receiver_streams_again(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    """Found by review of the fix above: after the slot was dropped as the message said,
    pg_receivewal asked the new slot for the spool's partial segment, gone from the server, for ever."""
    receiver = pull(server)
    streamed_then_invalidated(receiver, sample_cluster, server)
    sample_cluster.execute("SELECT pg_drop_replication_slot(%s)", [server.replication_slot])  # as the message says
    receiver.start_child()
    wait_for(lambda: receiver.child.proc.poll() is not None, what="pg_receivewal to ask for removed WAL")
    receiver.child_died()
    said = JournalEntry.objects.filter(action="receiver_restarted").latest("pk").details["error"]
    assert "(renamed .superseded, in " in said and "so the receiver goes on from the slot" in said
    streams_again(receiver, sample_cluster, server)


def test_a_slot_made_again_that_took_the_removed_position_is_dropped_and_made_again(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    """The other timing of the test above (a CI run met it about once in three): the new slot took
    the position pg_receivewal asked for as its restart position and read "lost", as a slot the
    server invalidated reads on 15 once pg_receivewal has asked it; the receiver called it
    invalidated and advised dropping it again. That row is made here for real (an invalidated slot
    asked again) and taken as this start's own slot, which is what tells the two apart."""
    receiver = pull(server)
    streamed_then_invalidated(receiver, sample_cluster, server)

    def asked_and_read_lost():
        receiver.create_slot()
        receiver.spawn()  # on the dead slot, as the supervisor no longer does
        wait_for(lambda: receiver.child.proc.poll() is not None, what="pg_receivewal to ask for removed WAL")
        row = receiver.slot_columns()
        return row["wal_status"] == "lost" and row["restart_lsn"]  # the row the race leaves, or not yet

    # Whether the walsender reads pg_receivewal's first reply before it fails is the race itself.
    wait_for(asked_and_read_lost, timeout=60, every=0, what="the slot to take the asked position")
    receiver.made_slot = True  # as the slot made again after the drop is
    receiver.child_died()
    said = JournalEntry.objects.filter(action="receiver_restarted").latest("pk").details["error"]
    assert "invalidated by the server" not in said, said
    assert "(renamed .superseded, in " in said and "was dropped to be made again" in said, said
    assert not sample_cluster.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [server.replication_slot]
    )
    streams_again(receiver, sample_cluster, server)


def test_a_slot_invalidated_under_a_receiver_that_made_it_long_ago_is_still_named_invalidated(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """The rule above holds for a slot whose pg_receivewal died before it was seen streaming
    steadily: one made by the same start that streamed for longer is invalidated by the server if
    it reads lost."""
    settings.RECEIVER_STEADY_SECONDS = 0
    receiver = pull(server)
    streamed_then_invalidated(receiver, sample_cluster, server)
    receiver.spawn()  # as if the slot were invalidated under it, the walsender ended
    wait_for(lambda: receiver.child.proc.poll() is not None, what="pg_receivewal to die on the dead slot")
    receiver.made_slot = True
    assert not receiver.still_new()  # as the supervisor's loop finds it while it streams
    receiver.child_died()
    said = JournalEntry.objects.filter(action="receiver_restarted").latest("pk").details["error"]
    assert said.startswith(f"replication slot {server.replication_slot} was invalidated by the server ("), said
    assert sample_cluster.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [server.replication_slot])


def test_a_server_switched_from_pull_back_to_push_archives_what_it_had_pulled(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    """Found by a probe: the ingested/ markers of a pull spool were root's, group root; switched back
    to push, the archive program (as postgres) could not read the marker of a segment PostgreSQL
    still had ready and failed with "Permission denied" on it for ever."""
    from backups.models import Server
    from tests.helpers import archive_as_postgres

    receiver = pull(server)
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        sample_cluster.execute("CREATE TABLE pulled(x int)", dbname=DB)
        pulled = switch_wal(sample_cluster)
        wait_for(lambda: receiver.ingest() and WalSegment.objects.filter(name=pulled).exists(), what="it ingested")
    finally:
        receiver.stop_child()

    Server.objects.filter(pk=server.pk).update(archiving="push")
    server.refresh_from_db()
    assert run_command("archivecommand", "maldives")["_exit"] == 0
    again = archive_as_postgres(server, sample_cluster.datadir / "pg_wal" / pulled, pulled)
    assert again.returncode == 0, again.stderr  # the same segment, known by its marker
