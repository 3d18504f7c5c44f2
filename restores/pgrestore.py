"""How a dump is fed to pg_restore: piped from the decryption (nothing on disk) or from a
private scratch file with -j, the schema first from the table of contents; the restore's session
settings, and one flush of its WAL at the end.
restores/logical.py chooses the copy and the database; this module runs pg_restore on it.
"""

import os
import re
import shutil
import subprocess
import threading

import psycopg
from django.conf import settings
from django.utils import timezone

from backupportal.lib.childenv import child_env
from backupportal.lib.pgerrors import explain
from backupportal.lib.scratch import scratch_dir
from backups.binaries import conninfo_dbname
from backups.crypto import die_with_parent, gpg_failure
from backups.pipeline import BackupFailed, Tool
from backups.storage import StorageError
from restores import dumparchive, dumpstream, targetdb
from restores.models import RestoreRun
from restores.targetdb import RestoreFailed, created


def tool_for(target, dbname, program, *args):
    """pg_restore `program` into `dbname`, which goes as a connection string of its own: a bare
    name holding '=' would be read as one, and could take the tool and PGPASSWORD elsewhere."""
    argv = [str(program), "--exit-on-error", "--no-password", f"--dbname={conninfo_dbname(dbname)}", *args]
    env = target.libpq_env(dbname)
    env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {restore_session()}".strip()  # after any of the environment's
    return Tool(argv, env)


def restore_session():
    """The restore's own sessions (PGOPTIONS): index builds sort in memory rather than in
    temporary files, and a commit does not wait for its WAL flush (flush_wal flushes them all
    at the end). Both are per session: nothing changes for the server or the restored database.
    The copy's own default_transaction_read_only, once applied, is not the restore's: the last
    pg_restore, of event triggers, runs after it (the timeouts: Server.libpq_env)."""
    return (
        f"-c maintenance_work_mem={settings.RESTORE_MAINTENANCE_WORK_MEM} -c synchronous_commit=off {targetdb.WRITABLE}"
    )


def restore_piped(reader, target, dbname, encryption, restore, creation, command, held):
    created(creation, target)
    tool = tool_for(target, dbname, *command)
    tool.proc = subprocess.Popen(
        tool.argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=tool.full_env(),  # not the portal's environment: no S3 keys for pg_restore
        preexec_fn=die_with_parent,
    )
    threading.Thread(target=tool._drain_stderr, daemon=True).start()
    state = {"bytes": 0, "error": None, "start": b""}

    def on_data(chunk):
        if not chunk or state["error"]:
            return False
        if len(state["start"]) < held.wanted():
            state["start"] += chunk[: held.wanted() - len(state["start"])]
        try:
            tool.proc.stdin.write(chunk)
            state["bytes"] += len(chunk)
        except BrokenPipeError as e:  # pg_restore stopped reading: its stderr says why
            state["error"] = e
        return False

    result = decrypt_with_progress(lambda: encryption.decrypt_stream(reader, on_data), lambda: state["bytes"], restore)
    try:
        tool.proc.stdin.close()
    except BrokenPipeError:
        pass
    rc = tool.proc.wait()
    if "exception" in result:
        raise result["exception"]
    if not result["result"].ok:
        raise RestoreFailed(gpg_failure(result["result"]))
    if rc != 0:
        raise RestoreFailed(tool.error_line(target))
    held.verified(state["start"])  # the stream's sha256 and gpg's check passed
    held.check()
    flush_wal(target, dbname)


