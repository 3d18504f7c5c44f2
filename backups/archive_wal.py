"""backupportal's archive_command: put one WAL file into the spool, durably and idempotently.

PostgreSQL runs it as its own OS user, once per segment, with none of the portal's
environment (the command `archivecommand NAME` prints wraps it in `env -i`):

    /usr/bin/env -i /usr/bin/python3 -I -S archive_wal.py SPOOL_DIR %p %f

Standard library only, no Django and no database, so that it starts in milliseconds and
works wherever `manage.py archivecommand` installed it (a virtualenv under /root is
unreadable to postgres). Exit 0 means the file is safely in the spool (or was already,
with the same content); any other exit makes PostgreSQL keep the segment and retry.

A file of that name that is already in the spool, or that the portal already ingested
(SPOOL/ingested/NAME holds its sha256), is accepted when identical and refused when
different: then SPOOL/errors/NAME.json says why, and the portal's monitor raises an alert.

A full segment (24 hex digits, no suffix) of the wrong size is refused the same way: a
truncated segment in the archive would stop every PITR that needs it, and PostgreSQL still
holds the whole one, which it archives on its next try once the cause is fixed.

Look-ahead: PostgreSQL waits for each call before it offers the next segment, so a backlog
(after an outage, a bulk load) would cost a process start and two fsyncs per segment. A call
that copies its own segment also copies the next full segments that PostgreSQL has already
marked ready (pg_wal/archive_status/NAME.ready: complete, never rewritten), fsyncs each and the
spool directory once, and then leaves an empty SPOOL/ahead/NAME for each. The calls for those
segments are answered by the shell alone (see backups.walspool.archive_command): the spool has
NAME and SPOOL/ahead/NAME is newer than %p, so %p has not been written since it was copied and
made durable. What the look-ahead cannot take (a conflict, a wrong size, an error) it leaves
alone: that segment's own call reports it.

Segments are written with O_DIRECT where the file system takes it (copy_direct: no page cache
to fill and flush), two at a time in a look-ahead; other files, and file systems that refuse it,
through the page cache.
"""

# Only cheap modules at the top: PostgreSQL starts this program once per segment, and re, json
# and hashlib would double its start-up (about 10 ms of imports against 7 ms for the
# interpreter). json and hashlib are imported where a rare path needs them; no regular expressions.
import os
import sys
import time

VERSION = 1
HEX = frozenset("0123456789ABCDEF")
CHUNK = 1 << 20
# Written by the portal (backups.walspool.publish_segment_size) once it knows the server's
# wal_segment_size: one line, the size in bytes.
SIZE_FILE = "segment_size"
# SPOOL/ahead/NAME: NAME was copied ahead and is durable in the spool (see the docstring).
AHEAD_DIR = "ahead"
# At most this many extra segments, and bytes, per call: enough to spread the fixed costs, small
# enough that the call for the oldest segment returns within a second or two on a slow disk.
LOOKAHEAD_SEGMENTS = 16
LOOKAHEAD_BYTES = 128 << 20
# O_DIRECT copies of segments: one buffer for each thread that copies, written in pieces of this
# size, each a whole number of the blocks every Linux file system takes (4 KiB; a segment is at
# least 1 MiB).
DIRECT_CHUNK = 1 << 20
DIRECT_ALIGN = 4096
# Look-ahead segments copied at once: one reads from the page cache while the other's write waits
# for the disk (on the bench's machine, 2026-12-05: 200 segments 58-71 a second with one, 70-77
# with two).
COPIERS = 2


class Conflict(Exception):
    """A different file of the same name was archived before: never overwrite it."""


class WrongSize(Exception):
    """A full segment whose size is not the server's segment size: truncated, or not a segment."""


def is_hex(text, length):
    return len(text) == length and HEX.issuperset(text)


def is_segment(name):
    """A full WAL segment's name: 24 upper-case hex digits (timeline, log, segment)."""
    return is_hex(name, 24)


def is_wal_name(name):
    """What PostgreSQL archives: a segment, a .partial segment, a backup label or a timeline history."""
    if is_segment(name):
        return True
    if name.endswith(".partial"):
        return is_segment(name[: -len(".partial")])
    if name.endswith(".history"):
        return is_hex(name[: -len(".history")], 8)
    if name.endswith(".backup"):
        stem = name[: -len(".backup")]
        return len(stem) == 33 and is_segment(stem[:24]) and stem[24] == "." and is_hex(stem[25:], 8)
    return False


