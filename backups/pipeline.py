"""The backup pipeline: a client tool's stdout → (zstd, for base backups) → gpg → an atomic file
in the primary location (through backups.streams, as WAL ingest goes).

Plaintext never touches disk. Each external tool is started here and only here, with the
password in its environment (never argv), dying with its parent, and its errors turned
into one line a DBA understands.
"""

import errno
import io
import os
import signal
import subprocess
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from backupportal.lib.childenv import child_env
from backupportal.lib.pgerrors import explain
from backups import tables, tarpipe
from backups.crypto import Encryption, PipeSource, die_with_parent
from backups.storage import StorageError
from backups.streams import CHUNK, EncryptFailed, GpgKilled, Source, WriteFailed, encrypt_into


class BackupFailed(Exception):
    """The run failed; the message is what the run page and the alert show."""


@dataclass
class Tool:
    """A running client tool (pg_dump, pg_dumpall, pg_basebackup) with its stderr kept."""

    argv: list
    env: dict
    proc: subprocess.Popen = None
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=30))
    drainer: threading.Thread = None
    stdin = subprocess.DEVNULL
    missing = "install the PostgreSQL client tools or set PG_BIN"

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
                stdin=self.stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                preexec_fn=die_with_parent,
            )
        except FileNotFoundError:
            raise BackupFailed(f"{self.argv[0]} not found: {self.missing}") from None
        self.drainer = threading.Thread(target=self._drain_stderr, daemon=True)
        self.drainer.start()
        return self

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def incomplete(self):
        """Why the output of a tool that exited 0 is still not whole ("" when it is)."""
        return ""

    def error_line(self, server=None):
        name = os.path.basename(self.argv[0])
        if self.drainer is not None:
            # The tool has exited, but its last lines may still be on their way from the pipe: under
            # load the error once read "pg_restore exited with code 1" for want of them.
            self.drainer.join(timeout=10)
        if self.proc.returncode is not None and self.proc.returncode < 0:
            sig = signal.Signals(-self.proc.returncode).name
            return f"{name} was killed by {sig} before it finished: nothing of this run is kept"
        said = [line for line in self.stderr_tail if line]
        lines = [line for line in said if not any(g in line for g in ECHOES)] or said  # a worker killed says nothing
        errors = [line for line in lines if "error" in line.lower() or "fatal" in line.lower()] or lines
        if not errors:
            return f"{name} exited with code {self.proc.returncode}"
        return f"{name}: {explain(errors[-1], server)}" if server else f"{name}: {errors[-1]}"


# What a tool's leader says after one of its workers said why it failed (pg_restore -j,
# pg_dump -j), and pg_receivewal's last word after the server's ERROR: never the cause, which
# a line before it gives.
ECHOES = (
    "a worker process died unexpectedly",
    "worker process failed: exit code",
    "pg_receivewal: error: disconnected",
)


class Zstd(Tool):
    """zstd compressing what is written to its stdin on every core (-T0), for gpg to encrypt only.

    The stock recovery undoes it with `zstd -d`: base backups are `.tar.zst.gpg`."""

    stdin = subprocess.PIPE
    missing = "install zstd (apt-get install zstd; scripts/system-packages lists it)"

    def __init__(self, level):
        speed = f"--fast={-level}" if level < 0 else f"-{level}"  # BASE_ZSTD_LEVEL -N is --fast=N
        super().__init__(["zstd", "-T0", "-q", speed, "-c"], {})


