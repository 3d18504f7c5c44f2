"""A parallel logical restore's table data, loaded while gpg still decrypts the dump.

pg_restore -j reads a finished file: the data waited for the whole decryption, then pg_restore
inflated every table's rows itself (zlib, about 6 core-seconds a gigabyte of rows: a quarter of
the restore's CPU on two cores, bench/RESULTS.md). Here the custom-format archive is read as gpg
writes it into the scratch file: each table's COPY block is inflated (by ISA-L when installed,
2.3 times zlib's speed) and sent by COPY on RESTORE_JOBS connections of the portal's own, and a
big table's indexes, primary or unique constraints and foreign keys (with the keys they reference)
are built by pg_restore (fed the table of contents alone) as soon as what they need is in, beside
the other tables' loading, never two on one table that pg_restore -j would keep apart. Everything
else (sequences' values, large objects, data as INSERTs, the remaining post-data) is left to the
pg_restore -j run on the verified file, by a use-list without `done`.

Nothing here is trusted before the copy is: a copy that fails its sha256 or gpg's check fails the
restore, and the new database is dropped, as with RESTORE_JOBS=1 (gpg piped into pg_restore).
The archive's layout is pg_dump's (pg_backup_archiver.c: ReadHead, ReadToc; pg_backup_custom.c):
an archive this does not know (a version, a compression) is restored by pg_restore alone.
"""

import collections
import os
import re
import subprocess
import threading
import time
import zlib

import psycopg

try:  # ISA-L's inflate (python-isal): 2.6 core-seconds against 6.1 for zlib on the bench's dump
    from isal import isal_zlib as inflating
except ImportError:  # pragma: no cover - the stdlib's, slower, same streams
    inflating = zlib

from backupportal.lib.pgerrors import explain
from restores.targetdb import RestoreFailed

# From 1.13 (pg_dump 11, 10.3 and 9.6.8) every name is schema-qualified and the search_path an
# entry of its own; before, pg_restore set the search_path before each entry: left to it.
KNOWN_VERSIONS = ((1, 13), (1, 14), (1, 15), (1, 16))
CUSTOM_FORMAT = 1
BLOCK_DATA, BLOCK_BLOBS = 1, 3
PRE_DATA, POST_DATA = 2, 4  # teSection
# A table's own post-data built early, beside the loading: one pg_restore each, so only for
# tables big enough that their index builds weigh (compressed bytes of their block).
EARLY_BYTES = 8 << 20
OUTPUT = 256 << 10  # rows sent by COPY in pieces of about this size
# pg_dump's compressed chunks are its compressor's output buffer (4 KiB to 64 KiB): a longer one
# is a corrupt copy, said at once rather than read into memory before the sha256 says it.
LONGEST_CHUNK = 16 << 20
# When the schema took longer than the whole decryption (thousands of tables), nothing is left to
# overlap, and pg_restore -j loads many small tables with less per table than a COPY from here
# (3000 tables of 5 rows: 8.1 and 10.7 s streamed against 7.6 and 7.9 s, 2026-12-06).
MANY_TABLES = 200
READ_AHEAD = 1 << 20
# What is built beside the loading, and what of it holds its tables exclusively meanwhile
# (pg_backup_archiver.c: identify_locking_dependencies, has_lock_conflicts).
EARLY_KINDS = (b"INDEX", b"CONSTRAINT", b"FK CONSTRAINT")
EXCLUSIVE = (b"CONSTRAINT", b"FK CONSTRAINT")
# The session pg_restore's own connections set (pg_backup_archiver.c: _doSetFixedOutputState);
# the dump's encoding, standard_conforming_strings and search_path come from its own entries.
FIXED_STATE = (
    "SET statement_timeout = 0",
    "SET lock_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
    "SET check_function_bodies = false",
    "SET xmloption = content",
    "SET client_min_messages = warning",
    "SET row_security = off",
)
SESSION_ENTRIES = (b"ENCODING", b"STDSTRINGS", b"SEARCHPATH")


class Unsupported(Exception):
    """An archive this module does not read: pg_restore restores it alone."""


class Ended(Exception):
    """The file ended (its decryption over) before what the archive said was there."""


