"""Physical base backups for PITR, and the WAL-chain runs that prove PITR can reach now.

A base backup is `pg_basebackup` in tar format (with its backup manifest inside the tar),
read here in passing for its WAL positions and its whole manifest (kept encrypted beside the
backup as the "manifest" artifact: a block-level incremental on 17+ is taken against it,
backups.incremental), compressed by `zstd -T0` on every core and
encrypted (only) by gpg into the primary location: plaintext never touches disk. The stock
recovery is `gpg --decrypt F | zstd -d | tar -x`. Runs from before zstd (`.tar.gpg`, no
"compression" in their details) are tars that gpg itself compressed: `gpg --decrypt` alone
undoes them, and restores still read them (BackupRun.base_compression).

It takes no WAL itself (-X none): it becomes consistent with the archived WAL from its start
to its end segment, and the run succeeds only once those segments are in the catalog.

The strategy's "incremental every 6 hours" on 15 and 16 is not a backup (archiving is
continuous): at 08:00, 14:00 and 20:00 a run of kind incremental switches WAL, waits until
that segment is archived, and proves the chain has no gap since the oldest kept base backup.
On 17+ it is a block-level incremental (backups.incremental).
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from backupportal import conditions
from backups import basestream, keyring, tarpipe, timelines, walchain, walhealth, walnames, walspool
from backups.binaries import client_tool
from backups.crypto import EncryptionError
from backups.logical import primary_location
from backups.models import BackupCopy, BackupRun, Server
from backups.pipeline import BackupFailed, Tool, ToolSource, Zstd, encrypt_bytes, encrypt_source, heartbeat
from backups.storage import store_for


class TarSniffer:
    """Reads a tar stream's headers as it flows past (tarpipe.forward), keeping backup_label and
    the whole backup_manifest (in memory: about 150 bytes per file of the cluster), which an
    incremental backup on 17+ needs of its parent.

    pg_basebackup writes names shorter than 100 bytes and no extended headers, so a plain
    ustar reader suffices; anything else is skipped over by its size like any member.
    """

    KEPT = ("backup_label", "backup_manifest")

    def __init__(self):
        self.current = None
        self.members = {}

    def start_member(self, h: bytes):
        """A member's 512-byte header: (its data's size, its padding's). Its data is kept when it
        is one of KEPT (self.current names it), else it may go past unseen."""
        self.current = None
        if not h.strip(b"\0"):
            return 0, 0  # the end-of-archive blocks
        name = h[0:100].split(b"\0", 1)[0].decode(errors="replace")
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0].decode(errors="replace") + "/" + name
        size_field = h[124:136]
        if size_field[0] & 0x80:  # base-256, for members of 8 GB and more
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        if name in self.KEPT:
            self.current = name
            self.members[name] = bytearray()
        return size, (-size) % 512

    def feed_member(self, data):
        """The data of the member start_member() began, when it keeps it."""
        self.members[self.current] += data

    def manifest(self) -> bytes:
        return bytes(self.members.get("backup_manifest", b""))

    def label(self) -> dict:
        text = bytes(self.members.get("backup_label", b"")).decode(errors="replace")
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    def wal_range(self):
        return Manifest(self.manifest()).wal_range()

    def manifest_checksum(self):
        return Manifest(self.manifest()).checksum()


class Manifest:
    """A backup_manifest, and what the catalog reads of it."""

    def __init__(self, data: bytes):
        self.data = bytes(data)

    def wal_ranges(self):
        m = re.search(r'"WAL-Ranges"\s*:\s*(\[.*?\])', self.data.decode(errors="replace"), re.S)
        return json.loads(m.group(1)) if m else []

    def wal_range(self):
        """(timeline, start LSN, end LSN) from the manifest's WAL-Ranges, or None. A backup that
        spans a timeline switch (a standby following a promotion) has one range per timeline, the
        final one first: its timeline and end are the first range's, its start the last's."""
        ranges = self.wal_ranges()
        if not ranges:
            return None
        return ranges[0]["Timeline"], ranges[-1]["Start-LSN"], ranges[0]["End-LSN"]

    def lineage(self, segment_size):
        """The backup's WAL as a walchain.Lineage: each range's timeline from its start on."""
        ranges = sorted(self.wal_ranges(), key=lambda r: walnames.lsn_to_int(r["Start-LSN"]))
        begins = tuple((r["Timeline"], walnames.lsn_to_int(r["Start-LSN"])) for r in ranges)
        return walchain.Lineage(begins[-1][0], begins, segment_size)

    def checksum(self):
        m = re.search(r'"Manifest-Checksum"\s*:\s*"([0-9a-f]+)"', self.data.decode(errors="replace"))
        return m.group(1) if m else ""


# libpq prints a server's notice as "SEVERITY:  message" (two spaces): pg_basebackup's own lines
# begin "pg_basebackup: ".
SERVER_SAYS = re.compile(r"^(\w+):  (.*)$")


class BaseBackupTool(Tool):
    """pg_basebackup, its tar stream read in passing for the backup's WAL positions."""

    # How the server says WARNING on pg_basebackup's connection: in English when it may be asked
    # (basestream.IN_ENGLISH); None when its own word could not be learnt.
    warning_word = "WARNING"

    def start(self):
        self.warnings = []  # the server's, as libpq prints them: "WARNING:  skipping special file ..."
        super().start()
        self.sniffer = TarSniffer()
        return self

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            said = SERVER_SAYS.match(text)
            # Not knowing the server's word for it, any of its lines counts: only warnings are sent
            # (basestream.WARNINGS_ONLY), and one not understood fails the backup (skipped_files).
            if said and self.warning_word in (said[1], None):
                self.warnings.append(said[2].strip())

    def error_line(self, server=None):
        if self.drainer is not None:
            self.drainer.join(timeout=10)  # the server's warnings come before pg_basebackup's last line
        return basestream.corrupt_pages(self.warnings) or super().error_line(server)

    def incomplete(self):
        self.drainer.join(timeout=10)  # pg_basebackup has exited: its last lines are on their way
        return basestream.skipped_files(self.warnings)

    def forward(self, sink):
        """The tar into `sink` (zstd's stdin), sniffed on the way (tarpipe.forward): the files'
        data moves from pipe to pipe in the kernel, never through Python."""
        tarpipe.forward(self.proc.stdout.fileno(), sink.fileno(), self.sniffer)


