"""A PITR's base backup into the new data directory: decrypted from the first healthy copy,
decompressed by `zstd -d` when its run says zstd (older runs: gpg undid its own compression),
straight into `tar -x` run as the database OS user (started early, on a thread of its own,
while the WAL is staged), then checked against its manifest by pg_verifybackup before
recovery starts. Split from restores/pitr.py.
"""

import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backupportal.lib.childenv import child_env
from backupportal.lib.osuser import as_db_user, chown_to_db_user
from backupportal.lib.writeback import Writeback
from backups.binaries import backup_major, cluster_tool
from backups.copies import decrypt_here, settled
from backups.streams import FetchFailed, FileSink, decrypt_first_healthy, readable
from restores.pitr_plan import STAGING, RestoreFailed, encryption_of


def empty(directory, keep=()):
    for child in directory.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class TarSink:
    """Plaintext into `tar -x`, run as the database OS user so that it owns every file; through
    `zstd -d` first when the base backup's run recorded zstd (BackupRun.base_compression)."""

    def __init__(self, datadir: Path, compression="gpg"):
        self.datadir, self.compression = datadir, compression
        self.proc = self.unzstd = self.writeback = None
        self.stopped = False

    def open(self):
        if self.stopped:  # Extraction.stop(): no next copy is tried
            raise RestoreFailed("the extraction was stopped")
        self.proc = self.unzstd = None  # the processes of a copy tried before are done
        self.errors = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                as_db_user(["tar", "--extract", "--file=-", f"--directory={self.datadir}"]),
                stdin=subprocess.PIPE,
                stderr=self.errors,
                cwd=self.datadir,
                env=child_env(),
            )
            if self.compression == "zstd":
                self.unzstd_errors = tempfile.TemporaryFile()
                self.unzstd = subprocess.Popen(
                    ["zstd", "--decompress", "-q", "-c"],
                    stdin=subprocess.PIPE,
                    stdout=self.proc.stdin,
                    stderr=self.unzstd_errors,
                    env=child_env(),
                )
                self.proc.stdin.close()  # zstd alone writes into tar: tar sees the end when zstd ends
        except BaseException:
            self.kill()  # tar started, zstd could not be: nothing left running
            raise
        self.writeback = Writeback(self.datadir)  # the disk writes as tar goes, not at start-up

    def fileno(self):
        return (self.unzstd or self.proc).stdin.fileno()

    def failure(self):
        """Why tar or zstd stopped early (a full disk ...), or None while they run or when they succeeded.

        tar first: when it stops (a full disk), zstd's broken pipe is only the consequence."""
        if self.proc.poll() not in (None, 0):
            return f"tar could not extract the base backup: {self.stderr()}"
        if self.unzstd is not None and self.unzstd.poll() not in (None, 0):
            return f"zstd could not decompress the base backup: {self.tail(self.unzstd_errors)}"
        return None

    def stderr(self):
        return self.tail(self.errors)

    @staticmethod
    def tail(errors):
        errors.seek(0)
        return errors.read().decode(errors="replace")[-300:]

    def commit(self):
        if self.unzstd is not None:
            self.unzstd.stdin.close()
            self.unzstd.wait()
        self.proc.stdin.close()
        self.proc.wait()
        self.stop_writeback()
        if failure := self.failure():
            raise RestoreFailed(failure)

    def kill(self):
        for proc in (self.unzstd, self.proc):
            if proc is not None:
                proc.kill()
        self.stop_writeback(wait=False)  # what it would flush is about to be removed

    def stop_writeback(self, wait=True):
        if self.writeback is not None:
            self.writeback.stop(wait)

    def abort(self):
        self.kill()
        for proc in (self.unzstd, self.proc):
            if proc is not None:
                proc.wait()
        empty(self.datadir, keep=(STAGING,))


class Extraction:
    """The planned base backup's extraction, started on a thread of its own."""

    def __init__(self, plan):
        copies = readable(plan.base.copies.filter(artifact="main").select_related("location"))
        self.sink = TarSink(plan.datadir, plan.base.base_compression)
        args = (copies, self.sink, encryption_of(plan), f"base backup #{plan.base.pk}")
        pool = ThreadPoolExecutor(max_workers=1)
        self.future = pool.submit(decrypt_first_healthy, *args)
        pool.shutdown(wait=False)  # the thread ends with the fetch

    def notes(self):
        """Its notes, the bad copies it met marked here (the catalog stays on this thread)."""
        return settled(self.future.result)

    def stop(self):
        """Kill zstd and tar (gpg stops on the broken pipe) and wait, marking any bad copy it met;
        no further copy is opened.

        Called while another error propagates: that one is what the restore reports."""
        self.sink.stopped = True
        self.sink.kill()
        try:
            self.notes()
        except Exception:  # noqa: BLE001 - its own failure (tar killed, say) is a consequence
            pass


def extract_base(plan, early=None):
    if early is not None:
        plan.notes += early.notes()
    else:
        copies = readable(plan.base.copies.filter(artifact="main").select_related("location"))
        plan.notes += decrypt_here(
            copies,
            TarSink(plan.datadir, plan.base.base_compression),
            encryption_of(plan),
            f"base backup #{plan.base.pk}",
        )
    try:
        place_manifest(plan, plan.base, plan.datadir)
    except FetchFailed:
        empty(plan.datadir, keep=(STAGING,))  # an older base, if any, is extracted into it next
        raise
    if not (plan.datadir / "backup_manifest").exists():
        raise RestoreFailed(f"base backup #{plan.base.pk} holds no backup_manifest: it cannot be verified")


def place_manifest(plan, run, directory):
    """The backup_manifest of a backup the server compressed (its tar holds none: backups.basestream),
    decrypted from the run's "manifest" artifact into `directory`, for pg_verifybackup and
    pg_combinebackup. Any other tar carried its own."""
    if run.details.get("manifest_in_tar", True):
        return
    copies = readable(run.copies.filter(artifact="manifest").select_related("location"))
    path = directory / "backup_manifest"
    what = f"the backup_manifest of base backup #{run.pk}"
    plan.notes += decrypt_here(copies, FileSink(path), encryption_of(plan), what)
    chown_to_db_user(path)


def verify_base(plan):
    """pg_verifybackup: every file against the manifest, and the backup's own WAL, before recovery."""
    proc = subprocess.run(
        as_db_user(
            [
                str(cluster_tool(backup_major(plan.base), "pg_verifybackup", f"checking base backup #{plan.base.pk}")),
                f"--wal-directory={plan.staging}",
                f"--ignore={STAGING}",
                str(plan.datadir),
            ]
        ),
        capture_output=True,
        text=True,
        cwd=plan.datadir,
        env=child_env(),
        timeout=3600,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RestoreFailed(
            f"base backup #{plan.base.pk} does not match its manifest: {lines[0] if lines else 'pg_verifybackup failed'}"
        )
    plan.notes.append(f"pg_verifybackup: {proc.stdout.strip() or 'backup successfully verified'}")