class TableFailed(Exception):
    """The server refused a table's rows."""

    def __init__(self, table, error):
        super().__init__(table)
        self.table, self.error = table, error


class GrowingFile:
    """The scratch file gpg is still writing: a read waits for its bytes until the decryption ends."""

    def __init__(self, path, decrypted, stop):
        self.fd = os.open(path, os.O_RDONLY)
        self.decrypted, self.stop = decrypted, stop

    def pread(self, n, offset):
        parts, have = [], 0
        while have < n:
            if self.stop.is_set():
                raise Ended("stopped")
            finished = self.decrypted.is_set()  # before the read: what it wrote by then is all there is
            got = os.pread(self.fd, n - have, offset + have)
            if got:
                parts.append(got)
                have += len(got)
            elif finished:
                raise Ended(f"the decrypted dump ends at byte {offset + have}")
            else:
                time.sleep(0.002)
        return b"".join(parts)

    def close(self):
        os.close(self.fd)


class Cursor:
    """Sequential reads of the archive from `offset`, in pieces of a mebibyte: its integers,
    strings and chunks (pg_backup_archiver.c: ReadInt, ReadStr)."""

    def __init__(self, source, offset, int_size=4):
        self.source, self.base, self.buf, self.at = source, offset, b"", 0
        self.int_size = int_size
        self.ahead = 64 << 10  # doubled on each refill up to READ_AHEAD: a small table reads little

    @property
    def offset(self):
        return self.base + self.at

    def take(self, n):
        if self.at + n > len(self.buf):
            rest = self.buf[self.at :]
            self.base += self.at
            start = self.base + len(rest)
            # What the piece needs, waited for, then whatever more is there already.
            more = self.source.pread(n - len(rest), start)
            ahead = os.pread(self.source.fd, self.ahead, start + len(more))
            self.ahead = min(self.ahead * 2, READ_AHEAD)
            self.buf, self.at = rest + more + ahead, 0
        piece = self.buf[self.at : self.at + n]
        self.at += n
        return piece

    def skip(self, n):
        """Past `n` bytes, once they are there, without holding them."""
        if self.at + n <= len(self.buf):
            self.at += n
            return
        target = self.offset + n
        if target > 0:
            self.source.pread(1, target - 1)  # waits for the file to reach it
        self.base, self.buf, self.at = target, b"", 0

    def chunk_length(self):
        n = self.int()
        if n < 0 or n > LONGEST_CHUNK:
            raise Ended(f"a data chunk of {n} bytes: the copy is corrupt")
        return n

    def byte(self):
        return self.take(1)[0]

    def int(self):
        raw = self.take(1 + self.int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def string(self):
        n = self.int()
        if n < 0:
            return None
        if n > 1 << 30:
            raise Unsupported(f"a string of {n} bytes")
        return self.take(n)  # bytes: a name is in the dump's encoding, which may be none (SQL_ASCII)


class Entry:
    __slots__ = ("id", "desc", "tag", "namespace", "section", "defn", "copy_stmt", "deps", "had_dumper")

    def __init__(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)


class Early:
    """A post-data entry built beside the loading: the data of the tables it is on, which it waits
    for (`data`), the entries built before it (`after`: a foreign key's referenced key), and
    whether it takes its tables exclusively (pg_restore -j's rule: constraints do, an index does not)."""

    __slots__ = ("data", "after", "exclusive")

    def __init__(self, data, after, exclusive):
        self.data, self.after, self.exclusive = data, after, exclusive

    def conflicts(self, other):
        return (self.exclusive or other.exclusive) and not self.data.isdisjoint(other.data)


class Archive:
    """The header and table of contents of a custom-format archive, read from `cursor`."""

    def __init__(self, cursor):
        if cursor.take(5) != b"PGDMP":
            raise Unsupported("not a custom-format dump")
        major, minor, _rev = cursor.take(3)
        self.version = (major, minor)
        if self.version not in KNOWN_VERSIONS:
            raise Unsupported(f"archive version {major}.{minor}")
        cursor.int_size = self.int_size = cursor.byte()
        self.offset_size = cursor.byte()
        if cursor.byte() != CUSTOM_FORMAT:
            raise Unsupported("not the custom format")
        if self.version >= (1, 15):
            algorithm = cursor.byte()  # 0 none, 1 gzip, 2 lz4, 3 zstd
        else:
            algorithm = 1 if cursor.int() != 0 else 0
        if algorithm != 1:
            # Uncompressed rows come a row a chunk (pg_dump -Z0): read here chunk by chunk they
            # would cost Python more than pg_restore's inflate they do not need. lz4, zstd: gzip only.
            raise Unsupported(f"compression algorithm {algorithm}")
        for _ in range(7):  # the creation time
            cursor.int()
        for _ in range(3):  # the database's name, the server's and pg_dump's versions
            cursor.string()
        self.entries = [self._entry(cursor) for _ in range(cursor.int())]
        self.data_start = cursor.offset

    def _entry(self, cursor):
        dump_id, had_dumper = cursor.int(), cursor.int()
        cursor.string(), cursor.string()  # the catalog's table oid and oid
        tag, desc = cursor.string(), cursor.string()
        section = cursor.int()
        defn, _drop, copy_stmt = cursor.string(), cursor.string(), cursor.string()
        namespace, _tablespace = cursor.string(), cursor.string()
        if self.version >= (1, 14):
            cursor.string()  # table access method
        if self.version >= (1, 16):
            cursor.int()  # relkind
        cursor.string(), cursor.string()  # owner, "false" (WITH OIDS)
        deps = []
        while (dep := cursor.string()) is not None:
            deps.append(int(dep))
        cursor.take(1 + self.offset_size)  # where its data is: not set when pg_dump wrote a pipe
        return Entry(
            id=dump_id,
            desc=desc,
            tag=tag,
            namespace=namespace,
            section=section,
            defn=defn,
            copy_stmt=copy_stmt,
            deps=deps,
            had_dumper=had_dumper,
        )

    def streamable(self):
        """{dump id: COPY statement} of the table data this module loads: rows as COPY, not INSERTs."""
        return {
            e.id: e.copy_stmt.strip().rstrip(b";")
            for e in self.entries
            if e.desc == b"TABLE DATA" and e.had_dumper and (e.copy_stmt or b"").startswith(b"COPY ")
        }

    def early_post_data(self, streamed):
        """{post-data id: Early} for the indexes, constraints and foreign keys that can be built
        beside the loading: every dependency of theirs is in the schema restored before it, a
        table whose rows `streamed` loads here, or another such entry."""
        data_of = {e.deps[0]: e.id for e in self.entries if e.id in streamed and len(e.deps) == 1}
        by_id = {e.id: e for e in self.entries}
        early = {}
        for e in self.entries:  # in the dump's order: a foreign key after the key it references
            if e.section != POST_DATA or e.desc not in EARLY_KINDS:
                continue
            data, after = set(), set()
            for dep in set(e.deps):  # an expression index names its table once for each use
                if dep in data_of:
                    data.add(data_of[dep])
                elif dep in early:
                    after.add(dep)
                elif dep not in by_id or by_id[dep].section > PRE_DATA or by_id[dep].desc == b"TABLE":
                    break  # a table whose rows pg_restore loads (or none: partitioned), a later entry
            else:
                if data:
                    early[e.id] = Early(frozenset(data), frozenset(after), e.desc in EXCLUSIVE)
        return early

    def name(self, dump_id):
        """The table of a data entry, as a DBA reads it."""
        entry = next(e for e in self.entries if e.id == dump_id)
        return ".".join(quoted(part.decode(errors="replace")) for part in (entry.namespace, entry.tag) if part)

    def session(self):
        """The statements of the dump's ENCODING, STDSTRINGS and SEARCHPATH entries, as pg_restore runs them."""
        return [e.defn for e in self.entries if e.desc in SESSION_ENTRIES and e.defn]


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
        self.starts, self.scanned = {}, False
        self.done, self.error = set(), None
        self.archive = None

    def run(self):
        """Read the table of contents, then load. Raises Unsupported before anything is loaded."""
        self.archive = Archive(Cursor(self.file, 0))
        self.rows = self.archive.streamable()
        if self.file.decrypted.is_set() and len(self.rows) > MANY_TABLES:
            raise Unsupported("nothing left to overlap with the decryption, and many tables")
        self.early = self.archive.early_post_data(self.rows)
        for dump_id, entry in self.early.items():
            for before in (*entry.data, *entry.after):
                self.waiters[before].append(dump_id)
        threads = [threading.Thread(target=self._guarded, args=(self._scan,), daemon=True)]
        threads += [threading.Thread(target=self._guarded, args=(self._work,), daemon=True) for _ in range(self.jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _guarded(self, work):
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the first error stops every thread, and is said
            with self.lock:
                self.error = self.error or e  # the first: the others only saw the stop
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
                        _skip_chunks(cursor)
                elif kind == BLOCK_DATA:
                    _skip_chunks(cursor)
                else:
                    raise Unsupported(f"a data block of type {kind}")
        finally:
            with self.lock:
                self.scanned = True
                self.lock.notify_all()

    def _next(self):
        """('rows', id), ('post', id), or None when there is nothing left to do."""
        with self.lock:
            while True:
                if self.stop.is_set():
                    return None
                if self.waiting:
                    dump_id = self.waiting.popleft()
                    self.loading.add(dump_id)
                    return "rows", dump_id
                for i, dump_id in enumerate(self.tasks):
                    entry = self.early[dump_id]
                    if not any(entry.conflicts(self.early[other]) for other in self.running):
                        del self.tasks[i]
                        self.running[dump_id] = entry
                        return "post", dump_id
                if self.scanned and not self.loading and not self.running:
                    return None  # a build running may still make another ready
                self.lock.wait(0.5)

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
                try:
                    size = self._load(conn, dump_id)
                except psycopg.Error as e:
                    raise TableFailed(self.archive.name(dump_id), e) from None
                with self.lock:
                    self.loading.discard(dump_id)
                    if size >= EARLY_BYTES:
                        self._want(dump_id)
                    self._done(dump_id)
        finally:
            if conn is not None:
                conn.close()

    def _session(self):
        conn = self.connect()
        for statement in (*FIXED_STATE, *self.archive.session()):
            conn.execute(statement)
        return conn

    def _load(self, conn, dump_id):
        """COPY one table's rows; the compressed bytes read, for the early post-data's threshold."""
        cursor = Cursor(self.file, self.starts[dump_id], self.archive.int_size)
        inflater = inflating.decompressobj()
        start, pending, size = cursor.offset, [], 0
        with conn.cursor().copy(self.rows[dump_id]) as copy:
            while (n := cursor.chunk_length()) != 0:
                if self.stop.is_set():
                    raise Ended("stopped")
                piece = cursor.take(n)
                piece = inflater.decompress(piece)
                pending.append(piece)
                size += len(piece)
                if size >= OUTPUT:
                    copy.write(b"".join(pending))
                    pending, size = [], 0
            pending.append(inflater.flush())
            # A table without rows may have no stream at all (pg_dump 16 and later start it at the first row).
            if cursor.offset - start > 1 + self.archive.int_size and (not inflater.eof or inflater.unused_data):
                raise Ended(f"the compressed rows of dump entry {dump_id} do not end where their block does")
            copy.write(b"".join(pending))
        return cursor.offset - start

    def _build(self, dump_id):
        tool = self.post_data_tool(dump_id)
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


def _skip_chunks(cursor):
    while (n := cursor.chunk_length()) != 0:
        cursor.skip(n)


LISTED_ID = re.compile(r"^(\d+);")


def without(listing, ids):
    """`listing` (pg_restore -l) with the entries of `ids` commented out."""
    lines = []
    for line in listing.splitlines():
        m = LISTED_ID.match(line)
        lines.append(f";{line}" if m and int(m.group(1)) in ids else line)
    return "".join(f"{line}\n" for line in lines)


PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


def quoted(name):
    """A name as SQL reads it: in double quotes unless plain (a dot, a capital, a space are in it)."""
    return name if PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def failure(error, target):
    """One line for what stopped the loading."""
    if isinstance(error, RestoreFailed):
        return str(error)
    if isinstance(error, TableFailed):
        return f"loading the rows of {error.table} failed: {explain(error.error, target)}"
    if isinstance(error, psycopg.Error):
        return f"loading the table data failed: {explain(error, target)}"
    return f"loading the table data failed: {error}"
