"""The WAL chain in the catalog: which segments are present or missing, and waiting for them.

A base backup restores to a point in time only through an unbroken run of segments after
it: a gap is what PITR cannot cross.
"""

import time

from backups.models import WalSegment
from backups.pipeline import BackupFailed
from backups.walingest import ingest
from backups.walnames import WalError, segment_name, segno_of


def present_segnos(server, first, last):
    return set(
        WalSegment.objects.filter(server=server, deleted_at=None, segno__gte=first, segno__lte=last).values_list(
            "segno", flat=True
        )
    )


def missing_segments(server, first, last):
    """Names of the segments absent from the catalog between two segment numbers, inclusive."""
    if last < first:
        return []
    present = present_segnos(server, first, last)
    missing = [s for s in range(first, last + 1) if s not in present]
    if not missing:
        return []
    size = server.wal_segment_size
    names = []
    for segno in missing[:20]:
        before = (
            WalSegment.objects.filter(server=server, deleted_at=None, segno__lt=segno)
            .order_by("-segno", "-timeline")
            .values_list("timeline", flat=True)
            .first()
        )
        names.append(segment_name(before or 1, segno, size))
    return names


def chain_segments(server, first, last):
    """The catalogued segment for each number from first to last: on the newest timeline that
    has it. Raises WalError naming the first missing one."""
    missing = missing_segments(server, first, last)
    if missing:
        raise WalError(f"WAL segment {missing[0]} is missing from the archive")
    rows = (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__gte=first, segno__lte=last)
        .order_by("segno", "timeline")
        .only("id", "name", "segno", "timeline", "size", "sha256", "archived_at")
    )
    chosen = {}
    for row in rows:
        chosen[row.segno] = row  # ordered by timeline: the newest wins
    return [chosen[s] for s in range(first, last + 1)]


def last_segno(server):
    return (
        WalSegment.objects.filter(server=server, deleted_at=None, segno__isnull=False)
        .order_by("-segno")
        .values_list("segno", flat=True)
        .first()
    )


def oldest_kept_base(server):
    return server.runs.restorable_bases().order_by("start_wal", "finished_at").first()


def chain_gaps(server):
    """Missing segments since the oldest kept base backup (the window PITR can reach)."""
    base = oldest_kept_base(server)
    last = last_segno(server)
    if base is None or last is None or not server.wal_segment_size:
        return []
    return missing_segments(server, segno_of(base.start_wal, server.wal_segment_size), last)


def wait_for_wal(server, first, last, timeout):
    """Until every segment from first to last is catalogued (ingesting the spool meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        ingest(server)
        missing = missing_segments(server, first, last)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BackupFailed(
                f"WAL segment {missing[0]} was not archived within {timeout} s: "
                f"check archiving with `manage.py checkserver {server.name}`"
            )
        time.sleep(0.3)
