"""The backup pipeline: a client tool's stdout → gpg → an atomic file in the primary location.

Plaintext never touches disk. Each external tool is started here and only here, with the
password in its environment (never argv), dying with its parent, and its errors turned
into one line a DBA understands.
"""

import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from backupportal.lib.childenv import child_env
from backupportal.lib.pgerrors import explain
from backups import tables
from backups.crypto import Encryption, die_with_parent, gpg_failure
from backups.storage import StorageError

HEARTBEAT_EVERY = 2.0  # seconds between progress/heartbeat writes to the catalog


class BackupFailed(Exception):
    """The run failed; the message is what the run page and the alert show."""


@dataclass
class Tool:
    """A running client tool (pg_dump, pg_dumpall, pg_basebackup) with its stderr kept."""

    argv: list
    env: dict
    proc: subprocess.Popen = None
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=30))

    def full_env(self):
        """The server's libpq settings and a clean environment (child_env): nothing of the portal's own.

        Neither our own libpq settings nor the S3 credentials are any business of the client tool.
        """
        return child_env(self.env)

    def start(self):
        full_env = self.full_env()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                preexec_fn=die_with_parent,
            )
        except FileNotFoundError:
            raise BackupFailed(f"{self.argv[0]} not found: install the PostgreSQL client tools or set PG_BIN") from None
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        return self

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def error_line(self, server=None):
        name = os.path.basename(self.argv[0])
        if self.proc.returncode is not None and self.proc.returncode < 0:
            sig = signal.Signals(-self.proc.returncode).name
            return f"{name} was killed by {sig} before it finished: nothing of this run is kept"
        lines = [line for line in self.stderr_tail if line]
        errors = [line for line in lines if "error" in line.lower() or "fatal" in line.lower()] or lines
        if not errors:
            return f"{name} exited with code {self.proc.returncode}"
        return f"{name}: {explain(errors[-1], server)}" if server else f"{name}: {errors[-1]}"


class Progress:
    """Bytes written so far; the calling thread writes it to the run every few seconds."""

    def __init__(self):
        self.bytes = 0
        self.error = None


def encrypt_to(
    store, key, tool: Tool, encryption: Encryption, on_tick=None, timeout=None, server=None, compress_level=None
):
    """Stream `tool`'s stdout through gpg into `store` under `key`. Returns (size, sha256).

    On any failure nothing is left under `key` (the temporary file is removed) and
    BackupFailed says why. `on_tick(progress)` runs in the calling thread every few seconds.
    """
    progress = Progress()
    result_box = {}
    try:
        writer = store.writer(key)
    except (OSError, StorageError) as e:  # a read-only or unwritable location: one line, nothing started
        raise BackupFailed(_storage_message(e)) from None

    def on_data(chunk):
        if progress.error is not None or not chunk:
            return False
        try:
            writer.write(chunk)
            progress.bytes += len(chunk)
        except (OSError, StorageError) as e:
            # Disk full or capacity reached: stop the producer now instead of dumping into the void.
            progress.error = e
            tool.kill()
        return False  # never buffer the ciphertext in memory

    def run_gpg():
        try:
            result_box["result"] = encryption.encrypt_stream(tool.proc.stdout, on_data, compress_level)
        except Exception as e:  # broken pipe and the like: reported below
            result_box["exception"] = e

    with writer:
        tool.start()
        gpg_thread = threading.Thread(target=run_gpg, daemon=True)
        gpg_thread.start()
        started = time.monotonic()
        while gpg_thread.is_alive():
            gpg_thread.join(HEARTBEAT_EVERY)
            if on_tick:
                on_tick(progress)
            if timeout and time.monotonic() - started > timeout:
                tool.kill()
                progress.error = progress.error or BackupFailed(f"timed out after {timeout} s: the run was stopped")
        rc = tool.proc.wait()
        if progress.error is not None:
            raise BackupFailed(_storage_message(progress.error))
        if rc != 0:
            raise BackupFailed(tool.error_line(server))
        if "exception" in result_box:
            raise BackupFailed(f"gpg: {result_box['exception']}")
        result = result_box["result"]
        if result.returncode != 0 or getattr(result, "on_data_failure", None):
            raise BackupFailed(gpg_failure(result))
        if writer.size == 0:
            raise BackupFailed(f"{os.path.basename(tool.argv[0])} produced no output")
        try:
            return writer.commit()
        except OSError as e:
            raise BackupFailed(_storage_message(e)) from None


def _storage_message(error):
    if isinstance(error, OSError) and error.errno == 28:
        return f"no space left on the backup location ({error.filename or settings.BACKUP_ROOT}): free space or add capacity"
    if isinstance(error, OSError):
        return f"cannot write the backup: {error.strerror} ({error.filename}): check the location's permissions"
    return str(error)


def snapshot_and_counts(server):
    """Export a snapshot and count the rows of every user table in it.

    Returns (connection, snapshot id, counts keyed by schema.table). The caller keeps the
    connection open until pg_dump has finished, so the snapshot stays valid and the counts
    match the dump exactly. Counting reads every table once more: bench/ROWCOUNTS.md measures
    what that costs next to the dump itself.
    """
    import psycopg

    try:
        conn = server.connect(autocommit=False)
    except psycopg.Error as e:
        raise BackupFailed(explain(e, server)) from None
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        counts = tables.count_all(conn)
    except psycopg.Error as e:
        conn.close()
        raise BackupFailed(f"counting the rows of every table failed: {explain(e, server)}") from None
    return conn, snapshot, counts


def heartbeat(run_model, run_id):
    """An on_tick that records progress and keeps the run alive in the catalog."""

    def tick(progress):
        run_model.objects.filter(pk=run_id).update(bytes_done=progress.bytes, heartbeat_at=timezone.now())

    return tick


def dump_compression_level():
    # Measured (bench/RESULTS.md): on realistic data gzip level 1 inside pg_dump gives an artifact
    # 6% larger than level 6 in under a third of the time; gpg does not compress again.
    return str(settings.PG_DUMP_COMPRESS)
