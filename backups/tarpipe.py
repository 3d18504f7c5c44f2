"""A tar stream from one pipe into another, its headers read on the way and its files' data
moved by splice(2): from pg_basebackup's stdout into zstd's stdin without passing through
Python, which before copied each byte of the cluster twice, on the two cores zstd needs
(bench/RESULTS.md, section 2). Only the 512-byte headers, and the members a sniffer keeps
(backup_label, backup_manifest: a few hundred KB), are read here.

Pipes are also widened to 1 MiB (Linux's default limit for one pipe): with 64 KiB, each
process in the chain wakes sixteen times as often for the same bytes.
"""

import errno
import fcntl
import os

BLOCK = 512
PIPE_SIZE = 1 << 20
STEP = 1 << 20  # bytes asked of one splice: a full pipe


def widen(*fds):
    """Each pipe to PIPE_SIZE where the system allows it. An unprivileged user past
    fs.pipe-user-pages-soft gets small pipes from the kernel: slower, never wrong."""
    for fd in fds:
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass


def forward(src: int, dst: int, sniffer):
    """Everything from `src` into `dst` until `src` ends, each member's header handed to
    sniffer.start_member() and the data of the members it keeps to sniffer.feed().

    A source that ends mid-member stops the forwarding there: the tool's exit status tells why.
    OSError (the reader of `dst` died) is the caller's to handle."""
    splicing = True
    while True:
        header = _read(src, BLOCK)
        write_all(dst, header)
        if len(header) < BLOCK:
            return
        size, padding = sniffer.start_member(header)
        if sniffer.current is not None:
            data = _read(src, size + padding)
            sniffer.feed_member(data[:size])
            write_all(dst, data)
            if len(data) < size + padding:
                return
            continue
        left = size + padding
        if splicing:
            try:
                left = _splice(src, dst, left)
                if left is None:
                    return
            except _NotSpliceable as e:
                splicing, left = False, e.left  # not pipes after all (a file, a socket): copy the rest
        if left and not _copy(src, dst, left):
            return


def _read(fd, n):
    """Up to `n` bytes, fewer only at the end of the stream."""
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, STEP))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def write_all(fd, data):
    """All of `data` into `fd` (os.write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _NotSpliceable(Exception):
    def __init__(self, left):
        self.left = left


def _splice(src, dst, n):
    """`n` bytes moved in the kernel: 0 when all moved, None when the source ended first;
    _NotSpliceable(bytes left) when the descriptors are no pipes."""
    while n:
        try:
            moved = os.splice(src, dst, min(n, STEP))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS):
                raise _NotSpliceable(n) from None
            raise
        if not moved:
            return None
        n -= moved
    return 0


def _copy(src, dst, n):
    while n:
        chunk = os.read(src, min(n, STEP))
        if not chunk:
            return False
        write_all(dst, chunk)
        n -= len(chunk)
    return True
