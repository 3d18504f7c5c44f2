"""PITR with the WAL fetched ahead of replay: the cluster starts once its base backup is in
place, restores/restore_wal.py hands recovery each segment the prefetcher staged, the staging
area stays a window, and a segment that turns out corrupt mid-recovery fails the restore
naming it, leaving nothing behind (no cluster, no directory, no thread, no helper process)."""

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from backupportal.lib.osuser import chown_to_db_user, db_user_ids, free_port, run_as_db_user
from backups import walingest
from backups.models import BackupCopy, WalSegment
from restores import pitr_prefetch, pitr_staging, restore_wal
from restores.pitr_plan import UNCHECKED, RestoreFailed
from tests.helpers import (
    archive_some_wal,
    child_named,
    enable_push,
    flip_byte_in,
    pitr,
    rows,
    run_command,
    switch_wal,
    wait_archived,
    write,
)

pytest_plugins = ["tests.walfixtures"]

SEGMENTS = 14
WINDOW = 2


def no_prefetch_thread():
    return not [t.name for t in threading.enumerate() if t.name.startswith("pitr-")]


def no_helper_left():
    """No tar, zstd or gpg of ours, and no restore_wal.py of a cluster left waiting for WAL."""
    waiting = []
    for proc in Path("/proc").iterdir():
        try:
            if b"restore_wal.py" in (proc / "cmdline").read_bytes():
                waiting.append(proc.name)
        except OSError:
            continue
    return not waiting and all(child_named(os.getpid(), name) is None for name in ("tar", "zstd", "gpg"))


@pytest.fixture
def watched(monkeypatch):
    """What the real prefetcher did: the most segments staged at once, the ones replay passed
    (removed), and where recovery was when a fetch failed."""
    seen = {"most": 0, "removed": 0, "asked_at_failure": None}
    settle, prune, fail = pitr_prefetch.Prefetch.settle, pitr_prefetch.Prefetch.prune, pitr_prefetch.Prefetch.fail

    def counting_settle(self, segment, future):
        settle(self, segment, future)
        seen["most"] = max(seen["most"], len(self.present))

    def counting_prune(self, wanted):
        prune(self, wanted)
        seen["removed"] = len(self.removed)

    def noting_fail(self, segment, error):
        seen["asked_at_failure"] = self.requested()
        fail(self, segment, error)

    monkeypatch.setattr(pitr_prefetch.Prefetch, "settle", counting_settle)
    monkeypatch.setattr(pitr_prefetch.Prefetch, "prune", counting_prune)
    monkeypatch.setattr(pitr_prefetch.Prefetch, "fail", noting_fail)
    return seen