def key_for(run):
    stamp = timezone.localtime(run.created_at).strftime("%Y%m%dT%H%M%S%z")
    return f"{run.server.name}/base/{stamp}-{run.pk}.tar.zst.gpg"


def require_archiving(server, kind):
    if server.archiving == Server.Archiving.NONE:
        raise BackupFailed(
            f"{server} does not archive WAL, so a {kind} run has nothing to stand on: set up push archiving "
            f"(manage.py archivecommand {server.name}) or pull (manage.py receivewal {server.name})"
        )
    problem = (
        walhealth.archiver_failure(server)
        if server.archiving == Server.Archiving.PUSH
        else walhealth.receiver_problem(server)
    )
    if problem:
        raise BackupFailed(f"{problem}: fix archiving first (manage.py checkserver {server.name})")


def manifest_key(key):
    """Where a base (or incremental) backup's whole backup_manifest is kept, encrypted, beside it."""
    return key.removesuffix(".tar.zst.gpg") + ".backup_manifest.gpg"


def take(run):
    """The base backup of a run of kind base."""
    take_tar(run, "base backup", key_for(run))


def take_tar(run, what, key, extra_args=()):
    """The cluster compressed by zstd and encrypted by gpg under `key`, its manifest kept beside
    it, and a wait until its WAL is archived: a base backup, or (with `extra_args` for
    pg_basebackup) a block-level incremental. The server compresses when it can
    (backups.basestream); else pg_basebackup's tar goes through zstd -T0 here."""
    server = run.server
    require_archiving(server, what)
    try:
        encryption = keyring.current()
        size_of_segment = walspool.segment_size(server)
    except (EncryptionError, walnames.WalError) as e:
        raise BackupFailed(str(e)) from None
    location = primary_location()
    store = store_for(location)
    # Recorded before any byte is written, so a killed run's leftovers can be found and removed.
    run.key = key
    level = settings.BASE_ZSTD_LEVEL
    # "compression" is what restores decompress by; a run without it is a gpg-compressed tar.
    run.details.update(
        {
            "keys": [key, manifest_key(key)],
            "encryption": encryption.method,
            "key_id": encryption.custody_key,
            "compression": "zstd",
            "zstd_level": level,
        }
    )
    run.save(update_fields=["key", "details"])

    label = f"backupportal run {run.pk}"
    clock = ServerClock(server)
    source = None if extra_args else compressed_by_server(run, label, level)
    if source is None:
        source = ToolSource(pg_basebackup(server, label, extra_args), server, Zstd(level))
    try:
        size, sha256 = encrypt_source(
            store, key, source, encryption, on_tick=heartbeat(BackupRun, run.pk), timeout=settings.BACKUP_TIMEOUT
        )
    finally:
        if isinstance(source, basestream.ServerCompressed):
            source.abandon()  # also when the location failed before the stream began
    (stop_time, unsure), ended_here = clock.now(), timezone.now()
    if unsure:
        run.notes = f"{run.notes}\n{unsure}".strip()
    server_said = source.warnings if isinstance(source, basestream.ServerCompressed) else source.tool.warnings
    if left_out := basestream.left_out(server_said):
        run.notes = f"{run.notes}\n{left_out}".strip()
    BackupCopy.record_made(
        location, key, size, sha256, run=run, artifact="main", encryption_key_id=encryption.custody_key
    )
    manifest = backup_manifest(source)
    record_positions(run, manifest, size_of_segment)
    run.size, run.sha256, run.bytes_done = size, sha256, size
    run.details.update(
        {
            "stop_time": stop_time.isoformat(),
            "stop_time_portal": ended_here.isoformat(),  # the same moment on the portal's clock
            "wal_segment_size": size_of_segment,
            "manifest_checksum": manifest.checksum(),
            "label": label,
        }
    )
    # The backup is only restorable once its WAL is archived: wait for it before saying so. The
    # manifest is encrypted meanwhile (gpg's key derivation is half a second of one core).
    with keeping_manifest(run, store, location, manifest_key(key), encryption, manifest):
        walchain.wait_for_wal(
            server,
            walnames.segno_of(run.start_wal, size_of_segment),
            walnames.segno_of(run.end_wal, size_of_segment),
            settings.WAL_WAIT_SECONDS,
            manifest.lineage(size_of_segment),
        )


