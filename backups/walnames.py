"""WAL file names and LSN arithmetic: segment names and numbers, timelines, where a file is kept.

Segment names depend on wal_segment_size, which is read from each server (never assumed):
the functions here take it as an argument (backups.walspool.segment_size reads it).
"""

import re

SEGMENT = re.compile(r"^[0-9A-F]{24}$")
WAL_FILE = re.compile(r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$")


class WalError(Exception):
    """A WAL operation cannot go on; the message names the segment and what to do."""


def lsn_to_int(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def segments_per_id(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segno_of(name: str, segment_size: int) -> int:
    return int(name[8:16], 16) * segments_per_id(segment_size) + int(name[16:24], 16)


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = segments_per_id(segment_size)
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def segno_of_lsn(lsn, segment_size: int) -> int:
    return (lsn_to_int(lsn) if isinstance(lsn, str) else lsn) // segment_size


def timeline_of(name: str) -> int:
    return int(name[:8], 16)


def wal_key(server, name):
    """Where a WAL file lives in every location: one directory per 4 GB of WAL."""
    folder = name[:16] if len(name) >= 24 else name[:8]
    return f"{server.name}/wal/{folder}/{name}.gpg"
