"""The alert conditions of WAL archiving and storage tiers, end to end through the monitor and a
real SMTP server: each is made true for real (a segment lost from the spool, a spool PostgreSQL
cannot write, its archive program gone, archive_mode turned off or another archive_command in
place, pg_receivewal killed again and again, the S3 endpoint down, a flipped
byte in a stored copy, a WAL file gone from every tier); `monitor --once` then opens one alert
and sends one mail, a second pass sends nothing more; the condition is put right for real and
the next pass resolves the alert with one mail. A server that cannot be asked resolves nothing.
"""

import os
import re
import signal
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backups import walhealth, walingest, walspool
from backups.copies import retry_due_copies
from backups.models import BackupRun, WalSegment
from tests.helpers import (
    archive_as_postgres,
    enable_push,
    flip_byte,
    pitr,
    pull,
    push_with_base,
    run_command,
    slot_active,
    switch_wal,
    wait_archived,
    wait_for,
)
from watching.models import Alert

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"
SITE = "https://backups.reliabilitymaldives.com"


# --- The monitor, as the schedule runs it, and what reached the SMTP server --------------------


def monitor():
    """One `manage.py monitor --once` pass; it exits 0 (no check broke, all mail went)."""
    out = StringIO()
    call_command("monitor", "--once", stdout=out, stderr=StringIO())
    return out.getvalue()


def mails_about(smtp, condition):
    """The mails received about one condition (other conditions, such as the calendar's, aside)."""
    label = Alert.Condition(condition).label
    return [m for m in smtp.messages if m["Subject"].endswith(f": {label}")]


def alerts_of(condition, subject):
    return Alert.objects.filter(condition=condition, subject=subject)


def opens_once(smtp, condition, subject, named):
    """Two monitor passes while the condition holds: one alert, one mail saying what, since when, where."""
    monitor()
    alert = alerts_of(condition, subject).get()
    assert alert.state == "open"
    sent = mails_about(smtp, condition)
    assert [m["Subject"] for m in sent] == [f"[backupportal] {named}: {alert.get_condition_display()}"]
    body = sent[0].get_content()
    assert f"What happened: {alert.message}" in body
    assert f"Since: {timezone.localtime(alert.opened_at):%Y-%m-%d %H:%M:%S} (Indian/Maldives)" in body
    assert f"{SITE}/alerts/{alert.pk}/" in body

    monitor()  # it still holds: the same alert, seen again, and no second mail
    assert alerts_of(condition, subject).get().state == "open"
    assert len(mails_about(smtp, condition)) == 1
    return alert


def resolves_once(smtp, alert, named):
    """The condition was put right: the next pass resolves the alert and mails that once."""
    monitor()
    alert.refresh_from_db()
    assert alert.state == "resolved" and alert.resolved_at is not None
    assert alerts_of(alert.condition, alert.subject).count() == 1  # resolved, nothing new opened
    sent = mails_about(smtp, alert.condition)
    assert [m["Subject"] for m in sent[1:]] == [f"[backupportal] RESOLVED {named}: {alert.get_condition_display()}"]
    assert "the condition cleared by itself" in sent[1].get_content()
    monitor()
    assert len(mails_about(smtp, alert.condition)) == 2


# --- WAL ------------------------------------------------------------------------------------


def write_and_switch(cluster, table):
    cluster.execute(f"CREATE TABLE {table} AS SELECT g AS x FROM generate_series(1, 1000) g", dbname=DB)
    return switch_wal(cluster)


