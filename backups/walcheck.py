"""What a WAL segment in the spool must be before the ingest catalogues it: the right size, and
written by the server's own cluster at the place its name says. Anything else stays in the spool
(with the WAL after it) and the ingest fails, saying what to do: catalogued, it would look good
until a PITR needed it."""

import os
import struct
from pathlib import Path

from backups import archive_wal
from backups.walnames import SEGMENT, WalError, segno_of
from backups.walspool import open_wal_file


def check_segment_size(server, path: Path, size):
    """A full segment must be wal_segment_size long: a shorter one is truncated, and catalogued
    it would look good until a PITR needed it. It stays in the spool (and the WAL after it)."""
    if not SEGMENT.match(path.name):
        return
    expected = server.wal_segment_size
    if expected == size or (not expected and archive_wal.plausible_segment_size(size)):
        return  # an unknown size is learned from the first plausible segment (learn_segment_size)
    what = f"the {expected} bytes of {server}'s segments" if expected else "a power of two from 1 MiB to 1 GiB"
    raise WalError(
        f"WAL segment {path.name} is {size} bytes, not {what}: it is truncated or not a segment; "
        f"replace {path} with the whole segment from pg_wal on {server} (if it is gone, remove it and take a "
        "base backup: PITR cannot cross it); nothing after it is ingested until then"
    )


# The long header a segment begins with (access/xlog_internal.h: XLogLongPageHeaderData, in the
# host's byte order): xlp_magic, xlp_info, xlp_tli, xlp_pageaddr, xlp_rem_len, padding,
# xlp_sysid, xlp_seg_size, xlp_xlog_blcksz. XLP_LONG_HEADER marks it.
LONG_HEADER = struct.Struct("=HHIQI4xQII")
XLP_LONG_HEADER = 0x0002


def check_segment_header(server, path: Path, sysid):
    """A segment whose header names another cluster (another server's archive_command pointed at
    this spool) or another place in the WAL (a file under the wrong name): catalogued, a PITR would
    replay it as this server's. It stays in the spool, with the WAL after it, and the ingest says
    whose it is. A zeroed first page is refused too; another that is no long header is not judged
    here (a restore replays it)."""
    if not SEGMENT.match(path.name):
        return
    fd, _ = open_wal_file(path, server.wal_segment_size)
    try:
        head = os.pread(fd, LONG_HEADER.size, 0)
    finally:
        os.close(fd)
    where = f"{path.name} and the WAL after it wait in {path.parent}: nothing after it is ingested until then"
    if head == bytes(LONG_HEADER.size):  # PostgreSQL begins every segment it archives with a header
        raise WalError(
            f"WAL segment {path.name} begins with zeros where its header should be: it is damaged (zeroed); "
            f"replace {path} with the segment from pg_wal on {server} (if it is gone, remove it and take a base "
            f"backup: PITR cannot cross it). {where}"
        )
    if len(head) < LONG_HEADER.size:
        return
    _, info, _, pageaddr, _, written_by, seg_size, _ = LONG_HEADER.unpack(head)
    if not info & XLP_LONG_HEADER or seg_size != server.wal_segment_size:
        return
    if sysid and str(written_by) != sysid:
        raise WalError(
            f"WAL segment {path.name} was written by the cluster with system identifier {written_by}, not by "
            f"{server}'s ({sysid}, as its backups recorded): another cluster's archive_command writes into "
            f"{server}'s spool; point it elsewhere and remove {path}. {where}"
        )
    if pageaddr != segno_of(path.name, seg_size) * seg_size:
        raise WalError(
            f"WAL segment {path.name} holds the WAL of segment {pageaddr // seg_size:X} (its header's address "
            f"{pageaddr >> 32:X}/{pageaddr & 0xFFFFFFFF:X}): it was copied under another name; replace {path} "
            f"with the segment of its own name from pg_wal on {server}. {where}"
        )