def restore_parallel(reader, target, dbname, encryption, restore, creation, command, head, held):
    """pg_restore -j needs a seekable file: gpg decrypts into a private scratch file (removed
    after; the plaintext does not pass through Python). Meanwhile the schema (pre-data) is
    restored from `head`, the table of contents read_properties decrypted a moment before:
    pre-data needs nothing else; and then the tables' rows are loaded from the file as gpg
    writes it (restores.dumpstream). The rest of the data and post-data (indexes, constraints)
    then run with -j from the completed file, once its sha256 and gpg's check have passed.

    bench/restore_jobs.py measured the alternatives (the data streamed into one pg_restore as gpg
    writes the file, then post-data -j: slower, as one job loads the data)."""
    scratch = scratch_dir("restore")
    pre_data = loading = None
    try:
        pre_data = _PreData(target, dbname, head, creation, command) if head else None
        path = scratch / "dump"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        decrypted = threading.Event()
        if pre_data is not None and settings.RESTORE_STREAM_DATA:
            loading = _Loading(path, decrypted, target, dbname, command, head, pre_data, scratch)
        try:
            result = decrypt_with_progress(
                lambda: encryption.decrypt_to_fd(reader, fd), lambda: os.fstat(fd).st_size, restore
            )
        finally:
            os.close(fd)
            decrypted.set()
        if "exception" in result or not result["result"].ok:
            if loading is not None:
                loading.abandon()
            if "exception" in result:
                raise result["exception"]
            raise RestoreFailed(gpg_failure(result["result"]))
        created(creation, target)
        if held.held:  # event triggers (or subscriptions) held back: the verified file's start must be their TOC
            with open(path, "rb") as f:
                held.verified(f.read(held.wanted()))
            held.check()  # before the rest is restored
        sections = []
        if pre_data is not None:
            pre_data.check(path)
            sections = ["--section=data", "--section=post-data"]
        done = loading.finish() if loading is not None else set()
        # The listing read_properties made is this file's once pre_data checked its start is the head.
        listed = held.listing if pre_data is not None else None
        command, triggers = triggers_last(command, path, scratch, held, listed, done)
        for args in ([*command, f"--jobs={settings.RESTORE_JOBS}", *sections], triggers):
            if args is None:
                continue
            tool = tool_for(target, dbname, *args, str(path))
            tool.start()
            if tool.proc.wait() != 0:
                raise RestoreFailed(tool.error_line(target))
        flush_wal(target, dbname)
    finally:
        if loading is not None:
            loading.abandon()  # never a COPY or a pg_restore of it left behind, whatever failed
        if pre_data is not None:
            pre_data.join()  # never a pg_restore left behind, whatever failed
        shutil.rmtree(scratch, ignore_errors=True)


class _Loading(threading.Thread):
    """restores.dumpstream's Loader, once the schema is in and the file begins with the table of
    contents it came from; nothing is loaded when either is not so (the restore then fails on
    it, or pg_restore loads everything as before for an archive the Loader does not read)."""

    def __init__(self, path, decrypted, target, dbname, command, head, pre_data, scratch):
        super().__init__(daemon=True)
        self.pre_data, self.head, self.target = pre_data, head, target
        options = f"{target.connection_settings(dbname).get('options') or ''} {restore_session()}".strip()
        plain = [arg for arg in command if not str(arg).startswith("--use-list=")]

        def post_data_tool(dump_ids):
            """pg_restore of an early build: `dump_ids`, the entry, then its comments."""
            use = scratch / f"early-{dump_ids[0]}"
            use.write_text("".join(f"{dump_id};\n" for dump_id in dump_ids))
            return tool_for(target, dbname, *plain, f"--use-list={use}")

        self.loader = dumpstream.Loader(
            path,
            decrypted,
            lambda: target.connect(dbname, options=options),
            post_data_tool,
            head,
            settings.RESTORE_JOBS,
            target,
        )
        self.start()

    def run(self):
        try:
            self.pre_data.join()
            if self.pre_data.error is not None:
                return  # said by pre_data.check once the copy is verified
            if self.loader.file.pread(len(self.head), 0) != self.head:
                return  # pre_data.check says so once the copy is verified
            self.loader.run()
        except dumparchive.Unsupported:
            self.loader.done.clear()  # nothing was loaded: the archive is read by pg_restore alone
        except Exception as e:  # noqa: BLE001 - said by finish(), never lost with the thread
            self.loader.error = self.loader.error or e
        finally:
            self.loader.file.close()

    def finish(self):
        """The dump ids loaded here; RestoreFailed when the loading failed."""
        self.join()
        if self.loader.error is not None:
            raise RestoreFailed(dumpstream.failure(self.loader.error, self.target))
        return set(self.loader.done)

    def abandon(self):
        self.loader.stop_now()
        self.join()


# A table's trigger in pg_restore -l's listing, or a comment or security label that may be on one
# (one on something else matched too is only created a moment later, after the data).
TABLE_TRIGGER_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:TRIGGER |(?:COMMENT|SECURITY LABEL) .* TRIGGER )")