class ToolSource(Source):
    """A client tool's stdout as what gpg encrypts, through `compressor` (a Zstd) when given;
    every process of it killed when the location fails, the run times out or gpg fails."""

    def __init__(self, tool: Tool, server=None, compressor: Tool = None):
        super().__init__()
        self.tool, self.server, self.compressor = tool, server, compressor
        self.name = os.path.basename(tool.argv[0])
        self.what = f"the output of {self.name}"
        self.stopped = False
        self.feeder = self.feed_error = None

    def open(self):
        stdout = self.tool.start().proc.stdout
        if self.compressor is None:
            return stdout
        try:
            self.compressor.start()
        except BackupFailed:
            self.tool.kill()
            self.tool.proc.wait()
            raise
        compressed = self.compressor.proc.stdout
        tarpipe.widen(stdout.fileno(), self.compressor.proc.stdin.fileno(), compressed.fileno())
        self.feeder = threading.Thread(target=self._feed, args=(stdout,), daemon=True)
        self.feeder.start()
        return PipeSource(compressed)  # gpg reads the compressor's output itself

    def _feed(self, stdout):
        """The tool's stdout into the compressor: by the tool's own forward() when it has one
        (a BaseBackupTool reads the tar's headers on the way), else copied here."""
        sink = self.compressor.proc.stdin
        try:
            if hasattr(self.tool, "forward"):
                self.tool.forward(sink)
            else:
                while chunk := stdout.read(CHUNK):
                    sink.write(chunk)
        except OSError:
            # The compressor died: the tool must not wait forever on a pipe nobody reads.
            self.tool.kill()
        except Exception as e:  # noqa: BLE001 - the tar could not be read (the sniffer): check() says so
            self.feed_error = e
            self.tool.kill()
        finally:
            try:
                sink.close()
            except OSError:
                pass

    def stop(self):
        self.stopped = True
        self.tool.kill()
        if self.compressor is not None:
            self.compressor.kill()

    def finish(self):
        self.tool.proc.wait()
        if self.compressor is not None:
            self.feeder.join()
            self.compressor.proc.wait()

    def check(self):
        if self.stopped:
            return  # stopped for a failure elsewhere (the location, the timeout, gpg): that one is reported
        # A compressor that died first took the tool down with it: its own death is the reason.
        if self.compressor is not None and self.compressor.proc.returncode != 0:
            raise EncryptFailed(self.compressor.error_line())
        if self.feed_error is not None:
            raise EncryptFailed(f"reading the output of {self.name} failed: {self.feed_error}")
        if self.tool.proc.returncode != 0:
            raise EncryptFailed(self.tool.error_line(self.server))
        if said := self.tool.incomplete():
            raise EncryptFailed(said)


def encrypt_to(
    store, key, tool: Tool, encryption: Encryption, on_tick=None, timeout=None, server=None, compressor=None
):
    """Stream `tool`'s stdout (through `compressor`, a Zstd, when given) through gpg into `store`
    under `key` (streams.encrypt_into); gpg compresses nothing.
    Returns (size, sha256); on any failure nothing is left under `key` and BackupFailed says why."""
    return encrypt_source(store, key, ToolSource(tool, server, compressor), encryption, on_tick, timeout)


def encrypt_bytes(store, key, data: bytes, encryption: Encryption):
    """Small plaintext held in memory (a backup's manifest) through gpg into `store` under `key`;
    (size, sha256), or BackupFailed with nothing left under `key`."""
    return encrypt_source(store, key, Source(io.BytesIO(data)), encryption)


def encrypt_source(store, key, source, encryption, on_tick=None, timeout=None):
    """A streams.Source (a ToolSource, a BASE_BACKUP the server compresses) through gpg into
    `store` under `key`: (size, sha256), or BackupFailed with nothing left under `key`."""
    try:
        return encrypt_into(store, key, source, encryption, None, on_tick, timeout)
    except WriteFailed as e:
        raise BackupFailed(_storage_message(e.error)) from None
    except GpgKilled as e:
        raise BackupFailed(f"{e}: nothing was kept; {_after_a_kill(e)}") from None
    except EncryptFailed as e:
        raise BackupFailed(str(e)) from None
    except (OSError, StorageError) as e:  # opening or committing the file: one line
        raise BackupFailed(_storage_message(e)) from None


def _after_a_kill(error):
    if "SIGKILL" in str(error):  # what the OOM killer sends
        return "run the backup again, and check the machine's memory (the OOM killer, in dmesg) if it recurs"
    return "run the backup again, and find what stopped gpg if it recurs"


def _storage_message(error):
    if isinstance(error, OSError) and error.errno == errno.EFBIG:  # a file-size limit (ulimit -f, the file system's)
        return f"the backup file grew past the largest file the location takes ({error.strerror}): raise the limit, or use a location that takes larger files"
    if isinstance(error, OSError) and error.errno == 28:
        return f"no space left on the backup location ({error.filename or settings.BACKUP_ROOT}): free space or add capacity"
    if isinstance(error, OSError):
        return f"cannot write the backup: {error.strerror} ({error.filename}): check the location's permissions"
    return str(error)


def exported_snapshot(server, dbname=None):
    """Export a snapshot for pg_dump --snapshot and lock every user table in it.

    Returns (connection, snapshot id, the user tables as the snapshot sees them). The caller keeps
    the connection open until pg_dump has finished, so the snapshot stays valid. The exporting
    transaction holds a lock on each table only (tables.lock_all), which keeps a TRUNCATE from
    landing between a table's count and the dump; the counting (SnapshotCounts) runs on a
    session of its own, one transaction per batch of tables: counting in the exporting
    transaction held a lock on every table and index until pg_dump ended, and ran out of shared
    memory on a database of a few thousand tables that pg_dump alone dumps.
    """
    import psycopg

    try:
        conn = server.connect(dbname, autocommit=False, options=_lock_wait())
    except psycopg.Error as e:
        raise BackupFailed(explain(e, server)) from None
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        listed = tables.user_tables(conn)  # in the snapshot, as the counting sees it
        tables.lock_all(conn, listed)
    except psycopg.Error as e:
        conn.close()
        raise _counting_failed(e, server) from None
    return conn, snapshot, listed


