"""A parallel logical restore's table data, loaded while gpg still decrypts the dump.

pg_restore -j reads a finished file: the data waited for the whole decryption, then pg_restore
inflated every table's rows itself (zlib, about 6 core-seconds a gigabyte of rows: a quarter of
the restore's CPU on two cores, bench/RESULTS.md). Here the custom-format archive is read as gpg
writes it into the scratch file: each table's COPY block is inflated (by ISA-L when installed,
2.3 times zlib's speed) and sent by COPY on RESTORE_JOBS connections of the portal's own; a job
with nothing else to do helps load a table another job reads, by a COPY of its own fed whole rows
(Share: one big table, which pg_restore -j loads on one job, is loaded on all of them); a small
table whose key foreign keys reference is loaded between two pieces of a big one (_key_waiting);
autovacuum is held off the tables until they are whole (_hold_autovacuum); and a
big table's indexes, primary or unique constraints and foreign keys (with the keys they reference)
are built by pg_restore (fed the table of contents alone) as soon as what they need is in, beside
the other tables' loading, never two on one table that pg_restore -j would keep apart. Everything
else (sequences' values, large objects, data as INSERTs, the remaining post-data) is left to the
pg_restore -j run on the verified file, by a use-list without `done`.

Nothing here is trusted before the copy is: a copy that fails its sha256 or gpg's check fails the
restore, and the new database is dropped, as with RESTORE_JOBS=1 (gpg piped into pg_restore).
The archive is read by restores.dumparchive: one it does not know (a version, a compression) is
restored by pg_restore alone.
"""

import collections
import subprocess
import threading
import zlib

import psycopg

try:  # ISA-L's inflate (python-isal): 2.6 core-seconds against 6.1 for zlib on the bench's dump
    from isal import isal_zlib as inflating
except ImportError:  # pragma: no cover - the stdlib's, slower, same streams
    inflating = zlib

from backupportal.lib.pgerrors import explain
from restores.dumparchive import BLOCK_BLOBS, BLOCK_DATA, Archive, Cursor, Ended, GrowingFile, Unsupported, skip_chunks
from restores.sqlscript import CODECS
from restores.targetdb import RestoreFailed

# A table's own post-data built early, beside the loading: one pg_restore each, so only for
# tables big enough that their index builds weigh (compressed bytes of their block).
EARLY_BYTES = 8 << 20
OUTPUT = 256 << 10  # rows sent by COPY in pieces of about this size, each ending at a row's end
# Pieces of a table's rows waiting for the jobs that help load it (Share): a few, memory stays flat.
SHARED_PIECES = 2
# When the schema took longer than the whole decryption (thousands of tables), nothing is left to
# overlap, and pg_restore -j loads many small tables with less per table than a COPY from here
# (3000 tables of 5 rows: 8.1 and 10.7 s streamed against 7.6 and 7.9 s, 2026-12-06).
MANY_TABLES = 200
# The session pg_restore's own connections set (pg_backup_archiver.c: _doSetFixedOutputState);
# the dump's encoding, standard_conforming_strings and search_path come from its own entries
# (Archive.session).
FIXED_STATE = (
    "SET statement_timeout = 0",
    "SET lock_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
    "SET check_function_bodies = false",
    "SET xmloption = content",
    "SET client_min_messages = warning",
    "SET row_security = off",
)


# The plain tables among the loaded ones, by the names the archive has for them (bytes in the
# dump's encoding, the session's client_encoding): their oids and options.
HOLDABLE = """
SELECT c.oid, c.reloptions FROM unnest(%s::bytea[], %s::bytea[]) t(namespace, tag)
 JOIN pg_namespace n ON convert_to(n.nspname::text, current_setting('client_encoding')) = t.namespace
 JOIN pg_class c ON c.relnamespace = n.oid AND convert_to(c.relname::text, current_setting('client_encoding')) = t.tag
WHERE c.relkind = 'r'
"""
AUTOVACUUM = "DO $$BEGIN EXECUTE format('ALTER TABLE %s {change}', {oid}::oid::regclass); END$$"


class TableFailed(Exception):
    """The server refused a table's rows."""

    def __init__(self, table, error):
        super().__init__(table)
        self.table, self.error = table, error


