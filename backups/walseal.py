"""Compressing and encrypting one spool file into the WAL location (backups.walingest's workers).

Under a WAL data key (backups.walkeys) zstandard and backups.openpgp do both in the calling
thread; with GPG_RECIPIENTS a zstd and a gpg process do. Either way the result is what
`gpg -d F | zstd -d` gives back, and the plaintext is hashed on its way (HashingReader).
"""

import hashlib
import os
import subprocess
import threading
from pathlib import Path

import zstandard

from backupportal.lib.childenv import child_env
from backups import openpgp, streams
from backups.crypto import PipeSource, die_with_parent
from backups.storage import StorageError
from backups.walnames import WalError
from backups.walspool import check_length, open_wal_file

# WAL is compressed by zstd before it is encrypted: on a 16 MB pgbench segment zstd -1 took 0.05 s
# where gpg's zlib level 1 took 0.13 s, for a smaller file. Level -1 (`zstd --fast=1`) gives the same
# size on WAL as level 1 in 60-80% of the time (in this process: 0.016 s against 0.029 s on a
# segment half random bytes, 0.008 against 0.010 on pgbench's, both within 0.3% in size).
# Undone by `gpg -d F | zstd -d`; each copy records it (BackupCopy.compression). Segments from
# before it were compressed by gpg itself (level 1) and still decrypt with `gpg -d` alone.
WAL_ZSTD_LEVEL = -1
WAL_ZSTD = ["zstd", "-q", "--fast=1", "-c"]  # with GPG_RECIPIENTS (seal): the spool file on its stdin
WAL_COMPRESSION = "zstd"
CHUNK = 1024 * 1024


class HashingReader:
    """A file wrapper that hashes what is read through it (the plaintext, on its way to gpg)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        chunk = self.f.read(n)
        self.sha256.update(chunk)
        self.size += len(chunk)
        return chunk


class PositionalReader:
    """Reads an open file from its start by offset (pread): zstd reads the same open file meanwhile,
    moving the offset they share."""

    def __init__(self, fd):
        self.fd, self.offset = fd, 0

    def read(self, n):
        chunk = os.pread(self.fd, n, self.offset)
        self.offset += len(chunk)
        return chunk


class CompressedSegment(streams.Source):
    """A spool file (open as `fd`, walspool.open_wal_file) through `zstd -1`, whose output gpg reads
    itself (crypto.PipeSource); this process hashes the file meanwhile (`reader`: the archived
    plaintext, whatever stat said, read no further than `limit` and one byte). Spool files are never
    rewritten (the archive program renames them into place)."""

    def __init__(self, path: Path, fd, limit):
        self.path, self.fd, self.limit, self.name = path, fd, limit, f"zstd of {path.name}"
        self.zstd = self.hasher = self.reader = None
        self.error = None

    def open(self):
        try:
            self.zstd = subprocess.Popen(
                WAL_ZSTD,
                stdin=self.fd,  # the file opened without following a link, never its name
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_env(),  # never the worker's S3 keys or passphrase settings
                preexec_fn=die_with_parent,
            )
        except FileNotFoundError:
            raise streams.EncryptFailed(
                "zstd is not installed: apt-get install zstd (WAL is compressed by it)"
            ) from None
        self.hasher = threading.Thread(target=self._hash, daemon=True)
        self.hasher.start()
        return PipeSource(self.zstd.stdout)

    def _hash(self):
        try:
            self.reader = HashingReader(PositionalReader(self.fd))
            while self.reader.size <= self.limit and self.reader.read(CHUNK):
                pass
        except OSError as e:
            self.error = e

    def stop(self):
        if self.zstd and self.zstd.poll() is None:
            self.zstd.kill()

    def finish(self):
        if self.zstd is None:
            return
        self.hasher.join()
        self.zstd.wait()
        self.said = self.zstd.stderr.read().decode(errors="replace").strip()
        self.zstd.stdout.close(), self.zstd.stderr.close()

    def check(self):
        if self.error is not None:
            raise streams.EncryptFailed(f"cannot read {self.path}: {self.error}")
        if self.zstd.returncode != 0:
            raise streams.EncryptFailed(f"zstd failed on {self.path.name} (exit {self.zstd.returncode}): {self.said}")
        try:
            check_length(self.path, self.reader.size, self.limit)
        except WalError as e:
            raise streams.EncryptFailed(str(e)) from None


def seal(store, key, path: Path, encryption, segment_size=None):
    """Compress and encrypt the spool file `path` into `store` under `key`: (reader, size, sha256),
    the reader having hashed the plaintext. With a WAL data key both happen in this thread
    (zstandard and backups.openpgp, which leave the GIL for the work); with GPG_RECIPIENTS
    through a zstd and a gpg process, as gpg alone encrypts to public keys. The file is opened
    once, never through a symbolic link (walspool.open_wal_file: a WalError saying what is there
    instead), and read no further than its kind can be (`segment_size`, the server's)."""
    try:
        fd, limit = open_wal_file(path, segment_size)
    except OSError as e:
        raise WalError(f"cannot read {path}: {e}") from None
    try:
        if encryption.recipients or not encryption.key_id:
            segment = CompressedSegment(path, fd, limit)
            size, sha256 = encrypt_into(store, key, segment, encryption)
            return segment.reader, size, sha256  # the reader exists once encrypt_into opened the segment
        with store.writer(key) as writer:
            sealed = openpgp.SymmetricWriter(Written(writer, key), encryption.passphrase)
            compressor = zstandard.ZstdCompressor(level=WAL_ZSTD_LEVEL).compressobj()
            with open(fd, "rb", closefd=False) as f:
                reader = HashingReader(f)
                while reader.size <= limit and (chunk := _read(reader, path, openpgp.PIECE)):
                    sealed.write(compressor.compress(chunk))
            check_length(path, reader.size, limit)  # a file growing while it is read: nothing is committed
            sealed.write(compressor.flush())
            sealed.close()
            return reader, *writer.commit()
    finally:
        os.close(fd)


class Written:
    """A location's writer whose failures say which file the WAL archive refused."""

    def __init__(self, writer, key):
        self.writer, self.key = writer, key

    def write(self, data):
        try:
            self.writer.write(data)
        except (OSError, StorageError) as e:
            raise WalError(f"cannot write {self.key} into the WAL archive: {e}") from None


def _read(reader, path, size):
    try:
        return reader.read(size)
    except OSError as e:
        raise WalError(f"cannot read {path}: {e}") from None


def encrypt_into(store, key, segment, encryption):
    """Stream `segment` (CompressedSegment) through gpg into an atomic file (backups.streams).
    Returns (size, sha256) of the ciphertext."""
    try:
        return streams.encrypt_into(store, key, segment, encryption)
    except streams.WriteFailed as e:
        raise WalError(f"cannot write {key} into the WAL archive: {e.error}") from None
    except streams.EncryptFailed as e:
        raise WalError(str(e)) from None
