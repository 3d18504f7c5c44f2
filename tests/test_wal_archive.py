"""Push archiving against real clusters: the archive program as PostgreSQL runs it, the spool, the ingest."""

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from backupportal.lib.osuser import as_db_user, chown_to_db_user
from backups import walchain, walingest, walnames, walspool
from backups.models import BackupCopy, BackupSchedule, WalSegment
from backups.tasks import scheduled_job
from tests.helpers import (
    archive_as_postgres,
    descendants,
    enable_push,
    manage,
    run_command,
    switch_wal,
    wait_archived,
    wait_for,
)
from watching.models import Alert
from watching.monitor import check_wal

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"


def kill_tree(proc):
    """SIGKILL a process and everything below it (runuser -> sh -> python, or manage.py -> gpg)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # a short-lived child (zstd, gpg) that ended since it was listed
    proc.kill()
    proc.wait()


def test_archivecommand_prints_the_lines_and_installs_a_program_postgres_can_run(
    server, passphrase_file, backup_root, wal_spool
):
    result = run_command("archivecommand", "maldives")
    assert result["_exit"] == 0, result
    command = result["settings"]["archive_command"]
    assert command.startswith("'{ test -f ") and " || /usr/bin/env -i /usr/bin/python3 -I -S " in command
    assert command.endswith(" %p %f; }'")
    assert result["settings"]["archive_mode"] == "on" and result["settings"]["wal_level"] == "replica"
    assert int(result["settings"]["archive_timeout"]) <= server.rpo_minutes * 60
    program = Path(result["program"])
    assert program.parent == wal_spool and stat.S_IMODE(program.stat().st_mode) == 0o644
    spool = Path(result["spool"])
    # Only postgres (owner) and its group (the portal) can read the spool; setgid keeps the group.
    assert stat.S_IMODE(spool.stat().st_mode) == 0o2770 and spool.stat().st_uid == walspool.db_user_ids("postgres")[0]
    server.refresh_from_db()
    assert server.archiving == "push"
    jobs = set(BackupSchedule.objects.filter(server=server).values_list("job", flat=True))
    assert {"logical", "base", "incremental", "ingestwal"} <= jobs


def test_the_archive_program_is_idempotent_and_refuses_other_content(
    server, passphrase_file, backup_root, wal_spool, segment_file
):
    run_command("archivecommand", "maldives")
    server.refresh_from_db()
    name = "000000010000000000000042"
    first = segment_file(os.urandom(1024 * 1024))
    ok = archive_as_postgres(server, first, name)
    assert ok.returncode == 0, ok.stderr
    spooled = walspool.spool_dir(server) / name
    assert spooled.read_bytes() == first.read_bytes()
    assert stat.S_IMODE(spooled.stat().st_mode) == 0o640
    assert archive_as_postgres(server, first, name).returncode == 0  # an identical duplicate

    other = segment_file(os.urandom(1024 * 1024))
    refused = archive_as_postgres(server, other, name)
    assert refused.returncode == 1 and "different content" in refused.stderr
    assert spooled.read_bytes() == first.read_bytes()  # never overwritten

    assert walingest.ingest(server).ingested == [name]
    assert not spooled.exists()
    # After ingest the program compares with the sha256 the portal left behind.
    assert archive_as_postgres(server, first, name).returncode == 0
    assert archive_as_postgres(server, other, name).returncode == 1
    findings = check_wal(server)
    assert name in findings["archive_failing"]
    assert Alert.objects.get(condition="archive_failing").state == "open"


def test_an_archive_program_killed_mid_segment_leaves_nothing_that_looks_archived(
    server, passphrase_file, backup_root, wal_spool, segment_file
):
    run_command("archivecommand", "maldives")
    name = "000000010000000000000007"
    data = os.urandom(1024 * 1024)
    fifo_dir = segment_file(b"").parent
    fifo = fifo_dir / "fifo"
    os.mkfifo(fifo)
    chown_to_db_user(fifo)
    command = walspool.archive_command(server).replace("%p", str(fifo)).replace("%f", name)
    program = subprocess.Popen(as_db_user(["sh", "-c", command]), cwd="/")
    with open(fifo, "wb") as writer:
        writer.write(data[: len(data) // 2])
        writer.flush()
        spool = walspool.spool_dir(server)
        wait_for(lambda: [n for n in os.listdir(spool) if n.endswith(".tmp")], what="the copy to start")
        kill_tree(program)
    program.wait()
    assert not (spool / name).exists()
    assert walingest.ingest(server).ingested == []  # a temporary file is never taken for a segment
    # PostgreSQL retries: the whole segment arrives.
    assert archive_as_postgres(server, segment_file(data), name).returncode == 0
    assert walingest.ingest(server).ingested == [name]
    assert WalSegment.objects.get(name=name).sha256 == hashlib.sha256(data).hexdigest()


def ready_segments(cluster, count):
    """`count` full segments waiting in pg_wal, marked ready, with nothing archiving them yet."""
    cluster.configure(archive_mode="on", archive_command="")  # PostgreSQL 15: .ready files pile up
    cluster.restart()
    for _ in range(count):
        cluster.execute("CREATE TABLE backlog(x int); DROP TABLE backlog", dbname=DB)
        switch_wal(cluster)
    status = cluster.datadir / "pg_wal" / "archive_status"
    return sorted(p.name.removesuffix(".ready") for p in status.iterdir() if p.name.endswith(".ready"))


def test_one_call_copies_the_next_ready_segments_and_their_calls_need_no_python(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    ready = ready_segments(sample_cluster, 8)
    assert len(ready) >= 8
    result = run_command("archivecommand", "maldives")
    spool, pg_wal = walspool.spool_dir(server), sample_cluster.datadir / "pg_wal"
    planted = os.urandom((pg_wal / ready[5]).stat().st_size)  # another file under a ready segment's name
    (spool / ready[5]).write_bytes(planted)

    assert archive_as_postgres(server, pg_wal / ready[0], ready[0]).returncode == 0
    for name in ready[:5]:  # its own segment and those after it, up to the one it must not touch
        assert (spool / name).read_bytes() == (pg_wal / name).read_bytes()
        assert stat.S_IMODE((spool / name).stat().st_mode) == 0o640
    assert (spool / ready[5]).read_bytes() == planted and not (spool / ready[6]).exists()
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]

    # Each segment copied ahead is marked once durable, and none other.
    assert sorted(os.listdir(spool / "ahead")) == ready[1:5]

    # Those copied ahead are acknowledged by the shell alone; the others still need the program,
    # and so does one written after its copy was marked (its marker is older than %p).
    program = Path(result["program"])
    program.rename(program.with_name("moved-away"))
    try:
        assert archive_as_postgres(server, pg_wal / ready[1], ready[1]).returncode == 0
        assert archive_as_postgres(server, pg_wal / ready[6], ready[6]).returncode != 0
        later = (spool / "ahead" / ready[4]).stat().st_mtime + 5
        os.utime(pg_wal / ready[4], (later, later))
        assert archive_as_postgres(server, pg_wal / ready[4], ready[4]).returncode != 0
    finally:
        program.with_name("moved-away").rename(program)
    assert archive_as_postgres(server, pg_wal / ready[4], ready[4]).returncode == 0  # the program compared it
    # Chained with another tool, the line fails when either fails, whichever path it takes.
    for name in (ready[2], ready[7]):  # acknowledged by the shell; through the program (nothing ahead)
        for chained, expected in (("{} && exit 7", 7), ("false && {}", 1), ("{} && true", 0)):
            line = (
                chained.format(walspool.archive_command(server)).replace("%p", str(pg_wal / name)).replace("%f", name)
            )
            assert subprocess.run(as_db_user(["sh", "-c", line]), cwd="/").returncode == expected, (name, chained)
    refused = archive_as_postgres(server, pg_wal / ready[5], ready[5])
    assert refused.returncode == 1 and "different content" in refused.stderr
    assert (spool / ready[5]).read_bytes() == planted  # never overwritten

    # Ingesting a segment takes its marker away with it: a file archived again under that name
    # goes through the program, which compares it with the sha256 the ingest kept.
    (spool / ready[5]).unlink()
    ingested = walingest.ingest(server).ingested
    assert ready[1] in ingested and not (spool / "ahead" / ready[1]).exists()
    assert not set(os.listdir(spool / "ahead")) & set(ingested)
    # A marker a portal outside the spool's group could not remove goes with the program's next batch.
    (spool / "ahead" / ready[1]).touch()
    chown_to_db_user(spool / "ahead" / ready[1])
    later = [n for n in ready_segments(sample_cluster, 2) if n not in ready]
    assert archive_as_postgres(server, pg_wal / later[0], later[0]).returncode == 0
    assert not (spool / "ahead" / ready[1]).exists() and (spool / "ahead" / later[1]).exists()


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_archived_segments_are_ingested_encrypted_and_catalogued(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    enable_push(sample_cluster)
    sample_cluster.execute("CREATE TABLE a(x int)", dbname=DB)
    name = switch_wal(sample_cluster)
    wait_archived(sample_cluster, name)
    # What the worker's every-minute schedule (ingestwal:maldives) runs.
    assert scheduled_job("maldives", "ingestwal")["last"] == name
    server.refresh_from_db()
    segment = WalSegment.objects.get(server=server, name=name)
    size = sample_cluster.execute("SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'")[0][0]
    assert segment.size == size and server.wal_segment_size == size
    assert segment.segno == walnames.segno_of(name, size) and segment.timeline == 1
    copy = BackupCopy.objects.get(wal_segment=segment)
    stored = Path(copy.location.path) / copy.key
    assert stored.read_bytes()[:1] != b"\0" and copy.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert copy.size < segment.size  # compressed inside gpg (uncompressed, gpg only adds bytes)


def execute_retrying(cluster, sql, timeout=30):
    """Through a crash restart: the server refuses connections for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return cluster.execute(sql, dbname=DB)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_killing_postgresqls_archiver_loses_no_segment(server, sample_cluster, passphrase_file, backup_root, wal_spool):
    enable_push(sample_cluster)
    names = []
    for i in range(6):
        if i == 3:
            archiver = sample_cluster.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'")[0][0]
            os.kill(archiver, signal.SIGKILL)
        # IF NOT EXISTS: the crash restart may cut the reply to a CREATE that did commit.
        execute_retrying(sample_cluster, f"CREATE TABLE IF NOT EXISTS t{i}(x int)")
        names.append(execute_retrying(sample_cluster, "SELECT pg_walfile_name(pg_switch_wal())")[0][0])
    wait_archived(sample_cluster, names[-1], timeout=60)
    assert archiver not in [r[0] for r in sample_cluster.execute("SELECT pid FROM pg_stat_activity")]
    walingest.ingest(server)
    first, last = (walnames.segno_of(n, server.wal_segment_size) for n in (names[0], names[-1]))
    assert walchain.missing_segments(server, first, last) == []
    assert set(names) <= set(WalSegment.objects.values_list("name", flat=True))