class Share:
    """A table's rows as they are read: the job reading them (its producer) hands whole rows, a
    piece at a time, to jobs with nothing else to do, each loading them by a COPY of its own into
    the same table. Guarded by the Loader's lock."""

    def __init__(self):
        self.pieces = collections.deque()
        self.helpers = 0  # jobs taking pieces now
        self.copying = 0  # helpers' COPYs not yet ended (committed, or failed)
        self.read = False  # the producer has handed out its last piece
        self.handed = 0  # pieces loaded by helpers


class Rows:
    """A table's inflated rows on their way to COPY: whole rows come out in pieces of about
    OUTPUT bytes, each ending at a row's end; the start of the next row waits for its rest."""

    def __init__(self, inflater):
        self.inflater, self.pending, self.size = inflater, [], 0
        # Our own COPY holds the start of a row longer than a piece: the rest of it goes there too.
        self.within_row = False

    def add(self, copy, compressed):
        """Inflate `compressed`: whole rows to hand out (a memoryview), or None while a piece fills
        (what cannot be cut at a row's end goes to `copy` itself)."""
        piece = self.inflater.decompress(compressed)
        if self.within_row:
            # A raw newline ends a row, escaped or not: the server's COPY FROM splits its input
            # into lines byte by byte (after conversion), as it does pg_restore's.
            end = piece.find(b"\n") + 1
            if not end:
                copy.write(piece)
                return None
            copy.write(memoryview(piece)[:end])
            piece, self.within_row = piece[end:], False
        self.pending.append(piece)
        self.size += len(piece)
        if self.size < OUTPUT:
            return None
        rows = b"".join(self.pending)
        end = rows.rfind(b"\n") + 1
        if not end:  # each piece is searched once, whatever the row's length
            copy.write(rows)
            self.pending, self.size, self.within_row = [], 0, True
            return None
        self.pending, self.size = [rows[end:]], len(rows) - end
        return memoryview(rows)[:end]  # not copied again

    def end(self, copy, streamed, dump_id):
        """The last rows, once the block has ended. `streamed`: the block holds a compressed stream
        (pg_dump 16 and later start none for a table without rows)."""
        self.pending.append(self.inflater.flush())
        if streamed and (not self.inflater.eof or self.inflater.unused_data):
            raise Ended(f"the compressed rows of dump entry {dump_id} do not end where their block does")
        copy.write(b"".join(self.pending))


