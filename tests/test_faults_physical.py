"""Faults against real processes: base backups killed or cut off (pg_basebackup or zstd), the protected server stopped
mid-backup, two workers on one occurrence, the portal's database down while WAL is archived,
and a flipped byte in a base backup.

Every test ends with the same five checks: the catalog tells the truth (the run failed, with
a clear message), nothing that looks like a good artifact is bad (no final-named file without
a good catalog row, no partial left), no orphaned child process, the next scheduled run
succeeds, and nothing already archived is lost.
"""

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backupportal.lib.osuser import chown_to_db_user
from backupportal.models import JournalEntry
from backups import walchain, walhealth, walingest, walnames
from backups.models import BackupCopy, BackupRun, WalSegment
from backups.tasks import scheduled_job
from backups.verify import verify_all
from backups.walspool import spool_dir
from tests.helpers import (
    child_named,
    descendants,
    enable_push,
    flip_byte_in,
    manage,
    portal_env,
    register,
    switch_wal,
    wait_archived,
    wait_for,
)
from watching.models import Alert

pytest_plugins = ["tests.walfixtures"]
pytestmark = pytest.mark.django_db(transaction=True)  # manage.py and workers are other processes
DB = "reliabilitymaldives"
ROOT = Path(__file__).resolve().parent.parent


# --- The five checks. ---------------------------------------------------------------------


def assert_failed_clearly(run_id, *phrases):
    """The catalog tells the truth: failed, with a one-line reason, journaled and alerted."""
    run = BackupRun.objects.get(pk=run_id)
    assert run.status == BackupRun.Status.FAILED, run.status
    assert run.finished_at is not None and "\n" not in run.error
    for phrase in phrases:
        assert phrase in run.error, run.error
    alert = Alert.objects.get(condition="backup_failed", state="open")
    assert f"#{run.pk}" in alert.message
    assert JournalEntry.objects.filter(action="backup_failed", object_id=str(run.pk), outcome="failed").exists()
    assert not run.copies.exclude(status=BackupCopy.Status.DELETED).exists()
    return run


def is_wal_key_file(path):
    """SERVER/wal/keys/KEYID.key.gpg: the wrapped WAL key beside the WAL (backups.walkeys), and
    SERVER/wal/manifests/*.manifest.json.gpg: an ingest pass's signed manifest (backups.manifests).
    Neither is an artifact the catalog holds a copy of."""
    if path.parent.name == "manifests" and path.name.endswith(".manifest.json.gpg"):
        return True
    return path.parent.name == "keys" and path.name.endswith(".key.gpg")


def assert_nothing_good_looking_is_bad(root):
    """Every file under the location is a copy the catalog calls good; nothing partial is left."""
    good = set()
    for copy in BackupCopy.objects.filter(status=BackupCopy.Status.OK).select_related("location", "run", "wal_segment"):
        owner_good = copy.run.is_good if copy.run_id else copy.wal_segment.deleted_at is None
        if owner_good and copy.location.kind != "s3":
            good.add(Path(copy.location.path) / copy.key)
    files = {p for p in Path(root).rglob("*") if p.is_file() and not is_wal_key_file(p)}
    assert files <= good, f"files the catalog does not call good: {sorted(files - good)}"


def assert_no_orphans(pids, timeout=10):
    wait_for(lambda: not [p for p in pids if alive(p)], timeout, f"processes {pids} to die")


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_base_backup_aborted(run_id, phrase, tree, cluster, server, archived, root):
    """A base backup stopped by a fault: failed saying `phrase`, nothing of it kept, no process
    left, the server out of backup mode, the next scheduled one good, nothing archived lost."""
    assert_failed_clearly(run_id, phrase)
    assert_nothing_good_looking_is_bad(root)
    assert_no_orphans(tree)
    wait_for(lambda: not cluster.execute("SELECT 1 FROM pg_stat_progress_basebackup"), what="the walsender to end")
    assert_next_scheduled_run_succeeds("base")
    assert_nothing_archived_is_lost(server, archived)


def backend_pid(cluster, backend_type):
    """The pid of the cluster's one process of `backend_type` (pg_stat_activity's words)."""
    (pid,) = [
        pid for (pid,) in cluster.execute(f"SELECT pid FROM pg_stat_activity WHERE backend_type = '{backend_type}'")
    ]
    return pid


