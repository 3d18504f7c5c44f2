"""PITR with the WAL fetched ahead of replay: the cluster starts once its base backup is in
place, restores/restore_wal.py hands recovery each segment the prefetcher staged, the staging
area stays a window, and a segment that turns out corrupt mid-recovery fails the restore
naming it, leaving nothing behind (no cluster, no directory, no thread, no helper process)."""

import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from backupportal.lib.osuser import chown_to_db_user, db_user_ids, free_port, run_as_db_user
from backupportal.lib.pgdatadir import make_base_dir
from backups import walingest
from backups.models import BackupCopy, WalSegment
from restores import pitr_prefetch, restore_wal
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
    assert not (datadir / "bp_restore_wal").exists()
    assert no_prefetch_thread()
    assert "restore_wal.py" in (datadir / "postgresql.auto.conf").read_text()


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
    staging.mkdir()
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
    assert (staging / "requested").read_text().strip() == here
    assert not list(pg_wal.glob("*.restoring"))

    code, err, _ = run_program(staging, failed, str(pg_wal / "RECOVERYXLOG"))
    assert code == restore_wal.FATAL and f"WAL segment {failed} cannot be read intact" in err

    # Planned, not staged, and no prefetcher beating: fatal (never "not found", which would promote).
    code, err, _ = run_program(staging, late, str(pg_wal / "RECOVERYXLOG"))
    assert code == restore_wal.FATAL and "prefetcher stopped" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives the WAL staging to the database OS user")
def test_installing_restore_wal_while_the_early_manifest_is_committed_beside_it_does_not_fail(tmp_path, monkeypatch):
    """The early manifest (restores.pitr_extract.Extraction) is fetched into the WAL staging on a
    thread of its own while the restore installs restore_wal.py there and gives the directory to
    the database OS user: its temporary file, listed by that chown, may be renamed before the
    chown reaches it. A CI run under load failed so: [Errno 2] on ..backup_manifest.early.fetching."""
    staging = tmp_path / "bp_restore_wal"
    staging.mkdir()
    fetching = staging / "..backup_manifest.early.fetching"
    fetching.write_bytes(b"{}")
    lchown = os.lchown

    def committed_meanwhile(path, *ids):
        if os.fspath(path) == str(fetching) and fetching.exists():  # listed, then renamed by the fetch
            os.replace(fetching, staging / ".backup_manifest.early")
        return lchown(path, *ids)

    monkeypatch.setattr(os, "lchown", committed_meanwhile)
    pitr_prefetch.install(staging, ["000000010000000000000003"])
    uid, _ = db_user_ids()
    assert {os.stat(p).st_uid for p in (staging, staging / pitr_prefetch.PROGRAM, staging / restore_wal.PLAN)} == {uid}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives the WAL staging to the database OS user")
def test_the_unchecked_wal_stays_closed_to_the_database_os_user_when_the_staging_is_given_to_it():
    """Recovery (restore_wal.py, as the database OS user) reads only segments the prefetcher
    checked and linked out of staging/unchecked: the staging's chown (every install, when the
    plan changes) must not open that directory to it."""
    base = make_base_dir(None, "bp-unchecked-")  # where the database OS user can reach
    try:
        staging = base / "bp_restore_wal"
        (staging / UNCHECKED).mkdir(parents=True)
        (staging / UNCHECKED / "000000010000000000000003").write_bytes(b"not checked yet")
        pitr_prefetch.install(staging, ["000000010000000000000003"])
        uid, _ = db_user_ids()
        assert os.stat(staging).st_uid == uid and os.stat(staging / pitr_prefetch.PROGRAM).st_uid == uid
        closed = os.stat(staging / UNCHECKED)
        assert (closed.st_uid, stat.S_IMODE(closed.st_mode)) == (0, 0o700)
        assert run_as_db_user(["cat", staging / restore_wal.PLAN]).stdout == "000000010000000000000003\n"
        denied = run_as_db_user(["cat", staging / UNCHECKED / "000000010000000000000003"])
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives the WAL staging to the database OS user")
def test_a_link_put_in_place_of_the_unchecked_directory_makes_root_own_or_close_nothing_else():
    """The staging directory is the database OS user's: anything running as that user (another
    cluster on this host) could put a symbolic link where staging/unchecked was. Closing it by
    name would have made root own that link's target and closed it (0700)."""
    base = make_base_dir(None, "bp-unchecked-")
    try:
        staging, elsewhere = base / "bp_restore_wal", base / "elsewhere"
        staging.mkdir()
        elsewhere.mkdir(mode=0o755)
        chown_to_db_user(elsewhere)
        (staging / UNCHECKED).symlink_to(elsewhere)
        with pytest.raises(RestoreFailed, match="is not the directory this restore made"):
            pitr_prefetch.install(staging, ["000000010000000000000003"])
        after = os.stat(elsewhere)
        assert (after.st_uid, stat.S_IMODE(after.st_mode)) == (db_user_ids()[0], 0o755)
    finally:
        shutil.rmtree(base)
