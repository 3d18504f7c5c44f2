"""What a point-in-time recovery is asked for and how it will run: its target, its plan, and the
two ways it stops (refused before anything is written, or failed with everything removed).

Kept apart from restores/pitr.py so that the modules it uses (pitr_reach, pitr_verdict) share
these without importing the restore itself.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from backups import walnames
from backups.crypto import Encryption
from backups.models import BackupRun, Server

# Inside the WAL staging directory (pitr_staging), closed to the database OS user: segments
# decrypted and not yet checked (pitr_checks.tablespace_creations) wait here; only a checked one
# is linked into the staging directory, where restore_wal.py hands it to recovery.
UNCHECKED = "unchecked"


class Refused(Exception):
    """Refused before anything was written: the message says why and what to do."""


class RestoreFailed(Exception):
    """The restore started and failed; everything it wrote is removed."""


@dataclass
class Target:
    kind: str  # time, latest, lsn or name
    value: object = None
    text: str = ""


@dataclass
class Plan:
    server: Server
    target: Target
    datadir: Path
    port: int
    base: BackupRun
    bases: list
    segment_size: int
    last: int  # the last segment number known to be needed
    search_end: int | None = None  # a restore point's search: where the chain from the newest base ends
    created_dir: bool = False
    owner: dict = field(default_factory=dict)  # mode, uid, gid of a directory it did not make
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # before start (pitr_libraries); quieten() adds its own
    staged: dict = field(default_factory=dict)  # segno -> segment name, staged or to be (prefetch)
    fallback: bool = True  # an unreadable base backup may be replaced by an older one
    recovered: dict = field(default_factory=dict)
    encryption: Encryption | None = None  # one per restore (encryption_of)
    # What the restore is waiting for, as it happens: the restore command writes it on stderr.
    report: Callable[[str], None] = lambda line: None
    # A time target: the first archived commit after it (recovery stops right before it) ...
    after_lsn: str = ""
    after_time: datetime | None = None
    use_partial: bool = False  # ... found in the segment pg_receivewal is still receiving
    # ... or none yet: the source is asked for one (pitr_reach.archive_past_target).
    switch: bool = False
    reach: str = ""  # how far the archived WAL reaches, for the messages when that is too short
    prefetch: object = None  # pitr_prefetch.Prefetch while the WAL is fetched ahead of replay
    # segno: (name, LSN, why) of each archived segment whose WAL cannot be read to its end.
    damaged: dict = field(default_factory=dict)
    # Block incrementals on top of `base`, oldest first, combined with it (pitr_chain); [] for none.
    links: list = field(default_factory=list)
    # Where the chain is extracted and combined, beside the data directory (pitr_chain.combine):
    # named, and recorded in the run's `left`, before it is made.
    chain: Path | None = None
    # The base's files as its extraction wrote them, path: (size, CRC-32C) (pitr_extract.verify_base).
    extracted: dict | None = None
    # The timeline production is on, whose history recovery follows (recovery_target_timeline),
    # and its walchain.Lineage: which timeline's copy of each segment is production's.
    timeline: int | None = None
    lineage: object = None
    # The WAL staging directory, outside the data directory (pitr_staging.staging_for the run).
    staging: Path | None = None
    wal_read: int = 0  # bytes of WAL the prefetcher decrypted (pitr_prefetch), for the run's bytes restored

    @property
    def newest(self):
        """The backup WAL is replayed from: the chain's newest link, or the base backup."""
        return self.links[-1] if self.links else self.base

    @property
    def unchecked(self):
        return self.staging / UNCHECKED

    def segno(self, name):
        return walnames.segno_of(name, self.segment_size)


def encryption_of(plan: Plan) -> Encryption:
    # One per restore, so that a changed passphrase file is read again; it serves every thread.
    if plan.encryption is None:
        plan.encryption = Encryption()
    return plan.encryption