class ServerClock:
    """Now, by the server's clock: a PITR compares its target with the server's commit times, so
    the moment a base backup is consistent by (stop_time) is read there, not on the portal's
    clock (minutes apart, it chose a base consistent only after the target). Read after the
    stream ended: never before the backup's end.

    Read at the start as well: when the server does not answer at the end, the start's reading
    plus the time elapsed here stands in for it (off by the clocks' drift over the backup, not by
    their difference), and the run says so; the portal's own clock only when neither was read."""

    def __init__(self, server):
        self.server = server
        self.at_start, self.started = self._ask(), time.monotonic()

    def _ask(self):
        import psycopg

        try:
            with self.server.connect(connect_timeout=10) as conn:
                return conn.execute("SELECT pg_catalog.now()").fetchone()[0]
        except psycopg.Error:
            return None

    def now(self):
        """(now on the server's clock, '' or a note saying how it was had without asking it)."""
        if (asked := self._ask()) is not None:
            return asked, ""
        if self.at_start is not None:
            reckoned = self.at_start + timedelta(seconds=time.monotonic() - self.started)
            return reckoned, (
                f"{self.server} did not answer at the backup's end: its stop time is the server's clock at the "
                "backup's start plus the time the backup took"
            )
        return timezone.now(), (
            f"{self.server} did not answer at the backup's start or end: its stop time is the portal's clock, "
            "which may differ from the server's: a PITR to a target near it may choose another base backup"
        )