def test_a_segment_lost_from_the_archive_is_a_wal_gap_until_it_is_archived_again(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server
):
    enable_push(sample_cluster)
    server.refresh_from_db()
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    names = [write_and_switch(sample_cluster, f"t{i}") for i in range(3)]
    wait_archived(sample_cluster, names[-1])
    # The middle segment vanishes from the spool before the portal ingests it: PostgreSQL
    # counts it archived, the archive never had it.
    lost = names[1]
    (walspool.spool_dir(server) / lost).unlink()
    walingest.ingest(server)

    alert = opens_once(smtp_server, "wal_gap", "server:maldives", "maldives")
    assert (
        alert.message
        == f"WAL gap in the archive of maldives: segment {lost} (timeline 1) is missing; PITR cannot cross it"
    )

    # The DBA archives it again from pg_wal (no checkpoint has recycled it yet), with the
    # archive_command PostgreSQL runs; the next ingest fills the gap.
    again = archive_as_postgres(server, sample_cluster.datadir / "pg_wal" / lost, lost)
    assert again.returncode == 0, again.stderr
    assert lost in walingest.ingest(server).ingested
    resolves_once(smtp_server, alert, "maldives")


def test_a_spool_postgres_cannot_write_is_wal_archiving_failing_until_it_catches_up(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server
):
    enable_push(sample_cluster)
    server.refresh_from_db()
    spool = walspool.spool_dir(server)
    spool.chmod(0o2550)  # read-only for postgres, as after a wrong chmod or a read-only mount
    try:
        failing = write_and_switch(sample_cluster, "t1")
        wait_for(
            lambda: sample_cluster.execute("SELECT last_failed_wal FROM pg_stat_archiver")[0][0] == failing,
            what=f"the archiver to fail on {failing}",
        )
        alert = opens_once(smtp_server, "archive_failing", "server:maldives", "maldives")
        assert f"cannot archive {failing} into {spool}: Permission denied" in alert.message
        assert f"PostgreSQL's archiver fails on {failing}" in alert.message
        assert sample_cluster.execute("SELECT failed_count FROM pg_stat_archiver")[0][0] >= 1
    finally:
        spool.chmod(0o2770)

    # Writable again: a new segment wakes the archiver, which archives the backlog in order.
    latest = write_and_switch(sample_cluster, "t2")
    wait_archived(sample_cluster, latest)
    assert not walhealth.error_markers(server)
    resolves_once(smtp_server, alert, "maldives")


def test_an_archive_program_gone_is_wal_archiving_failing_and_a_server_down_leaves_it_open(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server
):
    enable_push(sample_cluster)
    server.refresh_from_db()
    # The program archive_command runs is gone (someone cleaned up its directory): python
    # cannot even start it, so no marker is left; only PostgreSQL's own statistics tell.
    walspool.program_path().unlink()
    failing = write_and_switch(sample_cluster, "t1")
    wait_for(
        lambda: sample_cluster.execute("SELECT last_failed_wal FROM pg_stat_archiver")[0][0] == failing,
        what=f"the archiver to fail on {failing}",
    )
    assert not walhealth.error_markers(server)
    alert = opens_once(smtp_server, "archive_failing", "server:maldives", "maldives")
    assert alert.message.startswith(f"PostgreSQL's archiver fails on {failing} (last failure ")

    # The server down: whether it archives is unknown, which is no recovery (and no mail).
    sample_cluster.stop()
    monitor()
    alert.refresh_from_db()
    assert alert.state == "open" and len(mails_about(smtp_server, "archive_failing")) == 1
    sample_cluster.start()

    assert run_command("archivecommand", "maldives")["_exit"] == 0  # installs the program again
    latest = write_and_switch(sample_cluster, "t2")
    wait_archived(sample_cluster, latest)
    resolves_once(smtp_server, alert, "maldives")