def plausible_segment_size(size):
    """What initdb --wal-segsize allows: a power of two from 1 MiB to 1 GiB."""
    return 1 << 20 <= size <= 1 << 30 and size & (size - 1) == 0


def published_size(spool):
    """The segment size the portal learned, or None when it has not (yet) written it.

    Without a database the program cannot know the server's wal_segment_size: the portal
    leaves it in the spool. Until it does (a new server), only a size no segment can have is
    refused here, and the portal's ingest, which checks again, is the backstop. An unreadable
    or garbled file is ignored the same way rather than stopping all archiving.
    """
    try:
        with open(os.path.join(spool, SIZE_FILE)) as f:
            size = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return size if plausible_segment_size(size) else None


def check_size(spool, name, size):
    if not is_segment(name):
        return  # .partial, .backup and .history files have sizes of their own
    expected = published_size(spool)
    if expected is None and not plausible_segment_size(size):
        raise WrongSize(f"it is {size} bytes, which no WAL segment is (a power of two from 1 MiB to 1 GiB)")
    if expected is not None and size != expected:
        raise WrongSize(f"it is {size} bytes, not the server's segment size of {expected} bytes")


def same_bytes(path_a, path_b):
    if os.path.getsize(path_a) != os.path.getsize(path_b):
        return False
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        while True:
            chunk_a, chunk_b = a.read(CHUNK), b.read(CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def sha256_of(path):
    import hashlib  # only for a file the portal already ingested (see the imports above)

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def already_there(spool, source, name):
    """True when the spool (or the portal's archive) has this very file; Conflict when another."""
    dest = os.path.join(spool, name)
    if os.path.exists(dest):
        if same_bytes(source, dest):
            return True
        raise Conflict(f"{name} is already in the spool with different content")
    marker = os.path.join(spool, "ingested", name)
    if os.path.exists(marker):
        with open(marker) as f:
            archived = f.read().strip()
        if sha256_of(source) == archived:
            return True
        raise Conflict(f"{name} was already archived with different content (sha256 {archived[:12]}...)")
    return False


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_into_spool(spool, source, name):
    """Copy under a temporary name, fsync, then link to the final name (never overwriting).

    The caller fsyncs the spool directory before it says the file is archived."""
    copy_batch(spool, [(source, name)])


def copy_batch(spool, files):
    """copy_into_spool for several files: all written first and fsynced after, so that the
    first fsync's journal commit carries the others' data and a batch costs about one flush."""
    staged = []
    try:
        # Not zip(strict=True): the database host's /usr/bin/python3 may be older than 3.10.
        staged = [(written, *file) for written, file in zip(write_temporaries(spool, files), files)]  # noqa: B905
        for (_, fd), _, _ in staged:
            os.fsync(fd)
        for (tmp, _), source, name in staged:
            try:
                os.link(tmp, os.path.join(spool, name))
            except FileExistsError:
                if not same_bytes(source, os.path.join(spool, name)):
                    raise Conflict(f"{name} appeared in the spool with different content") from None
    finally:
        for (tmp, fd), _, _ in staged:
            os.close(fd)
            os.unlink(tmp)


def write_temporaries(spool, files):
    """write_temporary() of each of `files` [(source, name)], COPIERS at a time when there are
    several; on any error, those written are removed and the first error raised."""
    if len(files) < 2:
        # The call's own file: a buffer only for a segment (.history and .backup files never use one).
        return [
            write_temporary(spool, source, name, direct_buffer() if is_segment(name) else None)
            for source, name in files
        ]
    import threading  # only for a look-ahead (see the imports above)

    results, errors = [None] * len(files), []

    def copier(first):
        try:
            buffer = direct_buffer()
            for i in range(first, len(files), COPIERS):
                results[i] = write_temporary(spool, *files[i], buffer)
        except BaseException as e:  # noqa: BLE001 - raised below, in the calling thread
            errors.append(e)

    threads = []
    for k in range(COPIERS):
        thread = threading.Thread(target=copier, args=(k,))
        try:
            thread.start()
            threads.append(thread)
        except RuntimeError:
            copier(k)  # no thread to be had (a limit on processes): this one copies that share
    for thread in threads:
        thread.join()
    written = [r for r in results if r is not None]
    if errors or len(written) < len(files):
        for tmp, fd in written:
            os.close(fd)
            os.unlink(tmp)
        raise errors[0] if errors else OSError(5, "a copy ahead did not finish")
    return results


def direct_buffer():
    """A page-aligned buffer for copy_direct, as O_DIRECT needs (anonymous maps are)."""
    import mmap  # only where a segment is copied (see the imports above)

    return mmap.mmap(-1, DIRECT_CHUNK)


def write_temporary(spool, source, name, buffer):
    """Copy `source` to .NAME.PID.tmp in the spool; returns (path, open fd), not yet fsynced.
    `buffer`: direct_buffer(), one for each thread that copies; None for a file that is no segment."""
    tmp = os.path.join(spool, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        # PostgreSQL runs its archive_command under umask 077: without this the file is 0600
        # and a portal that is not root (a member of postgres's group) cannot read it.
        os.fchmod(fd, 0o640)
        with open(source, "rb") as src:
            copied = copy_direct(src, fd, buffer) if is_segment(name) else None
            if copied is None:
                copied = copy_bytes(src, fd)
        check_size(spool, name, copied)  # what was read, whatever stat said (a file shrinking meanwhile)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return tmp, fd


def copy_bytes(src, fd):
    """Copy the open file `src` to `fd`; returns the bytes copied.

    copy_file_range copies inside the kernel: a segment never passes through Python, which
    halves the CPU of a backlog. A file system or kernel that refuses it (EXDEV, ENOSYS,
    EINVAL...) before anything was copied gets the plain read and write loop."""
    copied = 0
    try:
        while n := os.copy_file_range(src.fileno(), fd, 1 << 24):
            copied += n
        return copied
    except OSError:
        if copied:
            raise
    while chunk := src.read(CHUNK):
        view = memoryview(chunk)
        copied += len(chunk)
        while view:
            view = view[os.write(fd, view) :]
    return copied


def copy_direct(src, fd, buffer):
    """Copy the open file `src` into the file open as `fd` with O_DIRECT; returns the bytes
    copied, or None when the file system refuses O_DIRECT before anything was written.

    Through the page cache a backlog costs the kernel a new page for every 4 KiB written, and
    reaches the disk only at the fsync, while nothing else is written. On the bench's machine
    (2026-12-05), a backlog of 200 segments of 16 MB went at 50-58 a second that way, and at 18
    when the kernel had to find fresh memory for the pages (a segment's copy took 48 ms, not 7);
    with O_DIRECT from one reused buffer, 58-71 a second whatever the memory's state. Its writes
    have reached the device when they return; the fsync after still flushes the device's cache
    and commits the file's size and blocks, as it does for the page cache's. From a
    read that is not a whole number of blocks on (a file shrinking meanwhile, refused by its size
    after; a pipe), the rest goes through the page cache."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        # The same open file, not the name again: nothing put at that name meanwhile is written.
        direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None  # tmpfs and some network file systems: the page cache, as before
    try:
        copied, writer = 0, direct
        while n := os.readv(src.fileno(), [buffer]):
            if n % DIRECT_ALIGN:
                writer = fd  # this piece and every later one: no O_DIRECT write at an unaligned offset
            try:
                write_at(writer, memoryview(buffer)[:n], copied)
            except OSError:
                if copied:
                    raise
                src.seek(0)
                return None  # open accepted O_DIRECT, the write did not: nothing written yet
            copied += n
        return copied
    finally:
        os.close(direct)


def write_at(fd, view, offset):
    """All of `view` at `offset`: a short write is continued (with O_DIRECT, one that leaves the
    rest unaligned fails with EINVAL), never taken for the whole."""
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(5, "the file system wrote nothing", str(fd))  # EIO, rather than a loop forever
        view, offset = view[written:], offset + written


def ready_segments(source, name):
    """Full segments after `name` that PostgreSQL has marked ready to archive, oldest first."""
    status = os.path.join(os.path.dirname(source), "archive_status")
    try:
        entries = os.listdir(status)
    except OSError:
        return []  # not a pg_wal (a test's file, a restore_command): nothing to look ahead at
    ready = sorted(e[:-6] for e in entries if e.endswith(".ready") and is_segment(e[:-6]) and e[:-6] > name)
    return ready[:LOOKAHEAD_SEGMENTS]


def look_ahead(spool, source, name):
    """Copy the next ready segments too, in one batch (the caller fsyncs the directory);
    returns their names, or none when anything went wrong."""
    batch = ahead_of(spool, source, name)
    try:
        copy_batch(spool, batch)
    except Exception:  # noqa: BLE001 - a conflict, a wrong size, an OSError, no memory for a thread...
        return []  # only a head start: each segment's own call reports what is wrong with it
    return [extra for _, extra in batch]


def mark_ahead(spool, names):
    """SPOOL/ahead/NAME for each segment copied ahead, written only once the spool directory is
    fsynced: its mtime is what the shell compares with %p's. Best effort: without a marker the
    segment's own call goes through this program, which compares the bytes."""
    if not names:
        return  # most calls: nothing copied ahead, and no listing on this per-segment path
    folder = os.path.join(spool, AHEAD_DIR)
    try:
        if not os.path.isdir(folder):
            os.mkdir(folder)
            os.chmod(folder, 0o2770)  # the portal's group removes markers as it ingests (umask 077 here)
        for old in set(os.listdir(folder)) - set(os.listdir(spool)):
            os.unlink(os.path.join(folder, old))  # ingested meanwhile, by a portal that could not remove it
        for extra in names:
            path = os.path.join(folder, extra)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o660))
            os.utime(path)  # a marker left from an earlier copy of this name must not look old
    except OSError:
        pass