def assert_next_scheduled_run_succeeds(kind):
    """What the worker runs for the next occurrence of the schedule."""
    occurrence = (timezone.now() + timedelta(days=1)).replace(microsecond=0).isoformat()
    assert scheduled_job("maldives", kind, scheduled_for=occurrence) == "succeeded", BackupRun.objects.latest(
        "created_at"
    ).error
    run = BackupRun.objects.get(details__scheduled_for=occurrence)
    path = Path(run.copies.get(artifact="main", location__kind="primary").location.path) / run.key
    assert path.is_file() and run.sha256 == sha256_file(path)
    return run


def assert_nothing_archived_is_lost(server, archived):
    """Every segment and backup archived before the fault still reads back with its sha256, and no gap."""
    present = set(WalSegment.objects.filter(server=server, deleted_at=None).values_list("name", flat=True))
    assert set(archived) <= present
    result = verify_all()
    assert result["bad"] == 0 and result["unreachable"] == 0, result
    first, last = (walnames.segno_of(n, server.wal_segment_size) for n in (min(archived), max(archived)))
    assert walchain.missing_segments(server, first, last) == []


def sha256_file(path):
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- Helpers. ------------------------------------------------------------------------------


def streaming(root, kind):
    """Ciphertext is arriving in the run's temporary file: the backup is mid-stream."""
    for partial in (Path(root) / "maldives" / kind).glob(".*.partial"):
        try:
            if partial.stat().st_size > 0:
                return partial
        except FileNotFoundError:
            continue
    return None


def archive_some(cluster, server, count=3):
    """A few archived and ingested segments: what must survive the fault."""
    names = []
    for i in range(count):
        cluster.execute(f"CREATE TABLE IF NOT EXISTS before_{i}(x int)", dbname=DB)
        names.append(switch_wal(cluster))
    wait_archived(cluster, names[-1], timeout=60)
    walingest.ingest(server)
    assert set(names) <= set(WalSegment.objects.values_list("name", flat=True))
    return names


def start_backup(settings, kind, tool, env=None):
    """`manage.py backup` in its own process, with `tool` held by SIGSTOP once its bytes stream into
    the primary location: a fault then always lands mid-stream, even where the server compresses a
    small cluster faster than a poll. A base backup through pg_basebackup and zstd is compressed on
    the client; BASE_BACKUP (no process of its own: gpg is the one held) is the server's, the
    default. The caller sends the fault, then `resume(pid)`."""
    env = ({"BASE_COMPRESSION": "client"} if tool in ("pg_basebackup", "zstd") else {}) | (env or {})
    proc = manage(settings, "backup", "maldives", "--kind", kind, "--json", env=env)
    child = "gpg" if tool == "BASE_BACKUP" else tool
    try:
        pid = wait_for(lambda: tool_of(proc.pid, child), timeout=60, every=0.002, what=f"{child} to start")
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not streaming(settings.BACKUP_ROOT, kind):  # let it run a few milliseconds at a time
            assert time.monotonic() < deadline, "timed out waiting for bytes to stream"
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.003)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.02)
    except BaseException:
        end_backup(proc)
        raise
    return proc, pid


def end_backup(proc):
    """The backup's processes, stopped or not, killed; for a test that fails half-way."""
    for pid in descendants(proc.pid):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.kill()
    proc.communicate()