def test_archive_mode_off_or_another_archive_command_is_wal_archiving_failing_until_set_for_real(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server, postgres_dir
):
    enable_push(sample_cluster)
    server.refresh_from_db()
    # Turned off by someone, restarted: PostgreSQL archives nothing and reports no failure.
    sample_cluster.execute("ALTER SYSTEM SET archive_mode = off")
    sample_cluster.restart()
    walingest.ingest(server)  # what was archived until then
    alert = opens_once(smtp_server, "archive_failing", "server:maldives", "maldives")
    assert alert.message == (
        "archive_mode is off on maldives: set archive_mode = on and restart PostgreSQL "
        "(`manage.py archivecommand maldives` prints the lines to set)"
    )

    # Set back without the restart it needs (and another tool's archive_command with it):
    # the running value is still off, and says so.
    elsewhere = postgres_dir
    sample_cluster.execute("ALTER SYSTEM SET archive_mode = on")
    sample_cluster.execute(f"ALTER SYSTEM SET archive_command = 'AWS_SECRET_ACCESS_KEY=hunter2 cp %p {elsewhere}/%f'")
    sample_cluster.reload()
    assert still_open(smtp_server, alert).message == (
        "archive_mode is off on maldives: a new value is in its configuration; restart PostgreSQL"
    )

    # Restarted: it archives, and PostgreSQL counts every segment archived, but none reaches the portal.
    sample_cluster.restart()
    elsewhere_wal = write_and_switch(sample_cluster, "t1")
    wait_archived(sample_cluster, elsewhere_wal)
    assert (elsewhere / elsewhere_wal).exists() and not walingest.ingest(server).ingested
    assert still_open(smtp_server, alert).message == (
        f"archive_command is not the portal's on maldives: no WAL reaches {walspool.spool_dir(server)}; set it to "
        "what `manage.py archivecommand maldives` prints, then reload (SELECT pg_reload_conf())"
    )
    assert not any("hunter2" in m.get_content() for m in smtp_server.messages)  # another tool's secret

    sample_cluster.execute("ALTER SYSTEM SET archive_command = ''")
    sample_cluster.reload()
    assert still_open(smtp_server, alert).message.startswith(
        f"archive_command is empty on maldives: no WAL reaches {walspool.spool_dir(server)}; set it to "
    )

    # Put right (the portal's line from postgresql.conf, reloaded): new WAL reaches the portal again.
    sample_cluster.execute("ALTER SYSTEM RESET archive_command")
    sample_cluster.reload()
    latest = write_and_switch(sample_cluster, "t2")
    wait_archived(sample_cluster, latest)
    assert latest in walingest.ingest(server).ingested
    resolves_once(smtp_server, alert, "maldives")


def still_open(smtp, alert):
    """A monitor pass while the setting is still wrong: the alert stays open, its message current, no mail."""
    monitor()
    alert.refresh_from_db()
    assert alert.state == "open" and len(mails_about(smtp, alert.condition)) == 1
    return alert


def test_pg_receivewal_that_keeps_dying_is_receiver_down_until_it_streams_steadily(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server, settings
):
    receiver = pull(server)
    try:
        receiver.start_child()
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        monitor()
        assert not alerts_of("receiver_down", "server:maldives").exists()

        kill_receiver(receiver, sample_cluster, server)
        alert = opens_once(smtp_server, "receiver_down", "server:maldives", "maldives")
        assert alert.message == (
            "nothing streams from slot backupportal_maldives: `manage.py receivewal maldives` is not running"
        )

        # Restarted by its supervisor, it dies again within seconds, over and over: each pass
        # that finds it streaming (for less than RECEIVER_STEADY_SECONDS, 10 s) resolves nothing.
        for _ in range(3):
            receiver.start_child()
            wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming again")
            still_open(smtp_server, alert)
            kill_receiver(receiver, sample_cluster, server)
            still_open(smtp_server, alert)

        # It holds: once it has streamed for the window (lowered here, so the test need not wait
        # 10 s), the alert resolves, once.
        settings.RECEIVER_STEADY_SECONDS = 2
        receiver.start_child()
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming steadily")
        time.sleep(settings.RECEIVER_STEADY_SECONDS)
        resolves_once(smtp_server, alert, "maldives")
    finally:
        receiver.stop_child()


def kill_receiver(receiver, cluster, server):
    os.kill(receiver.child.proc.pid, signal.SIGKILL)
    receiver.child.proc.wait()
    wait_for(lambda: not slot_active(cluster, server), what="the slot to be released")