def compressed_by_server(run, label, level):
    """A started BASE_BACKUP that the server compresses, or None when it cannot (no zstd in
    its build, or BASE_COMPRESSION=client): the run's details say which way it went."""
    if settings.BASE_COMPRESSION != "server":
        return None
    source = basestream.ServerCompressed(run.server, label, level, settings.BASE_SERVER_WORKERS)
    beat = heartbeat(BackupRun, run.pk)
    try:
        # The fast checkpoint comes first, and may take minutes: the run's heartbeat goes on meanwhile.
        source.start(tick=lambda: beat(source), timeout=settings.BACKUP_TIMEOUT)
    except basestream.ZstdUnavailable as e:
        said = next((line for line in str(e).splitlines() if line.strip()), "refused").strip()
        run.details["compressed_by"] = f"pg_basebackup's client (the server refused to compress: {said})"
        return None
    except basestream.BaseBackupRefused as e:
        raise BackupFailed(str(e)) from None
    # The server's tar holds no backup_manifest: restores put the "manifest" artifact beside it.
    run.details.update({"compressed_by": "server", "manifest_in_tar": False})
    return source


def pg_basebackup(server, label, extra_args):
    env = server.libpq_env()
    english = basestream.speaks_english(server)
    # Warnings sent whatever the server's client_min_messages, and no NOTICE read as one.
    asked = f"{basestream.IN_ENGLISH} {basestream.WARNINGS_ONLY}" if english else basestream.WARNINGS_ONLY
    env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {asked}".strip()
    tool = BaseBackupTool(
        [
            str(client_tool(server, "pg_basebackup")),
            "--pgdata=-",
            "--format=tar",
            "--wal-method=none",
            "--checkpoint=fast",  # a spread checkpoint would hold the nightly backup for minutes
            f"--label={label}",
            "--no-password",
            *extra_args,
        ],
        env,
    )
    tool.warning_word = "WARNING" if english else basestream.word_for_warning(server)
    return tool


def backup_manifest(source):
    if isinstance(source, basestream.ServerCompressed):
        return Manifest(source.manifest)
    sniffer = source.tool.sniffer
    if not sniffer.label():
        raise BackupFailed("pg_basebackup's tar holds no backup_label: is this PostgreSQL 13 or newer?")
    return Manifest(sniffer.manifest())


