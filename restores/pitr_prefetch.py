"""A PITR's WAL, fetched ahead of replay while recovery runs (as pgBackRest's asynchronous
archive-get does), so that the cluster starts as soon as its base backup is in place.

Prefetch runs on a thread of its own with a small pool: each planned segment is fetched from
its first healthy copy, its sha256 checked and decrypted (streams.decrypt_first_healthy) into
the staging directory, in order, at most a window of segments (and bytes) ahead of the segment
recovery asked for last; the ones replay has passed are removed, so the staging area stays
bounded whatever the amount of WAL. Recovery's restore_command is restores/restore_wal.py (no
Django, run by PostgreSQL as the database OS user), which waits for a planned file and copies it
into place; the protocol between the two is described there.

Each segment is decrypted into STAGING/unchecked (closed to the database OS user) and read there
by pg_waldump --rmgr=Tablespace, with the end of the segment before it (a record may begin
there), before it is linked into STAGING under its name: recovery never reads a segment that
would create a tablespace, whose directory is the source cluster's (pitr_checks).

A segment that cannot be read intact, or that creates a tablespace, gets a NAME.failed marker:
restore_wal.py then stops recovery (fatal, never "not found", which would promote a cluster short
of its target), and the restore reports the error (check()). Bad copies met are marked on the
restore's thread (finish()): the catalog is never written from the pool.
"""

import os
import shlex
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings

from backups import walchain, walnames
from backups.binaries import MissingBinaries, backup_major, cluster_tool
from backups.copies import mark_faults
from backups.models import BackupCopy
from backups.streams import FetchFailed, FileSink, decrypt_first_healthy, readable
from backups.walspool import SYSTEM_PYTHON
from restores import pitr_checks, pitr_staging, restore_wal
from restores.pitr_plan import RestoreFailed, encryption_of

PROGRAM = "restore_wal.py"
BEAT_EVERY_S = 1.0
# At most settings.PITR_PREFETCH_SEGMENTS segments, and this many bytes of them, are fetched
# ahead of the one recovery reads: enough to keep the pool busy while replay (faster than a gpg
# per segment) catches up, and a bound on the staging area whatever the amount of WAL.
PREFETCH_BYTES = 256 << 20
# Replay may reread the segment before the one it asks for (a record crossing the boundary).
KEEP_BEHIND = 2


class Abandoned(Exception):
    """A fetch gave up waiting for the segment before it (the restore is ending or failed)."""


def restore_command(staging: Path) -> str:
    """The restore_command line (`%` is its escape character: a literal one must be doubled)."""
    program, directory = (shlex.quote(str(p)).replace("%", "%%") for p in (staging / PROGRAM, staging))
    return f"/usr/bin/env -i {SYSTEM_PYTHON} -I -S {program} {directory} %f %p"


def install(staging: Path, names):
    """The program and the plan (every file this restore provides) into the staging directory,
    readable by the database OS user. Written again when the plan changes (an older base)."""
    shutil.copyfile(Path(restore_wal.__file__), staging / PROGRAM)
    pitr_staging.readable(staging / PROGRAM)
    tmp = staging / f".{restore_wal.PLAN}.tmp"
    tmp.write_text("".join(f"{name}\n" for name in names))
    pitr_staging.readable(tmp)
    os.replace(tmp, staging / restore_wal.PLAN)