def test_a_pull_servers_own_archiver_failing_is_wal_archiving_failing_until_it_archives_or_is_turned_off(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server, postgres_dir, settings
):
    """Found by a probe: a pull server's own archive_command (left from push, or the DBA's) failing
    for ever raised nothing, while pg_wal kept every segment it had not archived."""
    receiver = pull(server)
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        sample_cluster.execute("ALTER SYSTEM SET archive_mode = on")
        sample_cluster.execute(f"ALTER SYSTEM SET archive_command = 'cp %p {postgres_dir}/gone/%f'")
        sample_cluster.restart()
        failing = fails_to_archive(sample_cluster)
        monitor()  # failing for less than the grace: PostgreSQL retries it
        assert not alerts_of("archive_failing", "server:maldives").exists()

        settings.PULL_ARCHIVER_GRACE_SECONDS = 1  # rather than wait 5 minutes
        time.sleep(1)
        alert = opens_once(smtp_server, "archive_failing", "server:maldives", "maldives")
        assert alert.message.startswith(f"PostgreSQL's own archiver on maldives fails on {failing} (last failure ")
        assert alert.message.endswith(
            "nothing archived since its statistics began): pg_wal keeps every segment until archive_command "
            "succeeds and grows until the disk is full; the portal pulls the WAL of maldives with pg_receivewal "
            "and needs no archiving there: fix the archive_command, or turn archive_mode off (ALTER SYSTEM SET "
            "archive_mode = off, then restart PostgreSQL)"
        )
        ready = sample_cluster.datadir / "pg_wal" / "archive_status" / f"{failing}.ready"
        assert ready.exists()  # kept in pg_wal for the archiver

        # The DBA fixes the command: the archiver catches up, and the alert resolves.
        sample_cluster.execute(f"ALTER SYSTEM SET archive_command = 'cp %p {postgres_dir}/%f'")
        sample_cluster.reload()
        wait_archived(sample_cluster, failing)
        resolves_once(smtp_server, alert, "maldives")

        # Failing again; this time archiving is turned off. PostgreSQL's statistics still show the
        # failure newer than the last success (they outlive a restart), but nothing is kept for it.
        sample_cluster.execute(f"ALTER SYSTEM SET archive_command = 'cp %p {postgres_dir}/gone/%f'")
        sample_cluster.reload()
        again = fails_to_archive(sample_cluster)
        time.sleep(1)
        assert f"fails on {again}" in walhealth.health(server)[0]["archive_failing"]
        sample_cluster.execute("ALTER SYSTEM SET archive_mode = off")
        sample_cluster.restart()
        assert sample_cluster.execute("SELECT last_failed_wal FROM pg_stat_archiver")[0][0] == again
        assert "archive_failing" not in walhealth.health(server)[0]

        # archive_mode on with no archive_command: PostgreSQL records no failure, and keeps every segment.
        sample_cluster.execute("ALTER SYSTEM SET archive_mode = on")
        sample_cluster.execute("ALTER SYSTEM SET archive_command = ''")
        sample_cluster.restart()
        kept = write_and_switch(sample_cluster, "kept")
        wait_for(lambda: (ready.parent / f"{kept}.ready").exists(), what=f"{kept} to wait for archiving")
        assert walhealth.health(server)[0]["archive_failing"] == (
            "archive_mode is on on maldives with no archive_command: pg_wal keeps every segment for it and grows "
            "until the disk is full; the portal pulls the WAL of maldives with pg_receivewal and needs no archiving "
            "there: turn archive_mode off (ALTER SYSTEM SET archive_mode = off, then restart PostgreSQL)"
        )
    finally:
        receiver.stop_child()


def fails_to_archive(cluster):
    """A new segment the archiver fails on (its archive_command fails); returns its name."""
    failing = write_and_switch(cluster, f"t{time.monotonic_ns()}")
    wait_for(
        lambda: cluster.execute("SELECT last_failed_wal FROM pg_stat_archiver")[0][0] == failing,
        what=f"the archiver to fail on {failing}",
    )
    return failing


