"""The WAL chain in the catalog: which segments are present or missing, and waiting for them.

A base backup restores to a point in time only through an unbroken run of segments after
it: a gap is what PITR cannot cross.

The archive may hold more than one timeline: production's own, after a promotion, and any other
that reached its spool (a copy restored by hand with production's archive_command). A PITR
follows one timeline's history (a Lineage, read from its .history file): below each switch point
the parent's segments, from it on the child's; segments of any other timeline are not its WAL.
Without a lineage, the newest timeline that has a segment number wins; the gap check (backups.
timelines.chain_gaps) follows production's lineage, as a PITR to latest does.
"""

import hashlib
import math
import re
import time
from dataclasses import dataclass

from backups.copies import decrypt_here
from backups.crypto import Encryption
from backups.models import WalSegment
from backups.pipeline import BackupFailed
from backups.streams import FetchFailed, readable
from backups.walingest import ingest
from backups.walnames import WalError, lsn_to_int, segment_name

HISTORY_LINE = re.compile(r"^\s*(\d+)\s+([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})")


@dataclass(frozen=True)
class Lineage:
    """A timeline and its ancestors: `begins` is ((timeline, first LSN on it), ...), oldest first."""

    timeline: int
    begins: tuple
    segment_size: int

    @classmethod
    def of(cls, timeline, history_text, segment_size):
        """From the timeline's .history file (empty for timeline 1): one line per ancestor, its
        number and the LSN where the next timeline branched off it."""
        begins, begin = [], 0
        for line in history_text.splitlines():
            m = HISTORY_LINE.match(line)
            if m:
                begins.append((int(m.group(1)), begin))
                begin = lsn_to_int(m.group(2))
        begins.append((timeline, begin))
        return cls(timeline, tuple(begins), segment_size)

    @property
    def timelines(self):
        return [tli for tli, _ in self.begins]

    def timeline_of(self, segno):
        """Whose copy of segment `segno` is this lineage's: the segment holding a switch point is
        the child's (it starts with the parent's records, copied at the switch), as recovery reads."""
        for tli, begin in reversed(self.begins):
            if begin // self.segment_size <= segno:
                return tli
        return self.begins[0][0]

    def span(self, timeline):
        """[first LSN, end LSN) of `timeline` on this lineage; None when it is not on it."""
        for i, (tli, begin) in enumerate(self.begins):
            if tli == timeline:
                return begin, (self.begins[i + 1][1] if i + 1 < len(self.begins) else math.inf)
        return None

    def holds(self, timeline, start_lsn, end_lsn):
        """Whether WAL from start_lsn to end_lsn, ending on `timeline`, is on this lineage: a range
        that began before `timeline` did (a backup spanning the switch) began on its ancestor."""
        span = self.span(timeline)
        return span is not None and self.begins[0][1] <= lsn_to_int(start_lsn) and lsn_to_int(end_lsn) <= span[1]

    def __str__(self):
        return " -> ".join(str(tli) for tli in self.timelines)


def history_text(server, timeline):
    """The .history file of `timeline` from the archive ("" for timeline 1); WalError without it."""
    if timeline <= 1:
        return ""
    name = f"{timeline:08X}.history"
    history = WalSegment.objects.filter(server=server, deleted_at=None, name=name).first()
    if history is None:
        raise WalError(
            f"{server} is on timeline {timeline}, and its history file {name} is not in the archive: "
            f"wait until it is archived and ingested (manage.py checkserver {server.name}), then try again"
        )
    sink = _BytesSink()
    try:
        decrypt_here(
            readable(history.copies.select_related("location")), sink, Encryption(), f"history file {name}",
            history.sha256,
        )  # fmt: skip
    except FetchFailed as e:
        raise WalError(str(e)) from None
    return bytes(sink.data).decode(errors="replace")


class _BytesSink:
    """A small plaintext (a history file) kept in memory."""

    def open(self):
        self.data, self.sha256 = bytearray(), hashlib.sha256()

    def write(self, chunk):
        self.data += chunk
        self.sha256.update(chunk)

    def commit(self):
        pass

    def abort(self):
        self.data = bytearray()


def _rows(server, first, last):
    return WalSegment.objects.filter(server=server, deleted_at=None, segno__gte=first, segno__lte=last)


def present_segnos(server, first, last, lineage=None):
    if lineage is None:
        return set(_rows(server, first, last).values_list("segno", flat=True))
    pairs = _rows(server, first, last).values_list("segno", "timeline")
    return {segno for segno, tli in pairs if tli == lineage.timeline_of(segno)}


def missing_segments(server, first, last, lineage=None):
    """Names of the segments absent from the catalog between two segment numbers, inclusive
    (of the lineage's timelines, when one is given)."""
    if last < first:
        return []
    present = present_segnos(server, first, last, lineage)
    missing = [s for s in range(first, last + 1) if s not in present]
    if not missing:
        return []
    size = server.wal_segment_size
    names = []
    for segno in missing[:20]:
        if lineage is not None:
            names.append(segment_name(lineage.timeline_of(segno), segno, size))
            continue
        before = (
            WalSegment.objects.filter(server=server, deleted_at=None, segno__lt=segno)
            .order_by("-segno", "-timeline")
            .values_list("timeline", flat=True)
            .first()
        )
        names.append(segment_name(before or 1, segno, size))
    return names


def chain_segments(server, first, last, lineage=None):
    """The catalogued segment for each number from first to last: the lineage's, or without one,
    on the newest timeline that has it. Raises WalError naming the first missing one."""
    missing = missing_segments(server, first, last, lineage)
    if missing:
        raise WalError(f"WAL segment {missing[0]} is missing from the archive")
    rows = (
        _rows(server, first, last)
        .order_by("segno", "timeline")
        .only("id", "name", "segno", "timeline", "size", "sha256", "archived_at")
    )
    chosen = {}
    for row in rows:
        if lineage is None or row.timeline == lineage.timeline_of(row.segno):
            chosen[row.segno] = row  # ordered by timeline: without a lineage, the newest wins
    return [chosen[s] for s in range(first, last + 1)]


def last_segno(server, lineage=None):
    """The newest catalogued segment number (on the lineage's timelines, when one is given)."""
    segments = WalSegment.objects.filter(server=server, deleted_at=None, segno__isnull=False)
    if lineage is None:
        return segments.order_by("-segno").values_list("segno", flat=True).first()
    found = []
    for tli, begin in lineage.begins:
        span = lineage.span(tli)
        rows = segments.filter(timeline=tli, segno__gte=begin // lineage.segment_size)
        if span[1] != math.inf:  # the segment holding the switch point is the child's
            rows = rows.filter(segno__lt=span[1] // lineage.segment_size)
        found.append(rows.order_by("-segno").values_list("segno", flat=True).first())
    return max((s for s in found if s is not None), default=None)


def wait_for_wal(server, first, last, timeout, lineage):
    """Until every segment from first to last is catalogued on `lineage` (ingesting the spool
    meanwhile): another timeline's segment of the same number is not this WAL (a copy archiving
    into production's spool, an old primary after a failover)."""
    deadline = time.monotonic() + timeout
    while True:
        ingest(server)
        missing = missing_segments(server, first, last, lineage)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BackupFailed(
                f"WAL segment {missing[0]} was not archived within {timeout} s: "
                f"check archiving with `manage.py checkserver {server.name}`"
            )
        time.sleep(0.3)
