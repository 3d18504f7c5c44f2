"""Write a directory's new files to disk while they are still arriving."""

import ctypes
import errno
import os
import threading

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path):
    """syncfs(2): the filesystem holding `path` only, not every disk of the machine as sync(2).
    Where the C library has none, OSError (ENOSYS): the writeback then does nothing."""
    if getattr(_libc, "syncfs", None) is None:
        raise OSError(errno.ENOSYS, "no syncfs in this C library", str(path))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class Writeback(threading.Thread):
    """syncfs() of `path`'s filesystem every `every` seconds, until stop().

    The kernel leaves a tenth of memory (gigabytes) unwritten until something asks for it, and
    PostgreSQL's start-up after a restore does: it fsyncs the whole data directory before recovery
    (SyncDataDirectory), while nothing else runs. Flushed as the extraction writes, the disk
    works while gpg and zstd do. On the bench's 1 GB base backup, when tar wrote it: extraction
    2.29 s then 0.45-0.61 s of sync, against 2.38-2.64 s with nothing left to write after it.
    Since the extraction writes file data with O_DIRECT (backupportal.lib.tarextract), what is
    left here is directories, the files' last partial blocks, and everything on a file system
    that refuses O_DIRECT or in a chain's parts, which pg_combinebackup reads back.

    Only an earlier start of writes that happen anyway: a failure here (the directory removed
    by an abort) ends the thread, and what was not written is fsynced by PostgreSQL as before."""

    def __init__(self, path, every=0.3):
        super().__init__(daemon=True, name=f"writeback {path}")
        self.path, self.every = path, every
        self._done = threading.Event()
        self.start()

    def run(self):
        while not self._done.wait(self.every):
            try:
                syncfs(self.path)
            except OSError:
                return

    def stop(self, wait=True):
        """`wait`: until a syncfs under way returns (a restore that succeeded); without, the thread
        ends by itself after it (an aborted one, whose files are being removed)."""
        self._done.set()
        if wait:
            self.join()