def test_the_portals_slot_left_after_switching_from_pull_to_push_is_alerted_until_dropped(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, smtp_server
):
    """Found by a probe: switched back to push, the pull slot stayed and held WAL in pg_wal for
    ever (the disk-full outage) with no alert."""
    slot = server.replication_slot
    receiver = pull(server)
    receiver.start_child()
    try:
        wait_for(lambda: slot_active(sample_cluster, server), what="pg_receivewal streaming")
        assert "slot_left_over" not in walhealth.health(server)[0]  # pulling: the slot is in use
        server.archiving = "push"
        server.save(update_fields=["archiving"])
        # Switched while pg_receivewal still streams: stop it first.
        pid = sample_cluster.execute("SELECT active_pid FROM pg_replication_slots")[0][0]
        assert (
            f"and pg_receivewal still streams from it (pid {pid}); it holds back "
            in (walhealth.health(server)[0]["slot_left_over"])
        )
    finally:
        receiver.stop_child()
    enable_push(sample_cluster)
    names = [write_and_switch(sample_cluster, f"t{i}") for i in range(3)]
    wait_archived(sample_cluster, names[-1])

    alert = opens_once(smtp_server, "slot_left_over", "server:maldives", "maldives")
    said = re.fullmatch(
        rf"replication slot {slot} is left on maldives from pull archiving \(maldives now pushes its WAL with "
        r"archive_command\): nothing streams from it and it holds back ([0-9.]+) MB of WAL in pg_wal, more with "
        r"every write, until the disk is full; once the archive has no gap, drop it on the server "
        rf"\(SELECT pg_drop_replication_slot\('{slot}'\)\)",
        alert.message,
    )
    assert said, alert.message
    held = sample_cluster.execute(
        "SELECT (pg_current_wal_lsn() - restart_lsn)::float8 / 1048576 FROM pg_replication_slots WHERE slot_name = %s",
        [slot],
    )[0][0]
    # pg_current_wal_lsn() - restart_lsn: the three segments switched since (1 MB, the first part-written)
    assert 2 < float(said[1]) <= held
    assert not alerts_of("archive_failing", "server:maldives").exists()  # push itself works

    sample_cluster.execute(f"SELECT pg_drop_replication_slot('{slot}')")  # as the alert says
    resolves_once(smtp_server, alert, "maldives")


# --- Storage tiers ----------------------------------------------------------------------------


def backup():
    result = run_command("backup", "maldives")
    assert result["status"] == "succeeded", result
    return BackupRun.objects.get(pk=result["id"])


def test_an_s3_endpoint_down_is_a_cloud_upload_failure_until_the_copy_is_made(
    server, passphrase_file, tiers, smtp_server
):
    tiers.server.stop()
    run = backup()  # the backup succeeds on the primary and the NAS; its copy to S3 fails
    copy = run.copies.get(location__kind="s3", artifact="main")
    assert copy.status == "failed"

    alert = opens_once(smtp_server, "upload_failed", "location:s3", "location s3")
    assert (
        f"Copy of {run} (" in alert.message
        and "to s3 failed on attempt 1: cannot reach the S3 endpoint" in alert.message
    )
    # Retried while still down: a second failure, the same alert, still one mail.
    later = timezone.now() + timedelta(minutes=2)
    assert retry_due_copies(now=later)["failed"] == 3  # the dump, its globals, its signed manifest
    monitor()
    assert "failed on attempt 2" in alerts_of("upload_failed", "location:s3").get().message
    assert len(mails_about(smtp_server, "upload_failed")) == 1

    tiers.server.start()
    assert retry_due_copies(now=later + timedelta(minutes=5))["copied"] == 3
    copy.refresh_from_db()
    assert copy.status == "ok" and copy.sha256 == run.sha256
    resolves_once(smtp_server, alert, "location s3")


def test_a_failing_location_disabled_by_the_sysadmin_no_longer_has_an_upload_failure(
    server, passphrase_file, tiers, smtp_server
):
    tiers.server.stop()
    backup()
    alert = opens_once(smtp_server, "upload_failed", "location:s3", "location s3")
    # The cloud tier is retired: its failed copies will never be retried, nothing waits for them.
    s3 = tiers.locations["s3"]
    s3.enabled = False
    s3.save()
    resolves_once(smtp_server, alert, "location s3")


