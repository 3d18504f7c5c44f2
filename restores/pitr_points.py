"""A PITR to a restore point's name: where in the WAL the restore point is, and so which base
backup recovery starts from and how far it reads. Recovery stops at the first restore point of
that name after the base is consistent, comparing names byte for byte: each is read from its
record (pitr_checks.restore_point), never only from pg_waldump's line.
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor

from backups import walchain, walnames
from backups.binaries import backup_major, cluster_dir
from backups.copies import mark_faults
from backups.models import BackupCopy
from backups.streams import FetchFailed, FileSink, decrypt_first_healthy, readable
from restores import pitr_checks, pitr_reach
from restores.models import RestoreRun
from restores.pitr_plan import RestoreFailed, encryption_of

SEARCH_WINDOW = 16  # segments decrypted at a time while a restore point is searched for
RESTORE_POINT_LINE = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: RESTORE_POINT (.*)$")
LSN_OF_LINE = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+),")


def waldump(plan, first, last, rmgr):
    """pg_waldump's lines for staged segments first..last (times in UTC)."""
    bin_dir = cluster_dir(backup_major(plan.base), f"reading the WAL of {plan.server}")
    return pitr_reach.waldump(bin_dir, plan.unchecked, plan.staged[first], plan.staged[last], rmgr)


def find_restore_point(plan, run):
    """Find the restore point in the WAL, going back base backup by base backup.

    Recovery stops at the first restore point of that name after the base backup is
    consistent: the newest base backup with one after its end is the one to use. The WAL is
    searched through plan.last, where the archive's chain from the newest base ends
    (needed_through): a gap beyond it cannot hide the restore point recovery stops at, only a
    later one of the same name, which the notes then say.
    """
    if plan.search_end is None:  # the first search; one after a fallback to an older base reads as far
        plan.search_end = plan.last
    end = upper = plan.search_end
    gap = end < (walchain.last_segno(plan.server, plan.lineage) or end)
    beyond = walnames.segment_name(plan.lineage.timeline_of(end + 1), end + 1, plan.segment_size) if gap else ""
    found = []
    for base in reversed(plan.bases):
        first = plan.segno(base.start_wal)
        found += restore_points_in(plan, first, upper)
        after = sorted(walnames.lsn_to_int(lsn) for lsn, _ in found if lsn_at_or_after(lsn, base.end_lsn))
        if after:
            plan.base = base
            pitr_checks.duplicate_restore_points(plan, found)  # recovery would stop at the first
            RestoreRun.objects.filter(pk=run.pk).update(backup_run=base)
            # The record's segment, and the next: recovery reads on to the record after it.
            plan.last = min(end, after[0] // plan.segment_size + 1)
            if gap:
                plan.notes.append(
                    f"the archive has a gap at segment {beyond}: the WAL beyond it was not searched for another "
                    f"restore point named {plan.target.value!r} (recovery stops at the first, found before it)"
                )
            return
        upper = first - 1
    missing = f" up to segment {beyond}, missing from the archive: the WAL after it cannot be searched" if gap else ""
    if found:  # in the WAL, before every kept base backup is consistent (a probe found it "not in the WAL")
        lsn, at = max(found, key=lambda point: walnames.lsn_to_int(point[0]))
        oldest = plan.bases[0]
        when = "before" if not lsn_at_or_after(lsn, oldest.start_lsn) else "while"
        raise RestoreFailed(
            f"restore point {plan.target.value!r} (LSN {lsn}, created at {at}) was made {when} the oldest kept base "
            f"backup (#{oldest.pk}, consistent from LSN {oldest.end_lsn}) {'began' if when == 'before' else 'ran'}: "
            "no kept base backup is consistent before it, so recovery cannot stop there; choose a later target"
        )
    raise RestoreFailed(
        f"restore point {plan.target.value!r} is not in the WAL archived since the oldest base backup{missing}"
    )


def lsn_at_or_after(lsn, other):
    return walnames.lsn_to_int(lsn) >= walnames.lsn_to_int(other)


def restore_points_in(plan, first, last):
    """(LSN, creation time) of each restore point of the target's name in segments first..last,
    decrypted SEARCH_WINDOW at a time and removed once read: the disk a search needs is bounded
    whatever the amount of WAL (the prefetcher fetches recovery's own later). Each segment is
    read with the one before it: a record may start there and end in it."""
    found = {}
    for start in range(first, last + 1, SEARCH_WINDOW):
        end = min(last, start + SEARCH_WINDOW - 1)
        stage_wal(plan, max(first, start - 1), end)
        for segno in range(start, end + 1):
            for line in segment_lines(plan, first, segno):
                m = RESTORE_POINT_LINE.search(line)
                if m and m.group(1) not in found:
                    at, name = pitr_checks.restore_point(plan, m.group(1), m.group(2))
                    if name == plan.target.value:
                        found[m.group(1)] = at
        unstage(plan, range(max(first, start - 1), end))  # `end`: the next window's segment before
    unstage(plan, [last])
    return list(found.items())


def segment_lines(plan, first, segno):
    """pg_waldump's XLOG lines of segment `segno`, read from the segment before when that one is on
    the same timeline (pg_waldump takes the timeline from the last file named, and after a
    promotion finds none of the earlier one's); alone as well when the pair showed nothing of it,
    as a bad record in the one before stops pg_waldump before this one (pitr_reach.scan too)."""
    before = segno - 1
    if before < first or plan.staged[before][:8] != plan.staged[segno][:8]:
        return waldump(plan, segno, segno, "XLOG")
    lines = waldump(plan, before, segno, "XLOG")
    ours = [line for line in lines if (m := LSN_OF_LINE.search(line)) and _in(plan, m.group(1), segno)]
    return lines if ours else lines + waldump(plan, segno, segno, "XLOG")


def _in(plan, lsn, segno):
    return walnames.segno_of_lsn(lsn, plan.segment_size) == segno


def unstage(plan, segnos):
    for segno in segnos:
        name = plan.staged.pop(segno, None)
        if name is not None:
            (plan.unchecked / name).unlink(missing_ok=True)


def stage_wal(plan, first, last):
    """Fetch, verify and decrypt segments first..last into the staging directory, in parallel."""
    if last < first:
        return
    try:
        chain = walchain.chain_segments(plan.server, first, last, plan.lineage)
        segments = [s for s in chain if s.segno not in plan.staged]
    except walnames.WalError as e:
        raise RestoreFailed(str(e)) from None
    copies = {}
    for copy in BackupCopy.objects.filter(wal_segment__in=segments).select_related("location"):
        copies.setdefault(copy.wal_segment_id, []).append(copy)

    def one(segment):  # into the unchecked directory: the prefetcher checks it before recovery may read it
        sink = FileSink(plan.unchecked / segment.name)
        try:
            notes, faults = decrypt_first_healthy(
                readable(copies.get(segment.pk, [])),
                sink,
                encryption_of(plan),
                f"WAL segment {segment.name}",
                plain_sha256=segment.sha256,
            )
        except FetchFailed as e:
            return segment, e, e.faults
        return segment, notes, faults

    failure = None
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for segment, outcome, faults in pool.map(one, segments):
            mark_faults(faults, alert=False)  # here: the catalog stays on this thread; alerts: the monitor
            if isinstance(outcome, FetchFailed):
                failure = failure or outcome
                continue
            plan.staged[segment.segno] = segment.name
            plan.notes += outcome
    if failure is not None:
        raise failure
