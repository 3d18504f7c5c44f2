"""A PITR's base backup into the new data directory: decrypted from the first healthy copy,
decompressed by `zstd -d` when its run says zstd (older runs: gpg undid its own compression),
straight into the extraction of backupportal.lib.tarextract (started early, on a thread of its
own, while the WAL is staged), then checked against its manifest by pg_verifybackup before
recovery starts. Split from restores/pitr.py.
"""

import errno
import json
import os
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backupportal.lib import tarextract
from backupportal.lib.childenv import child_env
from backupportal.lib.osuser import as_db_user_tied, db_user_ids, give_to_db_user, read_regular, remove_tree
from backupportal.lib.writeback import Writeback
from backups import tarpipe
from backups.binaries import backup_major, cluster_tool
from backups.copies import decrypt_here, settled
from backups.crypto import die_with_parent
from backups.streams import FetchFailed, FileSink, decrypt_first_healthy, readable
from restores.pitr_plan import RestoreFailed, encryption_of


def move_file(source: Path, target: Path):
    """`source` renamed to `target`, or copied there when they are on two filesystems (the WAL
    staging directory and the data directory): under a temporary name, never through a link."""
    try:
        os.replace(source, target)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    sink = FileSink(target)
    sink.open()
    try:
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                sink.write(chunk)
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    source.unlink()


def give_back(directory, owner):
    """An emptied directory the restore did not make, back to the mode and owner it had
    (pitr.prepare_datadir made it the database OS user's, 0700). `owner`: {} for none kept."""
    if owner:
        os.chown(directory, owner["uid"], owner["gid"], follow_symlinks=False)
        os.chmod(directory, owner["mode"])


def empty(directory):
    for child in directory.iterdir():
        remove_tree(child)