def _lock_wait():
    return f"-c lock_timeout={settings.BACKUP_LOCK_WAIT * 1000}"  # after the session guard's 0


def _counting_failed(error, server):
    import psycopg

    if isinstance(error, psycopg.errors.LockNotAvailable):
        return lock_not_granted()
    why = explain(error, server) if isinstance(error, psycopg.Error) else str(error)
    return BackupFailed(f"counting the rows of every table failed: {why}")


def lock_not_granted():
    return BackupFailed(
        f"a table's lock was not granted within {settings.BACKUP_LOCK_WAIT} s (BACKUP_LOCK_WAIT): another session "
        "holds or waits for an exclusive lock (ALTER TABLE, TRUNCATE, VACUUM FULL); the backup let go so that "
        "it can finish; it runs again at its next schedule"
    )


class SnapshotCounts:
    """The exact row count of every user table in the snapshot, and a digest of the rows of the
    tables `digested` (the critical ones: tables.content_digest), read on a session of their own
    while pg_dump dumps the same snapshot.

    Read before pg_dump started, they lengthened the time production's DDL waits behind the
    backup's locks by a whole read of every table (and of a large critical table's rows, hashed);
    beside it, the locks are held for the longer of the two. Counting reads every table once more:
    bench/ROWCOUNTS.md measures what that costs next to the dump itself.
    """

    def __init__(self, server, dbname, snapshot, listed, digested=()):
        self.server, self.dbname, self.snapshot, self.listed, self.digested = server, dbname, snapshot, listed, digested
        self.counts, self.digests, self.error = None, None, None
        self.session, self.stopped = None, threading.Event()
        self.thread = threading.Thread(target=self._read, name="snapshot-counts", daemon=True)
        self.thread.start()

    def _read(self):
        try:
            # `catalog` sees the latest catalog, which the planner reads, where the snapshot's
            # sessions see the old one (backups.unplanned.planned_safely).
            with (
                self.server.connect(self.dbname, options=_lock_wait()) as counter,
                self.server.connect(self.dbname, options=_lock_wait()) as catalog,
            ):
                self.session = counter
                self.counts = tables.count_all(counter, transaction=self._batch, listed=self.listed, catalog=catalog)
                self.digests = {}
                for name in self.digested:
                    with self._batch():
                        self.digests[name] = tables.content_digest(counter, name, catalog)
        except Exception as e:  # noqa: BLE001 - kept for result() to say: a thread's error is lost otherwise
            self.error = e
        finally:
            self.session = None

    @contextmanager
    def _batch(self):
        if self.stopped.is_set():
            raise Stopped
        with _in_snapshot(self.session, self.snapshot):
            yield

    def result(self):
        """(counts, digests) once read; BackupFailed saying why they could not be."""
        self.thread.join()
        if self.error is not None:
            raise _counting_failed(self.error, self.server)
        return self.counts, self.digests

    def ticks(self, on_tick):
        """`on_tick`, and the dump stopped as soon as the counting has failed: a run that fails
        anyway need not read the rest of production first."""

        def tick(out):
            on_tick(out)
            if self.error is not None and not self.stopped.is_set():
                out.fail(_counting_failed(self.error, self.server))

        return tick

    def stop(self):
        """The dump failed: the reading stops with it (at once, its query cancelled)."""
        self.stopped.set()
        session = self.session
        if session is not None:
            try:
                session.cancel_safe()
            except Exception:  # noqa: BLE001 - ended meanwhile: nothing left to cancel
                pass
        self.thread.join()


class Stopped(Exception):
    """SnapshotCounts.stop() came between two batches."""


@contextmanager
def _in_snapshot(conn, snapshot):
    """A read-only transaction of `conn` (autocommit) that sees what `snapshot` saw."""
    from psycopg import sql

    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        yield


def heartbeat(run_model, run_id):
    """An on_tick that records progress and keeps the run alive in the catalog."""

    def tick(progress):
        run_model.objects.filter(pk=run_id).update(bytes_done=progress.bytes, heartbeat_at=timezone.now())

    return tick


def dump_compression_level():
    # Measured (bench/RESULTS.md): on realistic data gzip level 1 inside pg_dump gives an artifact
    # 6% larger than level 6 in under a third of the time; gpg does not compress again.
    return str(settings.PG_DUMP_COMPRESS)