def ahead_of(spool, source, name):
    """The ready segments to copy ahead, up to the first one that is not plainly good."""
    budget, batch = LOOKAHEAD_BYTES, []
    for extra in ready_segments(source, name):
        path = os.path.join(os.path.dirname(source), extra)
        try:
            size = os.path.getsize(path)
            check_size(spool, extra, size)
            if already_there(spool, path, extra):
                continue
        except (Conflict, WrongSize, OSError):
            break
        if size > budget:
            break
        batch.append((path, extra))
        budget -= size
    return batch


def write_marker(spool, name, reason, message):
    """Leave SPOOL/errors/NAME.json for the monitor; best effort (the disk may be full)."""
    import json  # only on failure (see the imports above)

    errors = os.path.join(spool, "errors")
    try:
        tmp = os.path.join(errors, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            os.fchmod(f.fileno(), 0o640)  # readable by the portal's group, whatever the umask
            json.dump({"segment": name, "reason": reason, "message": message, "at": time.time()}, f)
        os.rename(tmp, os.path.join(errors, f"{name}.json"))
    except OSError:
        pass


def clear_marker(spool, name):
    try:
        os.unlink(os.path.join(spool, "errors", f"{name}.json"))
    except OSError:
        pass  # none (the usual case), or not ours to remove: the segment is archived anyway


def main(argv):
    if len(argv) != 4:
        print("usage: archive_wal.py SPOOL_DIR %p %f", file=sys.stderr)
        return 2
    spool, source, name = argv[1:]
    if not is_wal_name(name):
        print(f"archive_wal: refusing {name!r}: not a WAL file name", file=sys.stderr)
        return 2
    try:
        # Before comparing with what is archived: a truncated copy is named as such, not as a conflict.
        if os.path.isfile(source):
            check_size(spool, name, os.path.getsize(source))
        ahead = []
        if not already_there(spool, source, name):
            copy_into_spool(spool, source, name)
            if is_segment(name):
                ahead = look_ahead(spool, source, name)
        # Also when it was there: a call that linked it and then failed before this fsync (or a
        # look-ahead still running) must not let its retry say "archived" before it is durable.
        fsync_dir(spool)
        mark_ahead(spool, ahead)
        clear_marker(spool, name)
        return 0
    except Conflict as e:
        message = f"archive_wal: {e}; the archive keeps the first one: investigate before anything else"
        write_marker(spool, name, "conflict", message)
    except WrongSize as e:
        message = (
            f"archive_wal: refusing {name}: {e}; PostgreSQL keeps the segment and retries: check pg_wal and the disk"
        )
        write_marker(spool, name, "wrong_size", message)
    except OSError as e:
        message = f"archive_wal: cannot archive {name} into {spool}: {e.strerror} ({e.filename})"
        write_marker(spool, name, "failed", message)
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