class Loader:
    """Loads the archive's table data from the growing scratch file: one thread finds each data
    block, `jobs` threads each with a connection load them in the order found, and build a big
    table's own indexes once its rows are in. `done`: the dump ids loaded or built here."""

    def __init__(self, path, decrypted, connect, post_data_tool, head, jobs, target):
        self.stop = threading.Event()
        self.file = GrowingFile(path, decrypted, self.stop)
        self.connect, self.post_data_tool, self.head, self.jobs = connect, post_data_tool, head, jobs
        self.target = target
        self.lock = threading.Condition()
        self.waiting, self.loading, self.tasks, self.building = collections.deque(), set(), [], []
        self.wanted, self.running, self.waiters = set(), {}, collections.defaultdict(list)
        self.awaited = set()  # keys that wanted foreign keys reference
        self.starts, self.ends, self.scanned, self.shares, self.handed = {}, {}, False, {}, {}
        # Tables whose keys foreign keys reference: {its data id: the referencing tables' data ids}.
        self.keys, self.ahead = collections.defaultdict(set), []  # and those loaded ahead
        self.done, self.error = set(), None
        self.archive, self.attached = None, {}

    def run(self):
        """Read the table of contents, then load. Raises Unsupported before anything is loaded."""
        self.archive = Archive(Cursor(self.file, 0))
        encoding = self.archive.encoding()
        if encoding not in CODECS:  # psycopg cannot hold a session in it (EUC_TW): pg_restore's own
            raise Unsupported(f"the dump's encoding {encoding}, which Python has no codec for")
        self.rows = self.archive.streamable()
        if self.file.decrypted.is_set() and len(self.rows) > MANY_TABLES:
            raise Unsupported("nothing left to overlap with the decryption, and many tables")
        self.early = self.archive.early_post_data(self.rows)
        self.attached = self.archive.attached(self.early)
        for entry in self.early.values():
            for key in entry.after:
                for table in self.early[key].data:
                    self.keys[table] |= entry.data - self.early[key].data
        for dump_id, entry in self.early.items():
            for before in (*entry.data, *entry.after):
                self.waiters[before].append(dump_id)
        threads = [threading.Thread(target=self._guarded, args=(self._scan,), daemon=True)]
        threads += [threading.Thread(target=self._guarded, args=(self._work,), daemon=True) for _ in range(self.jobs)]
        held = self.held = self._hold_autovacuum()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.error is None and not self.stop.is_set():
            self._release_autovacuum(held)

    def _hold_autovacuum(self):
        """Autovacuum kept off the tables loaded here until their rows and builds are in: a table
        loaded by several COPYs (helping, a small table loaded in between) has rows committed
        before it is whole, and autovacuum then vacuums and analyses it beside the loading (on
        the bench's dump, a worker for seconds of the restore's two cores); pg_restore's one COPY
        a table commits once, at the end. Only where the table sets no autovacuum_enabled of its
        own and the restore's role may: the oids of those held, for _release_autovacuum."""
        held = []
        with self._session() as conn:
            tables = [e for e in self.archive.entries if e.id in self.rows]
            names = ([e.namespace for e in tables], [e.tag for e in tables])
            try:
                holdable = conn.execute(HOLDABLE, names).fetchall()
            except psycopg.Error:  # a speed-up only: the rows load all the same
                return held
            for oid, options in holdable:
                if any(option.startswith("autovacuum_enabled=") for option in options or ()):
                    continue
                try:
                    conn.execute(AUTOVACUUM.format(oid=int(oid), change="SET (autovacuum_enabled = false)"))
                except psycopg.Error:  # not the role's to alter (42501), or refused: left as it is
                    continue
                held.append(oid)
        return held

    def _release_autovacuum(self, held):
        """The tables' options as the dump made them (RESET leaves no trace in reloptions)."""
        with self._session() as conn:
            for oid in held:
                try:
                    conn.execute(AUTOVACUUM.format(oid=int(oid), change="RESET (autovacuum_enabled)"))
                except psycopg.Error as e:  # the copy would differ from the dump: the restore fails
                    raise RestoreFailed(
                        "giving a restored table its autovacuum setting back (ALTER TABLE ... RESET"
                        f" (autovacuum_enabled)) failed: {explain(e, self.target)}"
                    ) from None

    def _guarded(self, work):
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the first error stops every thread, and is said
            self._failed(e)

    def _failed(self, error):
        """Record the first error and stop every thread: the others only see the stop."""
        with self.lock:
            self.error = self.error or error
            self.stop_now()

    def _scan(self):
        """Walk the data blocks' framing (chunk lengths) as the file grows, noting where each starts."""
        cursor = Cursor(self.file, self.archive.data_start, self.archive.int_size)
        try:
            while True:
                try:
                    kind = cursor.byte()
                except Ended:
                    if self.stop.is_set():
                        raise
                    return  # the end of the archive: pg_dump writes no end marker
                dump_id = cursor.int()
                with self.lock:
                    if kind == BLOCK_DATA and dump_id in self.rows:
                        self.starts[dump_id] = cursor.offset
                        self.waiting.append(dump_id)
                        self.lock.notify_all()
                if kind == BLOCK_BLOBS:
                    while cursor.int() != 0:  # each large object: its oid, then its chunks
                        skip_chunks(cursor)
                elif kind == BLOCK_DATA:
                    skip_chunks(cursor)
                    with self.lock:
                        self.ends[dump_id] = cursor.offset
                else:
                    raise Unsupported(f"a data block of type {kind}")
        finally:
            with self.lock:
                self.scanned = True
                self.lock.notify_all()

    def _next(self):
        """('rows', id), ('post', id), ('help', id), or None when there is nothing left to do."""
        with self.lock:
            while True:
                if self.stop.is_set():
                    return None
                if self.waiting:
                    dump_id = self.waiting.popleft()
                    self.loading.add(dump_id)
                    return "rows", dump_id
                if (dump_id := self._ready_build()) is not None:
                    self.tasks.remove(dump_id)
                    self.running[dump_id] = self.early[dump_id]
                    return "post", dump_id
                for dump_id, share in self.shares.items():
                    if not share.read:
                        share.helpers += 1
                        share.copying += 1
                        return "help", (dump_id, share)
                if self.scanned and not self.loading and not self.running:
                    return None  # a build running may still make another ready
                self.lock.wait(0.5)

    def _ready_build(self):
        """A wanted build whose tables no running build holds, else None: a foreign key's check
        first, then a key one waits for, since the check runs on one core beside what is left to
        load or build (an index build has parallel workers). Called with the lock held."""
        for dump_id in sorted(self.tasks, key=self._precedence):
            entry = self.early[dump_id]
            if not any(entry.conflicts(self.early[other]) for other in self.running):
                return dump_id
        return None

    def _precedence(self, dump_id):
        entry = self.early[dump_id]
        return 0 if entry.foreign else 1 if dump_id in self.awaited else 2

    def _work(self):
        conn = None
        try:
            while (task := self._next()) is not None:
                kind, dump_id = task
                if kind == "post":
                    if conn is not None:  # no more sessions than jobs: the build opens its own
                        conn.close()
                        conn = None
                    self._build(dump_id)
                    continue
                if conn is None:
                    conn = self._session()
                if kind == "help":
                    self._help(conn, *dump_id)  # (table, its Share)
                    continue
                self._load_table(conn, dump_id)
        finally:
            if conn is not None:
                conn.close()

    def _session(self):
        conn = self.connect()
        for statement in (*FIXED_STATE, *self.archive.session()):
            conn.execute(statement)
        return conn

    def _load_table(self, conn, dump_id):
        try:
            size = self._load(conn, dump_id)
        except psycopg.Error as e:
            raise TableFailed(self.archive.name(dump_id), e) from None
        with self.lock:
            self.loading.discard(dump_id)
            if size >= EARLY_BYTES:
                self._want(dump_id)
            self._done(dump_id)

    def _key_waiting(self):
        """A small table waiting whose key a foreign key references, taken for loading, else None.
        Its rows come late when bigger tables hold every job (pg_dump writes tables by name), and
        the foreign keys that reference it wait for them; loaded ahead, their one-core checks can
        run beside the big tables' loading instead of after it."""
        with self.lock:
            for dump_id in self.waiting:
                if dump_id in self.keys and not self._big(dump_id) and any(map(self._big, self.keys[dump_id])):
                    self.waiting.remove(dump_id)
                    self.loading.add(dump_id)
                    self.ahead.append(dump_id)
                    return dump_id
        return None

    def _big(self, dump_id):
        """Whether a table's block is whole in the file and big enough for its own early builds
        (those of a foreign key from it among them: a small table's wait for the final pg_restore)."""
        end = self.ends.get(dump_id)
        return end is not None and end - self.starts[dump_id] >= EARLY_BYTES

    def _load(self, conn, dump_id):
        """COPY one table's rows, handing whole rows to the jobs that help (Share) while they do;
        the compressed bytes read, for the early post-data's threshold. Returns once every COPY of
        the table's rows has ended. A small table whose key foreign keys wait for is loaded in
        between (_key_waiting): this COPY ends at a row's end, and another takes the rest."""
        cursor = Cursor(self.file, self.starts[dump_id], self.archive.int_size)
        rows = Rows(inflating.decompressobj())
        start = cursor.offset
        with self.lock:
            share = self.shares[dump_id] = Share()
            self.lock.notify_all()  # an idle job may help from the first piece
        try:
            while True:
                with conn.cursor().copy(self.rows[dump_id]) as copy:
                    key = self._copy(copy, cursor, rows, share)
                    if key is None:
                        rows.end(copy, cursor.offset - start > 1 + self.archive.int_size, dump_id)
                        break
                self._load_table(conn, key)
        finally:
            with self.lock:
                share.read = True  # no job joins a table whose producer stopped
                self.lock.notify_all()
        with self.lock:
            while share.copying and not self.stop.is_set():
                self.lock.wait(0.5)
            del self.shares[dump_id]
            if share.handed:
                self.handed[dump_id] = share.handed
        if self.stop.is_set():
            raise Ended("stopped")
        return cursor.offset - start

    def _copy(self, copy, cursor, rows, share):
        """Send the rows read from `cursor` to `copy` or to helpers, up to the block's end (None)
        or, at a row's end, to a small table to load first (its data id, taken)."""
        while (n := cursor.chunk_length()) != 0:
            if self.stop.is_set():
                raise Ended("stopped")
            whole = rows.add(copy, cursor.take(n))
            if whole is not None:
                self._hand(share, copy, whole)
                if (key := self._key_waiting()) is not None:
                    return key
        return None

    def _hand(self, share, copy, rows):
        """`rows` (whole ones) to a helping job when one has room for them, else to our own COPY."""
        with self.lock:
            if share.helpers and len(share.pieces) < SHARED_PIECES:
                share.pieces.append(rows)
                share.handed += 1
                self.lock.notify_all()
                return
        copy.write(rows)

    def _help(self, conn, dump_id, share):
        """Load pieces of a table another job reads, by a COPY of our own, until its rows are all
        handed out or other work is waiting (a table's rows, a build): the COPY then ends with the
        rows it has, and this job goes to that work."""
        leaving = False
        try:
            with conn.cursor().copy(self.rows[dump_id]) as copy:
                while not leaving:
                    with self.lock:
                        while not (share.pieces or share.read or self.stop.is_set() or self._elsewhere()):
                            self.lock.wait(0.5)
                        if self.stop.is_set():
                            raise Ended("stopped")
                        leaving = not share.pieces or self._elsewhere()
                        if leaving:  # nothing more is handed to us; what was is loaded here first
                            share.helpers -= 1
                            rest, share.pieces = list(share.pieces), collections.deque()
                        else:
                            rest = [share.pieces.popleft()]
                    for rows in rest:
                        copy.write(rows)
        except BaseException as e:
            failure = TableFailed(self.archive.name(dump_id), e) if isinstance(e, psycopg.Error) else e
            self._failed(failure)  # before `copying` drops: the producer must not count the table done
            if failure is e:
                raise
            raise failure from None
        finally:
            with self.lock:
                if not leaving:
                    share.helpers -= 1
                share.copying -= 1
                self.lock.notify_all()

    def _elsewhere(self):
        """Other work for a helping job: a table's rows waiting, or a build that may start."""
        return bool(self.waiting) or self._ready_build() is not None

    def _build(self, dump_id):
        attached = self.attached.get(dump_id, [])  # its comments: built with it (Archive.attached)
        tool = self.post_data_tool([dump_id, *attached])
        tool.stdin = subprocess.PIPE
        with self.lock:  # started and noted at once: stop_now never misses one starting
            if self.stop.is_set():
                return
            tool.start()
            self.building.append(tool)  # stop_now ends it: a failed restore does not wait for an index build
        try:
            code = _feed(tool, self.head)
        finally:
            with self.lock:
                self.building.remove(tool)
        if self.stop.is_set():
            raise Ended("stopped")
        if code != 0:
            raise RestoreFailed(tool.error_line(self.target))
        with self.lock:
            del self.running[dump_id]
            self.done.update(attached)
            self._done(dump_id)

    def _want(self, data_id):
        """A big table's rows are in: its indexes and constraints, and the foreign keys from or to
        it with the keys they reference, are built beside the loading (others wait for the final
        pg_restore, where one process builds many). Called with the lock held."""
        wanting = list(self.waiters[data_id])  # a table's data id is only ever in entries' `data`
        while wanting:
            dump_id = wanting.pop()
            if dump_id not in self.wanted:
                self.wanted.add(dump_id)
                wanting += self.early[dump_id].after
                self.awaited |= self.early[dump_id].after
                self._offer(dump_id)

    def _done(self, dump_id):
        """Loaded or built: what waited for it and is wanted now may start. Called with the lock held."""
        self.done.add(dump_id)
        for waiting in self.waiters[dump_id]:
            if waiting in self.wanted:
                self._offer(waiting)
        self.lock.notify_all()

    def _offer(self, dump_id):
        entry = self.early[dump_id]
        ready = entry.data <= self.done and entry.after <= self.done
        if ready and dump_id not in self.done and dump_id not in self.running and dump_id not in self.tasks:
            self.tasks.append(dump_id)

    def stop_now(self):
        self.stop.set()
        with self.lock:
            for tool in self.building:
                if tool.proc is not None and tool.proc.poll() is None:
                    tool.proc.kill()  # its session ends with it; DROP DATABASE ... WITH (FORCE) ends the rest
            self.lock.notify_all()


def fed_toc(tool, head):
    """Run `tool` (a pg_restore) fed the table of contents alone: enough for any entry without
    data. Its exit code."""
    tool.stdin = subprocess.PIPE
    tool.start()
    return _feed(tool, head)


def _feed(tool, head):
    try:
        tool.proc.stdin.write(head)
        tool.proc.stdin.close()
    except BrokenPipeError:  # it read what it needed (or failed: its exit code says)
        pass
    return tool.proc.wait()


def failure(error, target):
    """One line for what stopped the loading."""
    if isinstance(error, RestoreFailed):
        return str(error)
    if isinstance(error, TableFailed):
        return f"loading the rows of {error.table} failed: {explain(error.error, target)}"
    if isinstance(error, psycopg.Error):
        return f"loading the table data failed: {explain(error, target)}"
    return f"loading the table data failed: {error}"