def triggers_last(command, path, scratch, held, listed=None, done=frozenset()):
    """(command, the command that creates the dump's table triggers after it, or None).

    pg_restore -j creates a table's triggers once that table's rows are loaded, but a partitioned
    table has no rows of its own: its triggers came before its partitions' rows, and a BEFORE ROW
    trigger rewrote every restored row (an AFTER one added audit rows, a guard refused the load).
    One job restores in the dump's order, all data before any trigger: the same, here by a use-list.
    `done`: the dump ids restores.dumpstream loaded, left out of both."""
    if held.held:  # the list already without the event triggers
        listing = (held.directory / "without").read_text()
    elif listed is not None:
        listing = listed
    else:
        listed = subprocess.run([command[0], "--list", str(path)], capture_output=True, timeout=600, env=child_env())
        if listed.returncode != 0:
            said = listed.stderr.decode(errors="replace").strip().splitlines()
            raise RestoreFailed(f"pg_restore --list failed: {said[-1] if said else listed.returncode}")
        listing = listed.stdout.decode(errors="replace")
    lines = dumparchive.without(listing, done).splitlines()
    later = {line for line in lines if TABLE_TRIGGER_ENTRY.match(line)}
    if not later and not done:
        return command, None
    (scratch / "without-triggers").write_text("".join(f"{';' * (line in later)}{line}\n" for line in lines))
    (scratch / "triggers").write_text("".join(f"{line}\n" for line in lines if line in later))
    plain = [arg for arg in command if not str(arg).startswith("--use-list=")]
    triggers = [*plain, f"--use-list={scratch / 'triggers'}"] if later else None
    return [*plain, f"--use-list={scratch / 'without-triggers'}"], triggers


class _PreData(threading.Thread):
    """pg_restore --section=pre-data fed the table of contents alone, beside the decryption."""

    def __init__(self, target, dbname, head, creation, command):
        super().__init__(daemon=True)
        self.target, self.head, self.creation, self.error = target, head, creation, None
        self.dbname, self.command = dbname, command
        self.start()

    def run(self):
        try:
            created(self.creation, self.target)
            # Only now: the tool's environment checks the password by a connection to the new
            # database, which a role that may not connect for replication could not make before.
            tool = tool_for(self.target, self.dbname, *self.command, "--section=pre-data")
            if dumpstream.fed_toc(tool, self.head) != 0:
                self.error = RestoreFailed(tool.error_line(self.target))
        except (RestoreFailed, BackupFailed) as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - said by check(), never lost with the thread
            self.error = RestoreFailed(f"pg_restore --section=pre-data could not run: {e}")

    def check(self, path):
        """Its error, once the copy proved good; and the schema must come from this very copy:
        the start of the scratch file is what pg_restore was fed."""
        self.join()
        if self.error is not None:
            raise self.error
        with open(path, "rb") as f:
            if f.read(len(self.head)) != self.head:
                raise RestoreFailed(
                    "the start of the copy read differently twice (table of contents, then restore): "
                    "its location returns unstable data; check it and restore again"
                )


def flush_wal(target, dbname):
    """The restore's sessions commit without waiting for the WAL flush (restore_session): one
    transaction that commits the normal way flushes the WAL up to itself, so every commit of the
    restore before it is durable when the restore is reported done. No CHECKPOINT: that needs a
    privilege the portal's role may lack, and durability needs only the flush."""
    try:
        with targetdb.connect_to_copy(target, dbname) as conn:
            conn.execute("SET synchronous_commit = on")
            conn.execute("SELECT pg_current_xact_id()")  # an xid: its commit record is flushed
    except psycopg.Error as e:
        raise RestoreFailed(explain(e, target)) from None


def decrypt_with_progress(decrypt, bytes_done, restore):
    """Run `decrypt()` (gpg) in a thread; the calling thread records bytes_done() on the RestoreRun."""
    box = {}

    def work():
        try:
            box["result"] = decrypt()
        except StorageError as e:
            box["exception"] = e
        except Exception as e:
            box["exception"] = RestoreFailed(f"gpg: {e}")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(2.0)
        if restore is not None:
            RestoreRun.objects.filter(pk=restore.pk).update(bytes_done=bytes_done(), heartbeat_at=timezone.now())
    # A sha256 mismatch is raised by the reader at EOF in python-gnupg's copy thread, which
    # hands it back to decrypt_stream: it arrives here as box["exception"].
    return box
