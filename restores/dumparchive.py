"""pg_dump's custom-format archive, read as gpg still writes it: its header, its table of
contents (the entries, their sections and dependencies) and the framing of its data blocks.
restores.dumpstream loads the rows it finds; the layout is pg_dump's (pg_backup_archiver.c:
ReadHead, ReadToc; pg_backup_custom.c)."""

import os
import re
import time

# From 1.13 (pg_dump 11, 10.3 and 9.6.8) every name is schema-qualified and the search_path an
# entry of its own; before, pg_restore set the search_path before each entry: left to it.
KNOWN_VERSIONS = ((1, 13), (1, 14), (1, 15), (1, 16))
CUSTOM_FORMAT = 1
BLOCK_DATA, BLOCK_BLOBS = 1, 3
PRE_DATA, POST_DATA = 2, 4  # teSection
# pg_dump's compressed chunks are its compressor's output buffer (4 KiB to 64 KiB): a longer one
# is a corrupt copy, said at once rather than read into memory before the sha256 says it.
LONGEST_CHUNK = 16 << 20
READ_AHEAD = 1 << 20
# What is built beside the loading, and what of it holds its tables exclusively meanwhile
# (pg_backup_archiver.c: identify_locking_dependencies, has_lock_conflicts).
EARLY_KINDS = (b"INDEX", b"CONSTRAINT", b"FK CONSTRAINT")
EXCLUSIVE = (b"CONSTRAINT", b"FK CONSTRAINT")
SESSION_ENTRIES = (b"ENCODING", b"STDSTRINGS", b"SEARCHPATH")
# What is said of an entry in entries of its own, which depend on it alone: built with it.
ATTACHED = (b"COMMENT", b"SECURITY LABEL")


class Unsupported(Exception):
    """An archive this module does not read: pg_restore restores it alone."""


class Ended(Exception):
    """The file ended (its decryption over) before what the archive said was there."""


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
    whether it takes its tables exclusively (pg_restore -j's rule: constraints do, an index does not),
    and whether it is a foreign key (its check runs on one core, where an index build has parallel workers)."""

    __slots__ = ("data", "after", "exclusive", "foreign")

    def __init__(self, data, after, exclusive, foreign=False):
        self.data, self.after, self.exclusive, self.foreign = data, after, exclusive, foreign

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
                    early[e.id] = Early(
                        frozenset(data), frozenset(after), e.desc in EXCLUSIVE, e.desc == b"FK CONSTRAINT"
                    )
        return early

    def attached(self, early):
        """{id in `early`: the ids of its comments and security labels}. They go with the build: the
        final pg_restore's use-list leaves the entry out, and pg_restore -L moves what a list leaves
        out to the front of its table of contents; a comment after it then follows a pre-data entry,
        takes that section (pg_backup_archiver.c: ProcessArchiveRestoreOptions), and
        --section=data --section=post-data skipped it (pg_restore 15: the copy lost them)."""
        found = {}
        for e in self.entries:
            if e.desc in ATTACHED and len(e.deps) == 1 and e.deps[0] in early:
                found.setdefault(e.deps[0], []).append(e.id)
        return found

    def name(self, dump_id):
        """The table of a data entry, as a DBA reads it."""
        entry = next(e for e in self.entries if e.id == dump_id)
        return ".".join(quoted(part.decode(errors="replace")) for part in (entry.namespace, entry.tag) if part)

    def encoding(self):
        """The dump's encoding, as its ENCODING entry names it (UTF8 when it has none)."""
        for entry in self.entries:
            if entry.desc == b"ENCODING" and (m := DECLARED_ENCODING.search(entry.defn or b"")):
                return m.group(1).decode()
        return "UTF8"

    def session(self):
        """The statements of the dump's ENCODING, STDSTRINGS and SEARCHPATH entries, as pg_restore runs them."""
        return [e.defn for e in self.entries if e.desc in SESSION_ENTRIES and e.defn]


def skip_chunks(cursor):
    while (n := cursor.chunk_length()) != 0:
        cursor.skip(n)


LISTED_ID = re.compile(r"^(\d+);")
DECLARED_ENCODING = re.compile(rb"SET client_encoding = '([A-Z0-9_]+)'")


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
