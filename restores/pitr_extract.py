"""A PITR's base backup into the new data directory: decrypted from the first healthy copy
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
from backupportal.lib.osuser import as_db_user
from backups.binaries import backup_major, cluster_tool
from backups.copies import decrypt_here, settled
from backups.streams import decrypt_first_healthy, readable
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
    """Plaintext into `tar -x`, run as the database OS user so that it owns every file."""

    def __init__(self, datadir: Path):
        self.datadir = datadir

    def open(self):
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            as_db_user(["tar", "--extract", "--file=-", f"--directory={self.datadir}"]),
            stdin=subprocess.PIPE,
            stderr=self.errors,
            cwd=self.datadir,
            env=child_env(),
        )

    def fileno(self):
        return self.proc.stdin.fileno()

    def failure(self):
        """Why tar stopped early (a full disk ...), or None while it runs or when it succeeded."""
        if self.proc.poll() in (None, 0):
            return None
        return f"tar could not extract the base backup: {self.stderr()}"

    def stderr(self):
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-300:]

    def commit(self):
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RestoreFailed(f"tar could not extract the base backup: {self.stderr()}")

    def abort(self):
        self.proc.kill()
        self.proc.wait()
        empty(self.datadir, keep=(STAGING,))


class Extraction:
    """The planned base backup's extraction, started on a thread of its own."""

    def __init__(self, plan):
        copies = readable(plan.base.copies.filter(artifact="main").select_related("location"))
        self.sink = TarSink(plan.datadir)
        args = (copies, self.sink, encryption_of(plan), f"base backup #{plan.base.pk}")
        pool = ThreadPoolExecutor(max_workers=1)
        self.future = pool.submit(decrypt_first_healthy, *args)
        pool.shutdown(wait=False)  # the thread ends with the fetch

    def notes(self):
        """Its notes, the bad copies it met marked here (the catalog stays on this thread)."""
        return settled(self.future.result)

    def stop(self):
        """Kill tar (gpg stops on the broken pipe) and wait, marking any bad copy it met.

        Called while another error propagates: that one is what the restore reports."""
        proc = getattr(self.sink, "proc", None)
        if proc is not None:
            proc.kill()
        try:
            self.notes()
        except Exception:  # noqa: BLE001 - its own failure (tar killed, say) is a consequence
            pass


def extract_base(plan, early=None):
    if early is not None:
        plan.notes += early.notes()
    else:
        copies = readable(plan.base.copies.filter(artifact="main").select_related("location"))
        plan.notes += decrypt_here(copies, TarSink(plan.datadir), encryption_of(plan), f"base backup #{plan.base.pk}")
    if not (plan.datadir / "backup_manifest").exists():
        raise RestoreFailed(f"base backup #{plan.base.pk} holds no backup_manifest: it cannot be verified")


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