@pytest.mark.django_db(transaction=True)  # the worker is another process: it must see committed rows
def test_a_worker_killed_mid_ingest_loses_no_segment(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, tmp_path
):
    enable_push(sample_cluster)
    names = []
    for i in range(12):
        sample_cluster.execute(f"CREATE TABLE t{i}(x int)", dbname=DB)
        names.append(switch_wal(sample_cluster))
    wait_archived(sample_cluster, names[-1])
    spool = walspool.spool_dir(server)

    worker = manage(settings, "ingestwal", "maldives")
    # Killed as soon as the first segment is catalogued: the ingest takes a dozen segments in well
    # under a second now, so a looser look (every 0.1 s, two catalogued) found it done at times.
    wait_for(lambda: WalSegment.objects.exists(), what="the ingest to start", every=0.002)
    kill_tree(worker)  # its encryption threads too, mid-stream
    assert [n for n in os.listdir(spool) if walnames.SEGMENT.match(n)], "the kill came too late to land mid-ingest"

    again = manage(settings, "ingestwal", "maldives")
    assert again.wait(120) == 0, again.stderr.read()
    catalogued = dict(WalSegment.objects.values_list("name", "sha256"))
    assert set(names) <= set(catalogued)
    assert not [n for n in os.listdir(spool) if walnames.SEGMENT.match(n)]
    # Every archived file decrypts (gpg with the WAL key, then zstd) to exactly the bytes that were catalogued.
    gpg = f"gpg --batch --quiet --pinentry-mode loopback --homedir {tmp_path / 'gnupg'}"
    (tmp_path / "gnupg").mkdir(mode=0o700)
    (key_file,) = (backup_root / "wal" / "maldives" / "wal" / "keys").glob("*.key.gpg")
    walkey = tmp_path / "walkey"
    subprocess.run(
        f"umask 077; {gpg} --passphrase-file {passphrase_file} -o {walkey} -d {key_file}", shell=True, check=True
    )
    for copy in BackupCopy.objects.filter(wal_segment__name__in=names).select_related("wal_segment", "location"):
        plain = subprocess.run(
            f"{gpg} --passphrase-file {walkey} --decrypt {Path(copy.location.path) / copy.key} | zstd -d",
            shell=True,
            capture_output=True,
        )
        assert plain.returncode == 0, plain.stderr
        assert hashlib.sha256(plain.stdout).hexdigest() == catalogued[copy.wal_segment.name]


def test_archivecommand_refuses_a_spool_postgres_cannot_reach(server, passphrase_file, backup_root, settings):
    closed = Path(tempfile.mkdtemp(prefix="bp-closed-"))  # 0700, root's: like a checkout under /root
    settings.WAL_SPOOL = closed / "walspool"
    try:
        result = run_command("archivecommand", "maldives")
    finally:
        shutil.rmtree(closed)
    assert result["_exit"] == 1 and "the postgres user cannot reach" in result["_stderr"], result
    assert "set WAL_SPOOL" in result["_stderr"]
    server.refresh_from_db()
    assert server.archiving == "none"


def test_a_base_backup_of_a_server_that_does_not_archive_is_refused_with_what_to_do(
    server, passphrase_file, backup_root
):
    result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "failed" and "does not archive WAL" in result["error"]
    assert "archivecommand maldives" in result["error"] and not list(Path(backup_root).rglob("*.gpg"))