@contextmanager
def keeping_manifest(run, store, location, key, encryption, manifest):
    """The whole backup_manifest, encrypted, as the run's "manifest" artifact: the next
    incremental hands it to pg_basebackup --incremental, and a restore of a backup the server
    compressed puts it beside the files (copied to every tier like the backup).

    gpg writes it on a thread while the block runs; the copy is recorded here once both are
    done. When either fails, the thread has ended before the error goes on, so that nothing is
    written after the failed run's files are removed (runner.finish_failed, by run.details' keys)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"manifest of run {run.pk}")
    written = pool.submit(encrypt_bytes, store, key, manifest.data, encryption)  # no catalog on that thread
    try:
        yield
    finally:
        pool.shutdown(wait=True)
    size, sha256 = written.result()
    BackupCopy.record_made(
        location, key, size, sha256, run=run, artifact="manifest", encryption_key_id=encryption.custody_key
    )


def record_positions(run, manifest, size_of_segment):
    wal_range = manifest.wal_range()
    if wal_range is None:
        raise BackupFailed("the backup came with no backup manifest (or one without its WAL range)")
    timeline, start_lsn, end_lsn = wal_range
    run.timeline, run.start_lsn, run.end_lsn = timeline, start_lsn, end_lsn
    run.start_wal = walnames.segment_name(timeline, walnames.segno_of_lsn(start_lsn, size_of_segment), size_of_segment)
    # The end LSN may sit exactly on a segment boundary: the segment needed is the one before it.
    run.end_wal = walnames.segment_name(
        timeline, (walnames.lsn_to_int(end_lsn) - 1) // size_of_segment, size_of_segment
    )


def wal_chain(run):
    """A run of kind incremental: switch WAL, wait for the segment, prove no gap since the oldest base."""
    import psycopg

    from backupportal.lib.pgerrors import explain

    server = run.server
    require_archiving(server, "WAL chain")
    try:
        size_of_segment = walspool.segment_size(server)
        with server.connect() as conn:
            lsn, name = conn.execute("SELECT lsn, pg_walfile_name(lsn) FROM pg_switch_wal() AS lsn").fetchone()
    except walnames.WalError as e:
        raise BackupFailed(str(e)) from None
    except psycopg.Error as e:
        raise BackupFailed(f"cannot switch WAL: {explain(e, server)}") from None
    end = walnames.segno_of(name, size_of_segment)
    if not server.runs.restorable_bases().exists():
        raise BackupFailed(
            f"{server} has no base backup yet, so archived WAL cannot be replayed: "
            f"take one with manage.py backup {server.name} --kind base"
        )
    timeline = walnames.timeline_of(name)
    alone = walchain.Lineage(timeline, ((timeline, 0),), size_of_segment)
    walchain.wait_for_wal(server, end, end, settings.WAL_WAIT_SECONDS, alone)
    try:  # the chain is production's WAL: its timeline's history, not another timeline's segments
        lineage = walchain.Lineage.of(timeline, walchain.history_text(server, timeline), size_of_segment)
    except walnames.WalError as e:
        raise BackupFailed(str(e)) from None
    base = oldest_base_on(server, lineage, size_of_segment)
    if base is None:
        raise BackupFailed(
            f"{server} has no base backup on the timelines it is on ({lineage}), so PITR to now has nowhere "
            f"to start: take one with manage.py backup {server.name} --kind base"
        )
    first = walnames.segno_of(base.start_wal, size_of_segment)
    gaps = walchain.missing_segments(server, first, end, lineage)
    if gaps:
        message = (
            f"WAL gap in the archive of {server}: {walhealth.missing_file(gaps[0])} is missing; PITR cannot cross it"
        )
        conditions.changed("wal_gap", server=server)  # the failed run is recorded too (backup_failed)
        raise BackupFailed(message)
    conditions.changed("wal_gap", server=server)
    previous = (
        server.runs.good().filter(kind=BackupRun.Kind.INCREMENTAL).exclude(end_wal="").order_by("-finished_at").first()
    )
    start = first
    if previous is not None and walnames.segno_of(previous.end_wal, size_of_segment) < end:
        start = max(first, walnames.segno_of(previous.end_wal, size_of_segment) + 1)
    segments = walchain.chain_segments(server, start, end, lineage)
    run.timeline = timeline
    run.start_wal, run.end_wal, run.end_lsn = segments[0].name, name, str(lsn)
    run.size = sum(s.size for s in segments)
    run.details.update(
        {
            "segments": len(segments),
            "chain_from": base.start_wal,
            "chain_base_run": base.pk,
            "chain_segments": end - first + 1,
        }
    )


def oldest_base_on(server, lineage, size_of_segment):
    """The kept base backup a PITR along `lineage` can start from with the most WAL after it.
    By segment number, not by name: after a failover a name's timeline comes first, and the old
    primary's base on the branch it left, past the switch point, sorted before the new timeline's."""
    bases = [b for b in server.runs.restorable_bases() if timelines.on_lineage(lineage, b)]
    return min(bases, key=lambda b: walnames.segno_of(b.start_wal, size_of_segment), default=None)