class TarSink:
    """Plaintext into the data directory, through `zstd -d` first when the base backup's run
    recorded zstd (BackupRun.base_compression), extracted here by backupportal.lib.tarextract:
    its files' data written with O_DIRECT, owned by the database OS user."""

    def __init__(self, datadir: Path, compression="gpg", direct=True):
        self.datadir, self.compression, self.direct = datadir, compression, direct
        self.unzstd = self.extraction = self.writeback = None
        self.feed = None  # our end of the pipe gpg writes into, when nothing is between
        self.lock = threading.RLock()  # open() and kill() from two threads; the feed closed once
        self.stopped = False

    def open(self):
        with self.lock:  # kill() from another thread waits until what it must stop exists
            if self.stopped:  # Extraction.stop(): no next copy is tried
                raise RestoreFailed("the extraction was stopped")
            self.unzstd = self.extraction = self.feed = self.writeback = None  # a copy tried before is done
            source = None
            try:
                if self.compression == "zstd":
                    self.unzstd_errors = tempfile.TemporaryFile()
                    self.unzstd = subprocess.Popen(
                        ["zstd", "--decompress", "-q", "-c"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=self.unzstd_errors,
                        env=child_env(),
                    )
                    tarpipe.widen(self.unzstd.stdin.fileno(), self.unzstd.stdout.fileno())
                    source = os.dup(self.unzstd.stdout.fileno())
                    self.unzstd.stdout.close()  # the extraction's copy alone: zstd sees it go if it stops
                else:
                    source, self.feed = os.pipe()
                    tarpipe.widen(self.feed)
                extraction = tarextract.Extraction(source, self.datadir, owner=db_user_ids(), direct=self.direct)
                extraction.start()
                self.extraction, source = extraction, None  # from here on, it closes `source`
                self.writeback = Writeback(self.datadir)  # metadata and the files' tails, as they come
            except BaseException:
                if source is not None:
                    os.close(source)
                self.kill()
                if self.unzstd is not None:
                    self.unzstd.wait()
                self._close_feed()
                if self.extraction is not None:
                    self.extraction.join()
                raise

    def fileno(self):
        return self.unzstd.stdin.fileno() if self.unzstd is not None else self.feed

    def failure(self):
        """Why the extraction or zstd stopped early (a full disk ...), or None while they run or
        when they succeeded.

        The extraction first: when it stops (a full disk), zstd's broken pipe is only the
        consequence; but a tar cut short is the consequence of zstd's own failure."""
        error = self.extraction.error if self.extraction is not None else None
        unzstd = self.unzstd is not None and self.unzstd.poll() not in (None, 0)
        if error is not None and not (unzstd and isinstance(error, tarextract.StreamCut)):
            return f"could not extract the base backup: {describe(error)}"
        if unzstd:
            return f"zstd could not decompress the base backup: {self.tail(self.unzstd_errors)}"
        return None

    @staticmethod
    def tail(errors):
        errors.seek(0)
        return errors.read().decode(errors="replace")[-300:]

    def _close_feed(self):
        """The end of what gpg writes: zstd's stdin, or our end of the pipe into the extraction.
        Only on the thread that runs gpg (commit, abort), once it is done with fileno()."""
        with self.lock:
            if self.unzstd is not None and not self.unzstd.stdin.closed:
                self.unzstd.stdin.close()
            if self.feed is not None:
                os.close(self.feed)
                self.feed = None

    def commit(self):
        self._close_feed()  # the end of the stream: zstd ends, then the extraction
        if self.unzstd is not None:
            self.unzstd.wait()
        self.extraction.join()
        self.stop_writeback()
        if failure := self.failure():
            raise RestoreFailed(failure)
        if not self.extraction.finished:
            raise RestoreFailed("could not extract the base backup: the stream ended before the tar did")

    def kill(self):
        """From any thread: the extraction stops reading (closing its end of the pipe) and zstd
        is killed, so gpg stops on a broken pipe. No descriptor gpg may still be given is closed."""
        with self.lock:
            if self.extraction is not None:
                self.extraction.stop()
            if self.unzstd is not None:
                self.unzstd.kill()
            self.stop_writeback(wait=False)  # what it would flush is about to be removed

    def stop_writeback(self, wait=True):
        if self.writeback is not None:
            self.writeback.stop(wait)

    def abort(self):
        self.kill()
        self._close_feed()
        if self.unzstd is not None:
            self.unzstd.wait()
        if self.extraction is not None:
            self.extraction.join()
        empty(self.datadir)


def describe(error):
    """An OSError as one line naming the file (No space left on device: base/5/16384), else the error."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f' ({error.filename})' if error.filename else ''}"
    if isinstance(error, tarextract.TarRefused):
        return str(error)
    return f"{type(error).__name__}: {error}"


class Extraction:
    """The planned base backup's extraction, started on a thread of its own, and its manifest
    when the server compressed it (no backup_manifest in its tar) on another: gpg's key
    derivation for that small file then costs the restore nothing."""

    EARLY_MANIFEST = ".backup_manifest.early"

    def __init__(self, plan):
        copies = readable(plan.base.copies.filter(artifact="main").select_related("location"))
        self.sink = TarSink(plan.datadir, plan.base.base_compression)
        args = (copies, self.sink, encryption_of(plan), f"base backup #{plan.base.pk}")
        pool = ThreadPoolExecutor(max_workers=2)
        self.future = pool.submit(decrypt_first_healthy, *args)
        self.manifest = None
        if not plan.base.details.get("manifest_in_tar", True):
            # In the WAL staging directory (not the data directory, which an abort empties);
            # moved in once extracted.
            self.manifest_path = plan.staging / self.EARLY_MANIFEST
            copies = readable(plan.base.copies.filter(artifact="manifest").select_related("location"))
            what = f"the backup_manifest of base backup #{plan.base.pk}"
            self.manifest = pool.submit(
                decrypt_first_healthy, copies, FileSink(self.manifest_path), encryption_of(plan), what
            )
        pool.shutdown(wait=False)  # the threads end with the fetches

    def notes(self):
        """Its notes, the bad copies it met marked here (the catalog stays on this thread)."""
        try:
            return settled(self.future.result)
        except BaseException:
            self.drop_manifest()
            raise

    def place_manifest(self, plan, path):
        """The manifest fetched meanwhile, moved to `path`; FetchFailed as place_manifest()."""
        plan.notes += settled(self.manifest.result)
        move_file(self.manifest_path, path)

    def drop_manifest(self):
        """Once its fetch is over, the early manifest removed (its bad copies marked)."""
        if self.manifest is None:
            return
        try:
            settled(self.manifest.result)
        except Exception:  # noqa: BLE001 - the restore reports what stopped it, not this
            pass
        self.manifest_path.unlink(missing_ok=True)

    def stop(self):
        """Stop zstd and the extraction (gpg stops on the broken pipe) and wait, marking any bad
        copy it met; no further copy is opened.

        Called while another error propagates: that one is what the restore reports."""
        with self.sink.lock:  # an open() under way finishes first, then is stopped
            self.sink.stopped = True
        self.sink.kill()
        try:
            self.notes()
        except Exception:  # noqa: BLE001 - its own failure (the extraction killed, say) is a consequence
            pass
        self.drop_manifest()


def extract_base(plan, early=None):
    if early is not None:
        plan.notes += early.notes()
        sink = early.sink
    else:
        copies = readable(plan.base.copies.filter(artifact="main").select_related("location"))
        sink = TarSink(plan.datadir, plan.base.base_compression)
        plan.notes += decrypt_here(copies, sink, encryption_of(plan), f"base backup #{plan.base.pk}")
    plan.extracted = sink.extraction.files
    try:
        place_manifest(plan, plan.base, plan.datadir, early)
    except FetchFailed:
        empty(plan.datadir)  # an older base, if any, is extracted into it next
        raise
    if not (plan.datadir / "backup_manifest").exists():
        raise RestoreFailed(f"base backup #{plan.base.pk} holds no backup_manifest: it cannot be verified")


def place_manifest(plan, run, directory, early=None):
    """The backup_manifest of a backup the server compressed (its tar holds none: backups.basestream),
    decrypted from the run's "manifest" artifact into `directory`, for pg_verifybackup and
    pg_combinebackup; the one an early Extraction fetched meanwhile, if any. Any other tar
    carried its own."""
    if run.details.get("manifest_in_tar", True):
        return
    path = directory / "backup_manifest"
    if early is not None and early.manifest is not None:
        early.place_manifest(plan, path)
    else:
        copies = readable(run.copies.filter(artifact="manifest").select_related("location"))
        what = f"the backup_manifest of base backup #{run.pk}"
        plan.notes += decrypt_here(copies, FileSink(path), encryption_of(plan), what)
    give_to_db_user(path)


def verify_base(plan):
    """pg_verifybackup: every file against the manifest, and the backup's own WAL, before recovery.

    The files' checksums are compared here when the extraction took them (CRC-32C, the
    manifest's default) and pg_verifybackup skips them: the files went to disk with O_DIRECT, and
    it would read every byte back from there. It still checks the manifest's own checksum, that
    every file is there with its size and nothing else is, and the WAL."""
    skip = ["--skip-checksums"] if checksums_checked(plan) else []
    proc = subprocess.run(
        as_db_user_tied(
            [
                str(cluster_tool(backup_major(plan.base), "pg_verifybackup", f"checking base backup #{plan.base.pk}")),
                f"--wal-directory={plan.staging}",
                *skip,
                str(plan.datadir),
            ]
        ),
        capture_output=True,
        text=True,
        cwd=plan.datadir,
        env=child_env(),
        timeout=3600,
        preexec_fn=die_with_parent,  # with as_db_user_tied: never left running on its own
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RestoreFailed(
            f"base backup #{plan.base.pk} does not match its manifest: {lines[0] if lines else 'pg_verifybackup failed'}"
        )
    said = proc.stdout.strip() or "backup successfully verified"
    how = f"; the {len(plan.extracted)} files' CRC-32C compared with it as they were extracted" if skip else ""
    plan.notes.append(f"pg_verifybackup: {said}{how}")


# A manifest beyond this (a cluster of millions of files) is left to pg_verifybackup to read.
MANIFEST_READ = 512 << 20


def checksums_checked(plan):
    """True when every file of the manifest with a checksum was compared here with the one the
    extraction took (RestoreFailed on the first that differs); False when some other algorithm
    (or no extraction of ours: a combined chain) leaves them to pg_verifybackup."""
    if plan.extracted is None:
        return False
    try:
        wanted = crc32c_entries(json.loads(read_regular(plan.datadir / "backup_manifest", MANIFEST_READ)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # a manifest that does not parse: pg_verifybackup says what is wrong with it
    if wanted is None:
        return False
    for path, size, checksum in wanted:
        if (found := plan.extracted.get(path)) is None:
            return False  # not extracted by us (or missing): pg_verifybackup names it
        if found != (size, checksum):
            what = "size" if found[0] != size else "checksum"
            raise RestoreFailed(
                f'base backup #{plan.base.pk} does not match its manifest: {what} mismatch for file "{path}"'
            )
    return True


def crc32c_entries(manifest):
    """(path, size, checksum) of each file with a CRC-32C; None when some file has another
    algorithm, which only pg_verifybackup checks."""
    wanted = []
    for entry in manifest["Files"]:
        algorithm = entry.get("Checksum-Algorithm", "NONE")
        if algorithm not in ("CRC32C", "NONE"):
            return None
        if algorithm == "CRC32C":
            path, size, checksum = manifest_path(entry), entry["Size"], entry["Checksum"]
            if not (isinstance(path, str) and type(size) is int and isinstance(checksum, str)):
                return None  # not what PostgreSQL writes: pg_verifybackup says what is wrong
            wanted.append((path, size, checksum.lower()))
    return wanted


def manifest_path(entry):
    """A manifest entry's path: "Encoded-Path" (hex) for a name that is not UTF-8."""
    if "Encoded-Path" in entry:
        return bytes.fromhex(entry["Encoded-Path"]).decode("utf-8", "surrogateescape")
    return entry["Path"]