def verify():
    """The weekly verify (`manage.py verify`): exit 1 when it finds a bad copy."""
    return run_command("verify")


def test_a_flipped_byte_in_a_stored_copy_is_corruption_until_the_copy_is_good_again(
    server, passphrase_file, tiers, smtp_server
):
    run = backup()
    nas_copy = tiers.nas / run.key
    good = nas_copy.read_bytes()
    nas_copy.write_bytes(flip_byte(good))
    found = verify()
    assert found["_exit"] == 1 and found["bad"] == 1

    alert = opens_once(smtp_server, "corruption", "server:maldives", "maldives")
    assert f"Bad copy of {run} in nas: sha256" in alert.message
    assert verify()["bad"] == 1  # found again next week: still the same alert
    monitor()
    assert len(mails_about(smtp_server, "corruption")) == 1

    nas_copy.write_bytes(good)  # put right from the primary
    assert verify()["_exit"] == 0
    resolves_once(smtp_server, alert, "maldives")


def test_a_wal_file_a_restore_found_missing_is_corruption_until_it_is_back(
    server, sample_cluster, passphrase_file, tiers, wal_spool, restored, smtp_server
):
    push_with_base(sample_cluster, server)
    segment = WalSegment.objects.filter(server=server, segno__isnull=False).order_by("-segno")[1]
    assert set(segment.copies.values_list("location__name", "status")) == {("wal", "ok"), ("nas", "ok"), ("s3", "ok")}
    # Gone from every tier. The restore looks at files before it starts, not at S3 objects:
    # it fetches from S3, finds the object missing and marks that copy bad (with no alert).
    files = [Path(c.location.path) / c.key for c in segment.copies.exclude(location__kind="s3")]
    kept = [f.read_bytes() for f in files]
    for f in files:
        f.unlink()
    s3_key = "backupportal/" + segment.key
    body = tiers.s3.get_object(Bucket=tiers.bucket, Key=s3_key)["Body"].read()
    tiers.s3.delete_object(Bucket=tiers.bucket, Key=s3_key)
    result = pitr(restored(), free_port(), "--target", "latest")
    assert f"WAL segment {segment.name} cannot be read intact from any location" in result["error"]
    assert set(segment.copies.values_list("status", flat=True)) == {"bad"}, result["error"]
    assert not Alert.objects.filter(condition="corruption").exists()  # the restore raised none

    alert = opens_once(smtp_server, "corruption", "server:maldives", "maldives")
    assert alert.message.startswith(f"Bad copy of {segment} in ") and "(3 bad copies in all)" in alert.message

    # Put back from the operator's own copies; the weekly verify finds them good again.
    for f, data in zip(files, kept, strict=True):
        f.write_bytes(data)
    tiers.s3.put_object(Bucket=tiers.bucket, Key=s3_key, Body=body)
    assert verify()["_exit"] == 0
    resolves_once(smtp_server, alert, "maldives")


# --- The maintenance calendar ------------------------------------------------------------------


def test_an_overdue_maintenance_task_alerts_once_and_resolves_when_completed_on_its_page(db, client, sam, smtp_server):
    from watching.models import MaintenanceTask

    monitor()  # puts the calendar in place: the strategy's own review was due on 2025-12-02
    review = MaintenanceTask.objects.get(kind="strategy_review", completed_at=None)
    alert = opens_once(smtp_server, "maintenance_overdue", f"task:{review.pk}", f"maintenance task #{review.pk}")
    assert "Review of the backup strategy document was due on 2025-12-02" in alert.message
    assert len(smtp_server.messages) == len(Alert.objects.all())  # one mail an overdue task, nothing twice

    client.force_login(sam)
    page = client.post(reverse("maintenance-complete", args=[review.pk]), {"evidence_url": "/journal/"})
    assert page.status_code == 302
    resolves_once(smtp_server, alert, f"maintenance task #{review.pk}")
    following = MaintenanceTask.objects.get(kind="strategy_review", completed_at=None)
    assert not alerts_of("maintenance_overdue", f"task:{following.pk}").exists()  # due in a quarter
