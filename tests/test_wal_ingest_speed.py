"""WAL ingest throughput, measured on demand (skipped unless asked for): N copies of a real WAL
segment in the spool, one ingest pass timed, its CPU (this process and its zstd and gpg) counted.

    WAL_INGEST_SEGMENT=/path/to/a/16MB/segment WAL_INGEST_N=48 \
        .venv/bin/python -m pytest tests/test_wal_ingest_speed.py -q -s -p no:cacheprovider
"""

import os
import resource
import shutil
import time
from pathlib import Path

import pytest

from backups import walingest
from backups.walspool import spool_dir

pytest_plugins = ["tests.walfixtures"]
SEGMENT = os.environ.get("WAL_INGEST_SEGMENT")
N = int(os.environ.get("WAL_INGEST_N", "48"))


def cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def fill_spool(server, log):
    """As the archive program leaves them: on the disk, not in the page cache (it writes O_DIRECT)."""
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True)
    for i in range(N):
        path = spool / f"00000001{log:08X}{i:08X}"
        shutil.copy(SEGMENT, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.mark.skipif(not SEGMENT, reason="a measurement: set WAL_INGEST_SEGMENT to a real WAL segment")
def test_wal_ingest_throughput(server, passphrase_file, backup_root, wal_spool):
    server.wal_segment_size = Path(SEGMENT).stat().st_size
    server.save(update_fields=["wal_segment_size"])
    fill_spool(server, 1)
    walingest.ingest(server)  # warms up: the WAL key is made (or unwrapped) once per passphrase
    fill_spool(server, 2)
    cpu, started = cpu_seconds(), time.monotonic()
    ingested = walingest.ingest(server).ingested
    wall = time.monotonic() - started
    print(
        f"\ningest: {len(ingested)} segments in {wall:.2f} s = {len(ingested) / wall:.1f} segments/s; "
        f"{(cpu_seconds() - cpu) / N:.3f} s of CPU per segment; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    assert len(ingested) == N