def tool_of(pid, name):
    """The process below pid that streams the backup: for gpg, the one encrypting, not the short
    `gpg --list-config` python-gnupg runs first (holding that one held nothing)."""
    found = child_named(pid, name)
    if found and name == "gpg":
        try:
            argv = Path(f"/proc/{found}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return found if b"--symmetric" in argv or b"--encrypt" in argv else None
    return found


def resume(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def json_result(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def big_server(big_cluster, passphrase_file, backup_root, wal_spool):
    """The ~110 MB cluster, registered and archiving by push into this test's spool."""
    server = register(big_cluster)
    enable_push(big_cluster)
    server.refresh_from_db()
    yield server
    if not big_cluster.is_running():
        big_cluster.start()


# --- 1. SIGKILL of pg_basebackup mid base backup. -------------------------------------------


def test_sigkill_of_pg_basebackup_mid_stream_fails_the_run_and_loses_nothing(big_server, big_cluster, settings):
    archived = archive_some(big_cluster, big_server)
    proc, pg_basebackup = start_backup(settings, "base", "pg_basebackup")
    tree = descendants(proc.pid)
    os.kill(pg_basebackup, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 1 and "pg_basebackup was killed by SIGKILL" in err
    assert_failed_clearly(json_result(out)["id"], "pg_basebackup was killed by SIGKILL", "nothing of this run is kept")
    assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    assert_no_orphans(tree)
    # The server let go of the aborted backup: no base backup is in progress there.
    wait_for(lambda: not big_cluster.execute("SELECT 1 FROM pg_stat_progress_basebackup"), what="the walsender to end")
    assert_next_scheduled_run_succeeds("base")
    assert_nothing_archived_is_lost(big_server, archived)


def test_sigkill_of_zstd_mid_stream_fails_the_run_and_leaves_no_artifact_and_no_process(
    big_server, big_cluster, settings
):
    archived = archive_some(big_cluster, big_server)
    proc, zstd = start_backup(settings, "base", "zstd")
    tree = descendants(proc.pid)
    assert child_named(proc.pid, "pg_basebackup") and child_named(proc.pid, "gpg")
    os.kill(zstd, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)

    # zstd's death is the reason given, not pg_basebackup's (stopped because nothing read it).
    assert proc.returncode == 1 and "zstd was killed by SIGKILL" in err
    assert_failed_clearly(json_result(out)["id"], "zstd was killed by SIGKILL", "nothing of this run is kept")
    assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    assert_no_orphans(tree)
    wait_for(lambda: not big_cluster.execute("SELECT 1 FROM pg_stat_progress_basebackup"), what="the walsender to end")
    assert_next_scheduled_run_succeeds("base")
    assert_nothing_archived_is_lost(big_server, archived)


def test_sigkill_of_gpg_mid_stream_of_a_backup_the_server_compresses_ends_it_on_the_server_too(
    big_server, big_cluster, settings
):
    archived = archive_some(big_cluster, big_server)
    proc, gpg = start_backup(settings, "base", "BASE_BACKUP")
    assert not child_named(proc.pid, "pg_basebackup") and not child_named(proc.pid, "zstd")
    tree = descendants(proc.pid)
    os.kill(gpg, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)

    # One line that says what to do, where it read "gpg failed (exit -9)".
    said = (
        "gpg was killed by signal 9 (SIGKILL) while encrypting the base backup the server sends: nothing was "
        "kept; run the backup again, and check the machine's memory (the OOM killer, in dmesg) if it recurs"
    )
    assert proc.returncode == 1 and said in err
    # The portal cancelled the BASE_BACKUP: the server is not left in backup mode.
    run_id = json_result(out)["id"]
    assert_base_backup_aborted(run_id, said, tree, big_cluster, big_server, archived, settings.BACKUP_ROOT)


def test_a_server_that_stalls_mid_base_backup_with_its_connection_open_is_ended_by_backup_timeout(
    big_server, big_cluster, settings
):
    """The walsender held by SIGSTOP: the socket stays open and sends neither bytes nor an error.
    BACKUP_TIMEOUT ends the run, which says so; nothing of it is kept, no process is left, and once
    the server moves again it is not left in backup mode."""
    archived = archive_some(big_cluster, big_server)
    # The timeout counts from gpg's start, and start_backup steps gpg along until bytes arrive.
    proc, gpg = start_backup(settings, "base", "BASE_BACKUP", env={"BACKUP_TIMEOUT": "20"})
    tree = descendants(proc.pid)
    walsender = None
    try:
        walsender = backend_pid(big_cluster, "walsender")
        os.kill(walsender, signal.SIGSTOP)
        resume(gpg)  # gpg takes what is on the way; then nothing more comes
        out, err = proc.communicate(timeout=120)
    except BaseException:
        end_backup(proc)
        raise
    finally:
        if walsender is not None:
            resume(walsender)

    assert proc.returncode == 1 and "timed out after 20 s" in err, err
    run_id = json_result(out)["id"]
    assert_base_backup_aborted(
        run_id, "timed out after 20 s", tree, big_cluster, big_server, archived, settings.BACKUP_ROOT
    )


def test_a_checkpoint_that_does_not_end_keeps_the_run_beating_until_backup_timeout_then_cancels_it(
    big_server, big_cluster, settings
):
    """BASE_BACKUP's fast checkpoint held (the checkpointer stopped by SIGSTOP): the run's heartbeat
    goes on while it waits, so it is not taken for a dead worker; BACKUP_TIMEOUT ends it with that
    said, and the server is told, so its walsender ends while the checkpoint still hangs."""
    archived = archive_some(big_cluster, big_server)
    checkpointer = backend_pid(big_cluster, "checkpointer")
    os.kill(checkpointer, signal.SIGSTOP)
    try:
        proc = manage(settings, "backup", "maldives", "--kind", "base", "--json", env={"BACKUP_TIMEOUT": "10"})
        try:
            run = wait_for(lambda: BackupRun.objects.filter(kind="base", status="running").first(), timeout=30)
            beats = set()

            def beating():
                beats.add(BackupRun.objects.get(pk=run.pk).heartbeat_at)
                return len(beats - {None}) >= 3

            wait_for(beating, timeout=9, every=0.2, what="three heartbeats while the checkpoint waits")
            out, err = proc.communicate(timeout=60)
        except BaseException:
            end_backup(proc)
            raise
        assert proc.returncode == 1 and "BASE_BACKUP's checkpoint did not end within 10 s" in err, err
        assert_failed_clearly(json_result(out)["id"], "checkpoint did not end within 10 s")
        # Cancelled: no walsender waits on for the checkpoint, which has not ended yet.
        wait_for(
            lambda: not big_cluster.execute("SELECT 1 FROM pg_stat_activity WHERE backend_type = 'walsender'"),
            timeout=10,
            what="the walsender to end",
        )
    finally:
        resume(checkpointer)
    assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    assert_next_scheduled_run_succeeds("base")
    assert_nothing_archived_is_lost(big_server, archived)


def test_archiving_that_fails_during_a_base_backup_fails_it_at_the_wal_wait_and_keeps_not_even_its_manifest(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """The manifest is encrypted while the run waits for the backup's WAL (backups.base,
    keeping_manifest): when the wait fails, that file too is gone with the run."""
    enable_push(sample_cluster)
    archived = archive_some(sample_cluster, server)
    # The spool turns read-only to PostgreSQL: the backup's own segment is never archived.
    spool = spool_dir(server)
    spool.chmod(0o555)
    settings.WAL_WAIT_SECONDS = 3
    try:
        occurrence = timezone.now().replace(microsecond=0).isoformat()
        assert scheduled_job("maldives", "base", scheduled_for=occurrence) == "failed"
        run = BackupRun.objects.get(details__scheduled_for=occurrence)
        assert_failed_clearly(run.pk, "was not archived within 3 s", "manage.py checkserver maldives")
        assert run.details["keys"][1].endswith(".backup_manifest.gpg")
        assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
        assert not list(Path(settings.BACKUP_ROOT).rglob("*.backup_manifest.gpg"))
    finally:
        spool.chmod(0o755)
    settings.WAL_WAIT_SECONDS = 60
    wait_for(lambda: not walhealth.archiver_failure(server), 90, "the archiver to catch up", every=0.5)
    assert_next_scheduled_run_succeeds("base")
    assert_nothing_archived_is_lost(server, archived)


def test_a_tablespace_outside_the_data_directory_is_refused_by_name_and_leaves_nothing(
    big_server, big_cluster, settings
):
    place = Path(big_cluster.datadir).parent / "tablespace"  # where the postgres user can reach
    place.mkdir()
    chown_to_db_user(place)
    big_cluster.execute(f"CREATE TABLESPACE elsewhere LOCATION '{place}'")
    try:
        proc = manage(settings, "backup", "maldives", "--kind", "base", "--json")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1
        assert_failed_clearly(json_result(out)["id"], "tablespaces outside its data directory")
        assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    finally:
        big_cluster.execute("DROP TABLESPACE elsewhere")
        place.rmdir()


# --- 2. The protected database stopped mid-backup. -------------------------------------------


@pytest.mark.parametrize(
    "kind, tool",
    [("logical", "pg_dump"), ("base", "pg_basebackup"), ("base", "BASE_BACKUP")],
)
def test_the_database_stopped_mid_backup_fails_the_run_and_the_next_one_succeeds(
    big_server, big_cluster, settings, kind, tool
):
    archived = archive_some(big_cluster, big_server)
    proc, held = start_backup(settings, kind, tool)
    tree = descendants(proc.pid)
    try:
        big_cluster.stop("fast")  # pg_ctl stop -m fast, as an operator (or a failover script) does
    except BaseException:
        end_backup(proc)
        raise
    resume(held)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 1, err
    assert_failed_clearly(json_result(out)["id"], f"{tool}: 127.0.0.1:{big_cluster.port} closed the connection mid-way")
    assert "was PostgreSQL stopped or restarted?" in err
    assert_nothing_good_looking_is_bad(settings.BACKUP_ROOT)
    assert_no_orphans(tree)
    big_cluster.start()
    assert_next_scheduled_run_succeeds(kind)
    assert_nothing_archived_is_lost(big_server, archived)


# --- 3. Two live workers taking the same scheduled job. --------------------------------------


@pytest.fixture
def workers(settings):
    """Start real `manage.py qcluster` processes on this test's database and broker; stopped after."""
    import subprocess
    import sys

    started = []

    def start(count, **env):
        for _ in range(count):
            with open(Path(settings.VAR_DIR) / f"qcluster-{os.getpid()}-{len(started)}.log", "w") as log:
                started.append(
                    subprocess.Popen(
                        [sys.executable, "manage.py", "qcluster"],
                        cwd=ROOT,
                        env=portal_env(settings, Q_SYNC="0", **env),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        return started

    yield start
    for proc in started:
        proc.terminate()  # qcluster stops cleanly on SIGTERM to its main process
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def test_two_workers_on_one_due_schedule_take_one_backup(server, passphrase_file, backup_root, workers, monkeypatch):
    from django_q.conf import Conf
    from django_q.models import Schedule, Task
    from django_q.tasks import async_task

    from backups.models import BackupSchedule
    from backups.tasks import sync_schedule

    Schedule.objects.all().delete()  # the portal-wide ones (monitor, copies): only the backup is due here
    due = sync_schedule(BackupSchedule.objects.get(server=server, job="logical"))  # made with the server, 0 2 * * *
    due.next_run = timezone.now().replace(microsecond=0) - timedelta(seconds=1)
    due.save()
    occurrence = Schedule.objects.get(pk=due.pk).next_run.isoformat()  # what the scheduler passes on
    # At-least-once delivery: the same occurrence also sits twice in the broker, as a redelivery would put it.
    monkeypatch.setattr(Conf, "SYNC", False)
    for _ in range(2):
        async_task("backups.tasks.scheduled_job", "maldives", "logical", scheduled_for=occurrence, sync=False)

    procs = workers(2)
    done = wait_for(
        lambda: (
            Task.objects.filter(func="backups.tasks.scheduled_job").count() == 3
            and list(Task.objects.filter(func="backups.tasks.scheduled_job"))
        ),
        timeout=90,
        what="both deliveries and the scheduler's own to be worked",
    )
    assert all(p.poll() is None for p in procs)  # both workers lived through it
    results = sorted(str(t.result) for t in done)
    assert results.count("succeeded") == 1, results
    assert all("already taken by run #" in r for r in results if r != "succeeded"), results

    run = BackupRun.objects.get(details__scheduled_for=occurrence)
    assert BackupRun.objects.count() == 1
    assert run.status == "succeeded" and run.trigger == "scheduled"
    # The scheduler hands the task to the broker before its transaction moves next_run on and
    # commits: a worker can finish the task ("already taken") before that commit is seen.
    wait_for(
        lambda: Schedule.objects.get(pk=due.pk).next_run > timezone.now(),
        timeout=30,
        what="the scheduler's commit of the schedule's next run",
    )
    assert_nothing_good_looking_is_bad(backup_root)
    trees = [descendants(p.pid) for p in procs]
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)
    assert_no_orphans([pid for tree in trees for pid in tree])
    assert_next_scheduled_run_succeeds("logical")
    assert verify_all()["bad"] == 0


def test_a_locked_server_gives_its_worker_back_and_the_other_servers_run_on_time(
    server, sample_cluster, passphrase_file, backup_root, workers, monkeypatch
):
    import ast

    from django_q.conf import Conf
    from django_q.models import Schedule, Task
    from django_q.tasks import async_task

    from backups.runner import HOST

    others = [register(sample_cluster, name=f"other{i}") for i in range(2)]
    Schedule.objects.all().delete()  # only the jobs queued below run
    held = BackupRun.objects.create(
        server=server,
        kind="logical",
        status="running",
        pid=os.getpid(),
        heartbeat_at=timezone.now(),
        details={"host": HOST},
    )
    # Three servers due, one worker, and the first in the queue is the locked one: waiting for
    # its lock inside the worker held the worker, and the others, for up to two hours.
    monkeypatch.setattr(Conf, "SYNC", False)
    for name in ["maldives", *(o.name for o in others)]:
        async_task("backups.tasks.scheduled_job", name, "logical", sync=False)
    workers(1, Q_WORKERS="1")
    wait_for(
        lambda: BackupRun.objects.filter(server__in=others, status="succeeded").count() == 2,
        timeout=120,
        what="the two unlocked servers' backups, on the one worker",
    )
    [locked] = [t for t in Task.objects.filter(func="backups.tasks.scheduled_job") if t.args[0] == "maldives"]
    assert "locked by another run: tried again in 60 s" in str(locked.result)
    retry = Schedule.objects.get(func="backups.tasks.scheduled_job", schedule_type=Schedule.ONCE)
    assert ast.literal_eval(retry.args)[:3] == ("maldives", "logical", None)
    assert timezone.now() < retry.next_run <= timezone.now() + timedelta(seconds=60)
    assert list(BackupRun.objects.filter(server=server)) == [held]  # nothing ran beside the holder


def test_a_run_on_another_host_is_judged_by_its_heartbeat_not_by_a_local_pid(server):
    from backups.runner import HOST, fail_orphans

    dead_pid = 2**22 + 7  # above pid_max's default: no such process here
    elsewhere = BackupRun.objects.create(
        server=server, kind="logical", status="running", pid=dead_pid, heartbeat_at=timezone.now(), details={}
    )
    elsewhere.details["host"] = f"not-{HOST}"
    elsewhere.save()
    here = BackupRun.objects.create(
        server=server, kind="base", status="running", pid=dead_pid, heartbeat_at=timezone.now(), details={"host": HOST}
    )
    assert fail_orphans() == [here]
    elsewhere.refresh_from_db()
    assert elsewhere.status == "running"  # its worker, on the other host, is beating


@pytest.mark.django_db(transaction=True)
def test_a_live_run_beats_whatever_it_waits_for_and_one_failed_meanwhile_is_never_made_succeeded(server, monkeypatch):
    """A base backup waits minutes for its WAL after its last byte: its process beats all along,
    so the orphan sweep leaves it be; and a run failed meanwhile (its files removed) stays failed
    when its worker comes back, never a success without its artifact."""
    from backups import runner

    monkeypatch.setattr(runner, "HEARTBEAT_EVERY", 0.1)
    stale = timezone.now() - runner.ORPHAN_AFTER - timedelta(minutes=1)
    waiting = BackupRun.objects.create(server=server, kind="base", status="running", heartbeat_at=stale, details={})
    with runner.beating(waiting):
        time.sleep(0.5)  # waiting for its WAL, say
        assert runner.fail_orphans() == []
    waiting.refresh_from_db()
    assert waiting.status == "running" and waiting.heartbeat_at > stale

    runner.finish_failed(waiting, "interrupted: no heartbeat; nothing it wrote is kept")
    runner.finish_succeeded(waiting)  # its worker, back from the wait
    waiting.refresh_from_db()
    assert waiting.status == "failed" and not BackupRun.objects.good().filter(pk=waiting.pk).exists()
    assert not JournalEntry.objects.filter(action="backup_succeeded").exists()


# --- 4. The portal's own database unreachable while the archive command runs. -------------------


@pytest.fixture
def portal_db(pg_base_dir, pg_template):
    """A PostgreSQL cluster of its own holding the portal's catalog: one this test can stop."""
    from backupportal.lib.pgcluster import Cluster

    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    cluster.start()
    cluster.create_database("portal")
    yield cluster
    cluster.destroy()


def test_archiving_goes_on_while_the_portals_database_is_down_and_ingest_catches_up(
    sample_cluster, portal_db, passphrase_file, backup_root, wal_spool, settings
):
    """The archive command never touches the catalog: WAL waits in the spool and is ingested later."""
    import subprocess
    import sys

    env = portal_env(settings, DATABASE_URL=f"postgres://postgres@127.0.0.1:{portal_db.port}/portal", Q_BROKER_URL="")

    def portal(*args):
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        return done.returncode, done.stdout, done.stderr

    def catalog(sql):
        return portal_db.execute(sql, dbname="portal")

    assert portal("migrate", "--noinput")[0] == 0
    assert portal("addserver", "maldives", "--dsn", sample_cluster.dsn(DB))[0] == 0
    code, out, err = portal("archivecommand", "maldives")
    assert code == 0, err
    with open(sample_cluster.datadir / "postgresql.conf", "a") as f:
        f.write("\n".join(line for line in out.splitlines() if not line.startswith("#")) + "\n")
    sample_cluster.restart()
    before = [switch_wal(sample_cluster) for _ in range(2)]
    wait_archived(sample_cluster, before[-1])
    assert portal("ingestwal", "maldives")[0] == 0

    portal_db.stop("fast")  # the portal's catalog goes down
    during = []
    for i in range(3):
        sample_cluster.execute(f"CREATE TABLE during_{i}(x int)", dbname=DB)
        during.append(switch_wal(sample_cluster))
    wait_archived(sample_cluster, during[-1])
    # PostgreSQL's archiver never saw a failure: each segment is durably in the spool.
    assert sample_cluster.execute("SELECT failed_count FROM pg_stat_archiver")[0][0] == 0
    spool = Path(settings.WAL_SPOOL) / "maldives"
    size = sample_cluster.execute("SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'")[0][0]
    assert all((spool / name).stat().st_size == size for name in during)
    # The worker's ingest fails in one clear line and takes nothing out of the spool.
    code, out, err = portal("ingestwal", "maldives")
    assert code == 1 and "the portal's own database cannot be used" in err and "Connection refused" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert all((spool / name).exists() for name in during)
    archiver_children = [p for p in descendants(sample_cluster.postmaster_pid()) if b"archive_wal" in cmdline(p)]
    assert_no_orphans(archiver_children)

    portal_db.start()
    code, out, err = portal("ingestwal", "maldives", "--json")  # what the every-minute schedule runs
    assert code == 0, err
    assert json_result(out)["servers"]["maldives"]["ingested"] >= len(during)
    catalogued = dict(catalog("SELECT name, segno FROM backups_walsegment WHERE deleted_at IS NULL"))
    assert set(before + during) <= set(catalogued)
    first, last = catalogued[min(before)], catalogued[max(during)]
    assert set(range(first, last + 1)) <= set(catalogued.values())  # no segment lost in between
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp") or n in during]
    good = {
        Path(path) / key: sha256
        for path, key, sha256 in catalog(
            "SELECT l.path, c.key, c.sha256 FROM backups_backupcopy c "
            "JOIN backups_storagelocation l ON l.id = c.location_id WHERE c.status = 'ok'"
        )
    }
    files = {p for p in Path(backup_root).rglob("*") if p.is_file() and not is_wal_key_file(p)}
    assert files == set(good) and all(sha256_file(p) == good[p] for p in files)
    # The portal is whole again: the next backup, which waits for its WAL to be ingested, succeeds.
    code, out, err = portal("backup", "maldives", "--kind", "base", "--json")
    assert code == 0 and json_result(out)["status"] == "succeeded", err


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# --- 5. A flipped byte in a base backup. ---------------------------------------------------------


def pitr_latest(datadir, port):
    from tests.helpers import run_command

    return run_command(
        "restore", "--server", "maldives", "--target", "latest", "--into-datadir", str(datadir), "--port", str(port)
    )


def test_a_flipped_byte_in_a_base_backup_is_caught_and_never_restored(
    server, sample_cluster, passphrase_file, backup_root, nas_root, wal_spool, restored
):
    from backupportal.lib.osuser import free_port
    from backups.models import StorageLocation
    from tests.helpers import rows, run_command

    StorageLocation.sync_from_settings()  # the NAS mirror
    enable_push(sample_cluster)
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded" and {c["status"] for c in base["copies"]} == {"ok"}, base
    run = BackupRun.objects.get(pk=base["id"])
    archived = archive_some(sample_cluster, server)
    primary, nas = (run.copies.get(artifact="main", location__name=name) for name in ("primary", "nas"))
    flip_byte_in(Path(primary.location.path) / primary.key)

    # The weekly verify (or a DBA's) marks the copy corrupt and alerts.
    result = run_command("verify", str(run.pk))
    assert result["_exit"] == 1 and result["bad"] == 1, result
    primary.refresh_from_db()
    assert primary.status == "bad" and "sha256" in primary.last_error
    assert Alert.objects.get(condition="corruption", state="open").server == server

    # PITR reads the good NAS copy instead, and the data is right.
    port = free_port()
    result = pitr_latest(restored(), port)
    assert result["status"] == "succeeded", result
    assert result["base_backup"] == run.pk
    assert rows(port, "SELECT count(*) FROM before_2") == [(0,)]

    # Now the last good copy rots too, unseen by verify: the restore catches it while streaming.
    flip_byte_in(Path(nas.location.path) / nas.key)
    datadir, port = restored(), free_port()
    result = pitr_latest(datadir, port)
    assert result["_exit"] == 1 and result["status"] == "failed", result
    assert f"base backup #{run.pk} cannot be read intact from any location" in result["error"]
    assert "nas: corrupt: sha256" in result["error"]
    assert not datadir.exists()  # nothing restored, nothing started
    nas.refresh_from_db()
    assert nas.status == "bad"
    assert all(child_named(os.getpid(), name) is None for name in ("tar", "zstd", "gpg"))

    # Every copy the catalog still calls good hashes right; the next scheduled base backup succeeds.
    for copy in BackupCopy.objects.filter(status="ok").select_related("location"):
        assert sha256_file(Path(copy.location.path) / copy.key) == copy.sha256, copy.key
    assert_next_scheduled_run_succeeds("base")
    present = set(WalSegment.objects.filter(server=server, deleted_at=None).values_list("name", flat=True))
    assert set(archived) <= present
    first, last = (walnames.segno_of(n, server.wal_segment_size) for n in (min(archived), max(archived)))
    assert walchain.missing_segments(server, first, last) == []


# --- 6. A run whose task the broker lost. ---------------------------------------------------------


def test_a_queued_run_whose_task_was_lost_is_failed_and_frees_the_lock(
    server, passphrase_file, backup_root, workers, monkeypatch, settings
):
    """ "Back up now" claims the lock, then the broker loses the task: no worker will ever start it."""
    import time

    from django_q.brokers import get_broker
    from django_q.conf import Conf

    from backups.tasks import enqueue_backup, run_backup

    settings.QUEUED_RUN_TIMEOUT = 3
    monkeypatch.setattr(Conf, "SYNC", False)
    broker = get_broker()
    broker.purge_queue()  # Redis outlives a test: what earlier tests left there is not ours
    lost = enqueue_backup(server, "logical", "alice")
    assert lost.ok, lost.message
    assert broker.queue_size() == 1
    broker.purge_queue()  # lost: a broker restarted without persistence, a flushed queue
    assert broker.queue_size() == 0
    procs = workers(1)  # a live worker does not help: it never hears of the run

    # Within the limit the lock holds, and the DBA is told which run holds it.
    refused = enqueue_backup(server, "logical", "bob")
    assert not refused.ok and f"already queued (run #{lost.run.pk})" in refused.message
    time.sleep(settings.QUEUED_RUN_TIMEOUT + 0.5)
    lost.run.refresh_from_db()
    assert lost.run.status == "queued"

    # Past it, the next claim fails the stale run (journaled, alerted) and goes ahead on the worker.
    following = enqueue_backup(server, "logical", "bob")
    assert following.ok, following.message
    run = assert_failed_clearly(lost.run.pk, "queued for ", "and never started: is the worker")
    assert run.started_at is None
    done = wait_for(
        lambda: BackupRun.objects.filter(pk=following.run.pk, status__in=["succeeded", "failed"]).first(),
        timeout=90,
        what="the next run to finish on the worker",
    )
    assert done.status == "succeeded", done.error
    assert all(p.poll() is None for p in procs)

    # Redelivered at last, the lost task runs nothing: the run stays failed and writes nothing.
    assert run_backup(lost.run.pk)["status"] == "failed"
    assert BackupRun.objects.get(pk=lost.run.pk).error == run.error
    assert_nothing_good_looking_is_bad(backup_root)