def base_and_wal(cluster, server):
    enable_push(cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(cluster, "CREATE TABLE probe(n int)")
    for n in range(3):
        write(cluster, f"INSERT INTO probe VALUES ({n})")
    archive_some_wal(cluster, tables=SEGMENTS)
    write(cluster, "INSERT INTO probe VALUES (99)")
    wait_archived(cluster, switch_wal(cluster))
    walingest.ingest(server)


def test_recovery_replays_wal_fetched_while_it_runs_through_a_small_window(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, settings, watched
):
    settings.PITR_PREFETCH_SEGMENTS = WINDOW
    base_and_wal(sample_cluster, server)
    datadir, port = restored(), free_port()
    result = pitr(datadir, port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert result["wal_segments"] > SEGMENTS
    assert rows(port, "SELECT max(n), count(*) FROM probe") == [(99, 4)]
    assert rows(port, f"SELECT count(*) FROM pg_tables WHERE tablename = 't{SEGMENTS - 1}'") == [(1,)]
    # Recovery asked for segments while later ones were still being fetched: the ones it had
    # passed were removed, and the staging area never held more than about a window.
    assert watched["removed"] > 0
    assert watched["most"] <= WINDOW + pitr_prefetch.KEEP_BEHIND + 3 < result["wal_segments"]
    log = (datadir / "log" / "pitr-restore.log").read_text()
    assert log.count("restored log file") >= SEGMENTS
    # The staging was the portal's, outside the data directory, and is gone.
    conf = (datadir / "postgresql.auto.conf").read_text()
    assert f"{pitr_staging.staging_for(result['id'])}/restore_wal.py" in conf
    assert not list(Path(settings.PITR_STAGING_ROOT).iterdir())
    assert no_prefetch_thread()


def test_a_segment_found_corrupt_mid_recovery_fails_the_pitr_naming_it_and_leaves_nothing(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, settings, watched
):
    settings.PITR_PREFETCH_SEGMENTS = WINDOW
    base_and_wal(sample_cluster, server)
    # Far enough past the base backup that the cluster is recovering when it is fetched.
    victim = WalSegment.objects.filter(server=server, segno__isnull=False).order_by("-segno")[3]
    for copy in victim.copies.select_related("location"):
        flip_byte_in(Path(copy.location.path) / copy.key)
    datadir = restored()
    result = pitr(datadir, free_port(), "--target", "latest")
    assert result["_exit"] == 1 and result["status"] == "failed", result
    assert f"WAL segment {victim.name} cannot be read intact" in result["error"], result
    assert "corrupt: " in result["error"]
    assert watched["asked_at_failure"] >= 0  # recovery had asked for WAL by then
    assert not datadir.exists()
    assert no_prefetch_thread()
    assert no_helper_left()
    bad = BackupCopy.objects.filter(wal_segment=victim)
    assert bad.exists() and not bad.filter(status=BackupCopy.Status.OK).exists()


# --- restore_wal.py alone, as PostgreSQL runs it (the system Python, no environment) -----------


def run_program(staging, name, target):
    started = time.monotonic()
    proc = subprocess.run(
        [
            "/usr/bin/env",
            "-i",
            "/usr/bin/python3",
            "-I",
            "-S",
            str(staging / "restore_wal.py"),
            str(staging),
            name,
            target,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_restore_wal_answers_not_found_fast_copies_staged_files_and_stops_on_a_failure(tmp_path):
    staging, pg_wal = tmp_path / "staging", tmp_path / "pg_wal"
    (staging / restore_wal.ASKED).mkdir(parents=True)
    pg_wal.mkdir()
    here, failed, late = "000000010000000000000003", "000000010000000000000004", "000000010000000000000005"
    pitr_prefetch.install(staging, [here, failed, late, "00000001.history"])
    (staging / here).write_bytes(b"wal" * 1000)
    (staging / f"{failed}.failed").write_text(f"WAL segment {failed} cannot be read intact from any location\n")

    code, err, took = run_program(staging, "00000002.history", str(pg_wal / "RECOVERYHISTORY"))
    assert code == restore_wal.NOT_FOUND and took < 5 and not (pg_wal / "RECOVERYHISTORY").exists()
    code, err, _ = run_program(staging, "000000010000000000000099", str(pg_wal / "RECOVERYXLOG"))
    assert code == restore_wal.NOT_FOUND

    code, err, _ = run_program(staging, here, str(pg_wal / "RECOVERYXLOG"))
    assert code == 0 and (pg_wal / "RECOVERYXLOG").read_bytes() == b"wal" * 1000
    assert (staging / restore_wal.ASKED / restore_wal.REQUESTED).read_text().strip() == here
    assert pitr_staging.requested(staging) == here
    assert not list(pg_wal.glob("*.restoring"))

    code, err, _ = run_program(staging, failed, str(pg_wal / "RECOVERYXLOG"))
    assert code == restore_wal.FATAL and f"WAL segment {failed} cannot be read intact" in err

    # Planned, not staged, and no prefetcher beating: fatal (never "not found", which would promote).
    code, err, _ = run_program(staging, late, str(pg_wal / "RECOVERYXLOG"))
    assert code == restore_wal.FATAL and "prefetcher stopped" in err


# --- the staging directory is the portal's: nothing on its path is the database OS user's ------

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only root keeps the WAL staging from the database OS user")
SEGMENT = "000000010000000000000003"


@pytest.fixture
def staging_base():
    base = Path(tempfile.mkdtemp(prefix="bp-staging-"))  # root's, in the session's directory (not pytest's 0700)
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@ROOT_ONLY
def test_recovery_reads_the_staged_wal_and_writes_only_its_request_and_can_move_nothing(staging_base):
    """A PITR's staging was inside the data directory, which PostgreSQL gives to the database OS
    user: anything running as that user (another cluster here, a restored copy's superuser by
    COPY ... PROGRAM) could swap it, or staging/unchecked, for a link while root wrote and removed
    WAL-named files there. Now it is root's, outside: that user reads what recovery needs, writes
    its request, and can rename, replace or remove nothing."""
    staging = pitr_staging.make(staging_base / "pitr-staging" / "restore-7")
    (staging / UNCHECKED / SEGMENT).write_bytes(b"not checked yet")
    pitr_prefetch.install(staging, [SEGMENT])
    os.link(staging / UNCHECKED / SEGMENT, staging / SEGMENT)
    pitr_staging.readable(staging / SEGMENT)  # as the prefetcher does once the segment passed its checks

    modes = {p.name: (os.stat(p).st_uid, stat.S_IMODE(os.stat(p).st_mode)) for p in (staging.parent, staging)}
    assert modes == {"pitr-staging": (0, 0o711), "restore-7": (0, 0o750)}
    assert os.stat(staging / restore_wal.ASKED).st_uid == db_user_ids()[0]
    assert run_as_db_user(["cat", staging / restore_wal.PLAN]).stdout == f"{SEGMENT}\n"
    assert run_as_db_user(["cat", staging / SEGMENT]).stdout == "not checked yet"
    assert run_as_db_user(["ls", staging.parent]).returncode != 0  # traversed, not listed
    for argv in (
        ["mv", staging / UNCHECKED, staging / "away"],
        ["ln", "-s", "/etc", staging / "elsewhere"],
        ["rm", "-f", staging / SEGMENT],
        ["mv", staging, staging.parent / "away"],
        ["sh", "-c", f"echo x >> {staging / SEGMENT}"],
        ["cat", staging / UNCHECKED / SEGMENT],
    ):
        denied = run_as_db_user(argv)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, argv
    # restore_wal.py as PostgreSQL runs it, as that user: the segment copied, the request noted.
    target = staging_base / "pg_wal"
    target.mkdir()
    chown_to_db_user(target)
    program = [
        "/usr/bin/env", "-i", "/usr/bin/python3", "-I", "-S", staging / pitr_prefetch.PROGRAM, staging, SEGMENT,
        target / "RECOVERYXLOG",
    ]  # fmt: skip
    assert run_as_db_user(program).returncode == 0
    assert (target / "RECOVERYXLOG").read_bytes() == b"not checked yet"
    assert pitr_staging.requested(staging) == SEGMENT
    pitr_staging.remove(staging)
    assert not staging.exists()


@ROOT_ONLY
def test_the_request_is_read_without_following_a_link_or_waiting_on_a_fifo(staging_base):
    staging = pitr_staging.make(staging_base / "pitr-staging" / "restore-8")
    secret = staging_base / "secret"
    secret.write_text(SEGMENT)
    asked = staging / restore_wal.ASKED / restore_wal.REQUESTED
    run_as_db_user(["ln", "-s", secret, asked])
    assert asked.is_symlink() and pitr_staging.requested(staging) == ""
    asked.unlink()
    assert run_as_db_user(["mkfifo", asked]).returncode == 0
    assert pitr_staging.requested(staging) == ""  # at once: a FIFO is not opened for a wait


@ROOT_ONLY
@pytest.mark.parametrize(
    "how, said",
    [
        ("writable", "above can be written by a user other than root"),
        ("owned", "above belongs to postgres"),
        ("closed", "cannot be traversed by the postgres OS user"),
        ("sticky root", "pitr-staging can be written by a user other than root"),
        ("their link", "pitr-staging is a symbolic link"),
    ],
)
def test_a_staging_root_the_database_os_user_could_change_or_cannot_reach_is_refused(staging_base, how, said):
    above = staging_base / "above"
    above.mkdir()
    root = above / "pitr-staging"
    if how == "writable":
        above.chmod(0o777)  # not sticky: anyone may rename what is in it
    elif how == "owned":
        chown_to_db_user(above)
    elif how == "closed":
        above.chmod(0o700)
    elif how == "sticky root":  # PITR_STAGING_ROOT=/tmp, say: made 0711 it would have lost its sticky bit
        root.mkdir()
        root.chmod(0o1777)
    else:  # a link the database OS user made in a sticky directory: it could point it elsewhere later
        above.chmod(0o1777)
        (staging_base / "real").mkdir()
        assert run_as_db_user(["ln", "-s", staging_base / "real", root]).returncode == 0
    with pytest.raises(RestoreFailed, match=said) as refused:
        pitr_staging.make(root / "restore-9")
    assert "set PITR_STAGING_ROOT elsewhere" in str(refused.value)
    assert not (root / "restore-9").exists()
    if how == "sticky root":
        assert stat.S_IMODE(root.stat().st_mode) == 0o1777
    if how == "their link":
        assert stat.S_IMODE((staging_base / "real").stat().st_mode) == 0o755


@ROOT_ONLY
def test_a_staging_root_made_under_a_strict_umask_can_be_traversed(staging_base):
    """The worker runs under umask 077: PITR_STAGING_ROOT and its missing parents are made
    traversable whatever it is (0700 had refused the first PITR, and for good)."""
    was = os.umask(0o077)
    try:
        staging = pitr_staging.make(staging_base / "var" / "deeper" / "pitr-staging" / "restore-10")
    finally:
        os.umask(was)
    modes = [stat.S_IMODE(os.stat(d).st_mode) for d in (staging.parents[2], staging.parents[1], staging.parent)]
    assert modes == [0o755, 0o755, 0o711]
    assert run_as_db_user(["test", "-x", staging / restore_wal.ASKED]).returncode == 0


def test_a_decrypted_file_is_never_written_through_a_link_at_its_temporary_name(tmp_path):
    """FileSink writes a backup_manifest into a data directory, the database OS user's: a link
    put at its temporary name must not have the portal write (as root) where it points."""
    from backups.streams import FileSink

    victim = tmp_path / "victim"
    victim.write_text("precious")
    sink = FileSink(tmp_path / "backup_manifest")
    sink.tmp.symlink_to(victim)
    sink.open()
    sink.write(b"{}")
    sink.commit()
    assert victim.read_text() == "precious"
    assert (tmp_path / "backup_manifest").read_bytes() == b"{}" and not sink.tmp.exists()


def test_chown_to_the_database_user_skips_an_entry_renamed_between_the_listing_and_its_chown(tmp_path, monkeypatch):
    """chown_to_db_user lists, then changes each name: what another thread renamed meanwhile
    (the early manifest's fetch committing its file) is skipped, not an error. A CI run under
    load once failed so: [Errno 2] on ..backup_manifest.early.fetching."""
    if db_user_ids() is None:
        pytest.skip("only root gives files to the database OS user")
    directory = tmp_path / "given"
    directory.mkdir()
    fetching = directory / "..backup_manifest.early.fetching"
    fetching.write_bytes(b"{}")
    lchown = os.lchown

    def committed_meanwhile(path, *ids):
        if os.fspath(path) == str(fetching) and fetching.exists():  # listed, then renamed by the fetch
            os.replace(fetching, directory / ".backup_manifest.early")
        return lchown(path, *ids)

    monkeypatch.setattr(os, "lchown", committed_meanwhile)
    chown_to_db_user(directory)
    assert os.stat(directory).st_uid == db_user_ids()[0]