def window(plan):
    return max(1, min(settings.PITR_PREFETCH_SEGMENTS, PREFETCH_BYTES // plan.segment_size))


class Prefetch:
    """Segments first..last of the plan's chain, fetched ahead of replay on a thread of its own."""

    def __init__(self, plan, first, last):
        self.plan, self.staging, self.unchecked, self.last = plan, plan.staging, plan.unchecked, last
        try:
            self.segments = walchain.chain_segments(plan.server, first, last, plan.lineage) if last >= first else []
            self.waldump = cluster_tool(backup_major(plan.base), "pg_waldump", f"checking the WAL of {plan.server}")
        except (walnames.WalError, MissingBinaries) as e:
            raise RestoreFailed(str(e)) from None
        self.copies = {}
        for copy in BackupCopy.objects.filter(wal_segment__in=self.segments).select_related("location"):
            self.copies.setdefault(copy.wal_segment_id, []).append(copy)
        for segment in self.segments:
            plan.staged[segment.segno] = segment.name
        # The base backup's own WAL is checked by pg_verifybackup before recovery asks for anything.
        base_wal = plan.segno(plan.newest.end_wal) - first + 1
        self.window = max(window(plan), base_wal)
        self.by_segno = {s.segno: s for s in self.segments}
        self.present = set()  # segnos staged and not removed
        self.removed = set()
        self.checked = set()  # segnos whose check passed (a segment fetched again is not read twice)
        self.passed = set()  # segnos checked and linked into the staging directory, by this prefetcher
        self.notes, self.faults = [], []
        self.error = None
        self.stopping = threading.Event()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="pitr-prefetch", daemon=True)

    # --------------------------------------------------------------------- the restore's thread

    def start(self):
        # The segment pg_receivewal is still receiving, copied in by pitr.stage_partial: checked too.
        for segno in sorted(s for s in self.plan.staged if s > self.last and s not in self.by_segno):
            name = self.plan.staged[segno]
            if (self.unchecked / name).exists():
                self.segments.append(SimpleNamespace(segno=segno, name=name, pk=None, sha256=None))
                self.by_segno[segno] = self.segments[-1]
        self.beat()
        self.thread.start()
        return self

    def check(self):
        """Raise the first fetch failure (FetchFailed, naming the segment), if there was one."""
        if self.error is not None:
            raise self.error
        if not self.thread.is_alive() and not self.stopping.is_set():
            raise RestoreFailed("the WAL prefetcher stopped before the restore ended")

    def wait_for(self, segno, timeout=None):
        """Until segment `segno` is staged (the base backup's own WAL, for pg_verifybackup)."""
        deadline = time.monotonic() + (timeout or settings.BACKUP_TIMEOUT)
        with self.changed:
            while segno in self.by_segno and segno not in self.present:
                self.check()
                if time.monotonic() > deadline:
                    raise RestoreFailed(f"WAL segment {self.by_segno[segno].name} was not fetched in time")
                self.changed.wait(0.2)
        self.check()

    def finish(self):
        """Stop the thread and its pool (in-flight fetches end first), then mark the bad copies
        it met and keep its notes. Safe to call twice, and whatever happened."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        faults, self.faults = self.faults, []
        mark_faults(faults, alert=False)  # alerts: the monitor
        notes, self.notes = self.notes, []
        self.plan.notes += notes

    # --------------------------------------------------------------------- the prefetch thread

    def run(self):
        try:
            self.prefetch()
        except Exception as e:  # noqa: BLE001 - a bug or a vanished directory: the restore reports it
            if self.error is None:
                self.error = RestoreFailed(f"the WAL prefetcher stopped: {type(e).__name__}: {e}")
        finally:
            with self.changed:
                self.changed.notify_all()

    def prefetch(self):
        queue = list(reversed(self.segments))  # pop() takes the oldest
        pending = {}
        wanted = self.segments[0].segno - 1 if self.segments else 0  # replay's newest segment
        workers = max(2, os.cpu_count() or 2)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pitr-fetch") as pool:
            while not self.stopping.is_set():
                self.beat()
                done = [f for f in pending if f.done()]
                for future in done:
                    self.settle(pending.pop(future), future)
                if self.error is not None:
                    break
                asked = self.requested()
                wanted = max(wanted, asked)
                self.prune(wanted)
                again = self.by_segno.get(asked)
                if again is not None and asked in self.removed and again not in pending.values():
                    self.removed.discard(asked)  # replay went back: fetch it again
                    queue.append(again)
                while queue and len(pending) < workers and queue[-1].segno - wanted <= self.window:
                    segment = queue.pop()
                    pending[pool.submit(self.fetch, segment)] = segment
                if pending:
                    wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                else:
                    self.stopping.wait(0.1)
            for future in list(pending):  # the pool waits for these anyway: keep what they say
                self.settle(pending.pop(future), future)

    def fetch(self, segment):
        """Decrypt the segment into the unchecked directory, check it, and link it into the
        staging directory, where restore_wal.py may hand it to recovery. On a pool thread."""
        path, held = self.staging / segment.name, self.unchecked / segment.name
        result = [], []
        if path.exists():  # staged by an earlier prefetcher of this restore (an older base): checked
            if not held.exists():
                os.link(path, held)  # for the check of the segment after it
            self.checked.add(segment.segno)
        elif not held.exists():  # else decrypted already: pitr.stage_wal, stage_partial, or before a prune
            result = decrypt_first_healthy(
                readable(self.copies.get(segment.pk, [])),
                FileSink(held),
                encryption_of(self.plan),
                f"WAL segment {segment.name}",
                plain_sha256=segment.sha256,
            )
            with self.changed:
                self.plan.wal_read += getattr(segment, "size", 0) or self.plan.segment_size
        if segment.segno not in self.checked:
            self.check_tablespaces(segment)
            self.checked.add(segment.segno)
        if not path.exists():
            pitr_staging.readable(held)  # the same file as the staged one, which recovery reads
            linking = self.staging / f".{segment.name}.linking"
            linking.unlink(missing_ok=True)
            os.link(held, linking)
            os.replace(linking, path)  # appears whole, under its name
        with self.changed:
            self.passed.add(segment.segno)
            self.changed.notify_all()
        return result

    def check_tablespaces(self, segment):
        """No tablespace is created by a record ending in this segment (one may begin in the one
        before, so that one is checked and linked first). TablespaceInWal otherwise."""
        before = self.by_segno.get(segment.segno - 1)
        if before is not None:
            with self.changed:
                while before.segno not in self.passed:
                    if self.stopping.is_set() or self.error is not None:
                        raise Abandoned()
                    self.changed.wait(0.1)
        previous = before.name if before is not None else None
        stopped = {}
        found = pitr_checks.tablespace_creations(
            self.waldump, self.unchecked, segment.name, previous, self.plan.segment_size, stopped
        )
        if found:
            raise pitr_checks.refusal(segment.name, found)
        if stopped and segment.pk is not None:  # not pg_receivewal's segment: its end is zeros
            # Archived whole, it was damaged after its checksum was taken, or before (in the
            # spool): recovery will stop there. Only --target latest could take that for the end.
            self.plan.damaged.setdefault(segment.segno, (segment.name, *stopped[segment.name]))

    def settle(self, segment, future):
        try:
            notes, faults = future.result()
        except Abandoned:
            return  # whatever stopped it is what the restore reports
        except FetchFailed as e:
            self.faults += e.faults
            self.fail(segment, e)
            return
        except RestoreFailed as e:  # a tablespace created, or a segment pg_waldump cannot read
            self.fail(segment, e)
            return
        except Exception as e:  # noqa: BLE001 - an OSError (disk full), a bug: the restore reports it
            self.fail(segment, RestoreFailed(f"WAL segment {segment.name} could not be staged: {e}"))
            return
        self.notes += notes
        self.faults += faults
        with self.changed:
            self.present.add(segment.segno)
            self.changed.notify_all()

    def fail(self, segment, error):
        """Remember the first failure; restore_wal.py stops recovery when it asks for the segment."""
        if self.error is None:
            self.error = error
        marker = self.staging / f"{segment.name}.failed"
        try:
            marker.write_text(str(error).splitlines()[0] + "\n")
            pitr_staging.readable(marker)
        except OSError:
            pass  # the restore fails on self.error anyway; without the marker recovery waits, then stops
        with self.changed:
            self.changed.notify_all()

    def requested(self):
        """The number of the segment recovery asked for last; -1 before it asks."""
        name = pitr_staging.requested(self.staging)
        try:
            return self.plan.segno(name) if len(name) == 24 else -1
        except ValueError:
            return -1

    def prune(self, wanted):
        """Remove the segments replay has passed: the staging area holds about a window."""
        with self.changed:
            for segno in [s for s in self.present if s < wanted - KEEP_BEHIND]:
                (self.staging / self.by_segno[segno].name).unlink(missing_ok=True)
                (self.unchecked / self.by_segno[segno].name).unlink(missing_ok=True)
                self.present.discard(segno)
                self.removed.add(segno)

    def beat(self):
        try:
            (self.staging / restore_wal.ALIVE).touch()  # root's: restore_wal.py only looks at its time
        except OSError:
            pass  # the directory is being removed: the restore is ending
