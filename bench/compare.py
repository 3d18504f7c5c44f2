"""The comparisons: each method run in rounds (interleaved, so noise hits all alike), on one database.

Every function returns rows for the report: {"method", "times", "tree_rss", "own_rss",
"artifact", "note"}; `Rows.add` collects a Sample per round.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from backupportal.lib.osuser import as_db_user, chown_to_db_user, free_port
from backupportal.lib.pgcluster import stop_left_running
from backupportal.lib.pgdatadir import pg_bin
from backups import walnames

from .measure import CommandFailed, Sample, Stopwatch, dir_size, run, shell
from .setup import S2K, wait_until


class Rows:
    def __init__(self):
        self.rows = {}

    def add(self, method, sample, artifact=None, note=""):
        row = self.rows.setdefault(
            method, {"method": method, "times": [], "tree_rss": [], "own_rss": [], "artifact": None, "note": note}
        )
        row["times"].append(sample.seconds)
        row["tree_rss"].append(sample.tree_rss)
        row["own_rss"].append(sample.own_hwm)
        if sample.cpu is not None and sample.seconds > 0:
            row.setdefault("cores", []).append(sample.cpu / sample.seconds)
        if artifact is not None:
            row["artifact"] = artifact
        row.update(sample.extra)
        return row

    def set(self, method, key, value):
        if method in self.rows:
            self.rows[method][key] = value

    def fail(self, method, error):
        self.rows.setdefault(method, {"method": method, "times": [], "tree_rss": [], "own_rss": [], "artifact": None})
        self.rows[method]["note"] = f"failed: {error}"[:300]

    def list(self):
        return list(self.rows.values())


def pg(cluster, tool):
    return f"{pg_bin() / tool} -h {cluster.host} -p {cluster.port} -U postgres"


def pg_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def portal_run(portal, *args, env=None):
    """A portal command measured (`env`: settings of its own); its --json result in sample.extra['result']."""
    sample = run(portal.argv(*args, "--json"), env=portal.env | (env or {}), cwd=portal.env["PYTHONPATH"])
    result = json.loads(sample.stdout.strip().splitlines()[-1])
    if result.get("status") not in ("succeeded", None):
        raise CommandFailed(f"portal {args[0]}: {result.get('status')} {result.get('error', '')}")
    return sample, result


# Entry points that only wrap the work: left out of the profile lists.
WRAPPERS = ("manage.py", "backupportal/lib/commands.py", "/__init__.py")


def profile(portal, *args, top=10):
    """One extra, untimed run of a portal command under cProfile: where its wall time goes.

    py-spy is not installed here; cProfile sees the main thread, which waits on the
    subprocesses (pg_dump, gpg, pg_restore, pg_ctl) and on the WAL staging pool, so the
    cumulative times of the portal's own functions read as a breakdown per pipeline stage.
    """
    import pstats
    import tempfile

    out = Path(tempfile.mkstemp(prefix="bench-profile-", suffix=".prof")[1])
    try:
        argv = portal.argv(*args, "--json")
        run([argv[0], "-m", "cProfile", "-o", str(out), *argv[1:]], env=portal.env, cwd=portal.env["PYTHONPATH"])
        stats = pstats.Stats(str(out)).stats
    except (CommandFailed, OSError) as e:
        return [("profile failed", str(e)[:200])]
    finally:
        out.unlink(missing_ok=True)
    root = portal.env["PYTHONPATH"]
    ours = [
        (f"{Path(file).relative_to(root)}:{func}", ct)
        for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items()
        if file.startswith(root) and "/.venv/" not in file and not file.endswith(WRAPPERS) and func != "<module>"
    ]
    return sorted(ours, key=lambda x: -x[1])[:top]


# The clusters that archive their WAL (the portal's command, then pgBackRest's archive-push, one
# segment at a time): a restore into one writes a gigabyte of WAL, whose archiving goes on for
# seconds after it ends. run.py names them.
ARCHIVING = []
SETTLE_SECONDS = 300  # at most, for the archiving to catch up; then the method fails, untimed


def settle():
    """Before each measured method: the WAL the method before it wrote archived, its dirty buffers
    written (CHECKPOINT) and the disk flushed (sync). Otherwise a method shares the cores with the
    archiving, and pays the write-back, of the gigabyte the one before it restored."""
    deadline = time.monotonic() + SETTLE_SECONDS
    for cluster in ARCHIVING:
        if not cluster.is_running():
            continue
        while ready_count(cluster):
            if time.monotonic() > deadline:
                raise CommandFailed(
                    f"{cluster}'s archiver still had {ready_count(cluster)} segments to archive after"
                    f" {SETTLE_SECONDS} s: the method was not timed on a settled machine"
                )
            time.sleep(0.2)
        cluster.execute("CHECKPOINT")
    os.sync()


def attempt(rows, method, fn, *args):
    """One measured round of one method, on a settled machine; a failure becomes a note on the
    row, never a number."""
    try:
        settle()
        fn(*args)
    except (CommandFailed, RuntimeError, OSError, psycopg.Error) as e:
        rows.fail(method, e)


def in_turn(rows, round_no, attempts):
    """One round of every method, (method, fn, *args) each, starting one further along each round:
    no method is always the first after the previous round (a checkpoint, the drop of a database
    just restored, the page cache of another method's files)."""
    shift = round_no % len(attempts)
    for method, fn, *args in attempts[shift:] + attempts[:shift]:
        attempt(rows, method, fn, *args)


# ---------------------------------------------------------------------------- 1. logical


STRATEGY = "the strategy's pipeline (pg_dump -Fc -b to a file, gpg --symmetric AES256 --compress-algo 1, rm)"
PLAIN = "plain pg_dump -Fc (default compression, no encryption)"
PORTAL_LOGICAL = "**portal** backup --kind logical (pg_dump -Z1 piped to gpg, catalogued)"
STAGE_DUMP = "stage: pg_dump -Fc -Z1 to a file (the portal's dump alone)"


def logical(ws, portal, cluster, server, dbname, rounds, stages=True):
    rows = Rows()
    files = ws.root / "files"
    gpg_home = ws.root / "gnupg"
    for round_no in range(rounds):

        def portal_backup():
            sample, result = portal_run(portal, "backup", server, "--kind", "logical")
            rows.add(PORTAL_LOGICAL, sample, artifact=result["size"])
            rows.rows[PORTAL_LOGICAL]["run_id"] = result["id"]

        def strategy():
            f = files / "strategy.dump"
            sample = shell(
                f"{pg(cluster, 'pg_dump')} -Fc -b -f {f} {dbname}\n"
                f"gpg --homedir {gpg_home} --batch --yes --pinentry-mode loopback --passphrase-file {ws.passphrase}"
                f" --cipher-algo AES256 --compress-algo 1 {S2K} --output {f}.gpg --symmetric {f}\n"
                f"rm {f}\n",
                env=pg_env(),
            )
            rows.add(STRATEGY, sample, artifact=os.path.getsize(f"{f}.gpg"))
            os.unlink(f"{f}.gpg")

        def plain():
            f = files / "plain.dump"
            sample = shell(f"{pg(cluster, 'pg_dump')} -Fc -f {f} {dbname}", env=pg_env())
            rows.add(PLAIN, sample, artifact=f.stat().st_size)
            f.unlink()

        def stage():
            f = files / "z1.dump"
            sample = shell(f"{pg(cluster, 'pg_dump')} -Fc -Z1 -f {f} {dbname}", env=pg_env())
            rows.add(STAGE_DUMP, sample, artifact=f.stat().st_size)
            f.unlink()

        methods = [(PORTAL_LOGICAL, portal_backup), (STRATEGY, strategy), (PLAIN, plain)]
        in_turn(rows, round_no, methods + ([(STAGE_DUMP, stage)] if stages else []))
    if stages:
        rows.set(PORTAL_LOGICAL, "profile", profile(portal, "backup", server, "--kind", "logical"))
    return rows.list()


BOOT = (
    "stage: manage.py backup --help (Python and Django start, as every portal command pays it;"
    " not Django's system checks, which the commands skip)"
)


def django_boot(portal, rounds):
    """The fixed cost every portal command pays: Python and Django starting."""
    rows = Rows()
    for _ in range(rounds):
        attempt(rows, BOOT, lambda: rows.add(BOOT, run(portal.argv("backup", "--help"), env=portal.env)))
    return rows.list()


# ---------------------------------------------------------------------------- 2. physical


PORTAL_BASE = "**portal** backup --kind base (BASE_BACKUP, the server's zstd with 2 workers, read by the portal -> gpg encrypting only)"
PORTAL_BASE_CLIENT = "portal, BASE_COMPRESSION=client (pg_basebackup tar -> zstd -T0 -> gpg encrypting only)"
STAGE_SERVER_GPG = (
    "stage: pg_basebackup --no-manifest -Ft -D - --compress=server-zstd:level=1,workers=2, piped into gpg encrypting only"
    " (the portal's compression and encryption, no Python, no catalog)"
)
# The fastest compression the server offers (bench/base_compression.py): whether any server-side
# compression into gpg could meet the bound, not only the one the portal uses.
STAGE_SERVER_LZ4_GPG = (
    "stage: pg_basebackup --no-manifest -Ft -D - --compress=server-lz4:1, piped into gpg encrypting only (the"
    " fastest compression the server offers, which the portal does not use; no Python, no catalog)"
)
BB_GZIP = "pg_basebackup -Ft -z (client gzip, no encryption)"
BB_ZSTD = "pg_basebackup -Ft --compress=server-zstd:workers=2 (no encryption)"
BR_LZ4 = "pgBackRest full, process-max 2, lz4, aes-256-cbc"
BR_ZSTD = "pgBackRest full, process-max 2, zstd, aes-256-cbc"
STAGE_BB = "stage: pg_basebackup -Ft -X none to /dev/null (the portal's read alone)"


def physical(ws, portal, cluster, pgbr, server, rounds):
    rows = Rows()
    out = ws.root / "files" / "basebackup"
    for round_no in range(rounds):

        def portal_base():
            # What the worker's every-minute ingestwal schedule keeps done: this bench runs no worker,
            # so WAL written meanwhile waits in the spool and would be ingested inside the timed backup.
            portal.manage("ingestwal", server)
            sample, result = portal_run(portal, "backup", server, "--kind", "base")
            rows.add(PORTAL_BASE, sample, artifact=result["size"])

        def basebackup(method, compress):
            shutil.rmtree(out, ignore_errors=True)
            sample = shell(f"{pg(cluster, 'pg_basebackup')} -D {out} -Ft {compress} -c fast", env=pg_env())
            rows.add(method, sample, artifact=dir_size(out))
            shutil.rmtree(out, ignore_errors=True)

        def pgbackrest(method, kind):
            sample = run(pgbr.argv(server, "--type=full", f"--compress-type={kind}", "backup"), cwd="/")
            rows.add(method, sample, artifact=pgbr.last_backup_size(server))

        def portal_client():
            portal.manage("ingestwal", server)
            sample, result = portal_run(portal, "backup", server, "--kind", "base", env={"BASE_COMPRESSION": "client"})
            rows.add(PORTAL_BASE_CLIENT, sample, artifact=result["size"])

        def server_gpg(method, compress):
            # -X none: pg_basebackup waits for the backup's last segment to be archived, as the
            # portal waits for it in its catalog (walchain.wait_for_wal).
            encrypted = ws.root / "files" / "server-compressed.tar.gpg"
            sample = shell(
                f"{pg(cluster, 'pg_basebackup')} -D - -Ft -X none -c fast --no-manifest"
                f" {compress} | gpg --homedir {ws.root / 'gnupg'} --batch --yes"
                f" --pinentry-mode loopback --passphrase-file {ws.passphrase} --symmetric --cipher-algo AES256"
                f" --compress-algo none {S2K} --output {encrypted}",
                env=pg_env(),
            )
            rows.add(method, sample, artifact=os.path.getsize(encrypted))
            os.unlink(encrypted)

        def read_floor():
            sample = shell(f"{pg(cluster, 'pg_basebackup')} -D - -Ft -X none -c fast > /dev/null", env=pg_env())
            rows.add(STAGE_BB, sample)

        in_turn(
            rows,
            round_no,
            [
                (PORTAL_BASE, portal_base),
                (BB_GZIP, basebackup, BB_GZIP, "-z"),
                (BB_ZSTD, basebackup, BB_ZSTD, "--compress=server-zstd:workers=2"),
                (BR_LZ4, pgbackrest, BR_LZ4, "lz4"),
                (BR_ZSTD, pgbackrest, BR_ZSTD, "zst"),
                (STAGE_BB, read_floor),
                (PORTAL_BASE_CLIENT, portal_client),
                (STAGE_SERVER_GPG, server_gpg, STAGE_SERVER_GPG, "--compress=server-zstd:level=1,workers=2"),
                (STAGE_SERVER_LZ4_GPG, server_gpg, STAGE_SERVER_LZ4_GPG, "--compress=server-lz4:1"),
            ],
        )
    portal.manage("ingestwal", server)  # as before each timed run
    rows.set(PORTAL_BASE, "profile", profile(portal, "backup", server, "--kind", "base"))
    return rows.list()


# ---------------------------------------------------------------------------- 3. restore


PORTAL_RESTORE = "**portal** restore RUN --into-database (rows by COPY as gpg decrypts, then pg_restore -j 2)"
PORTAL_RESTORE_WORKER = (
    "**portal**, run by the worker already running (as an approved request's task: run_logical in a process"
    " that is up; bench/resident.py), the queue's hand-over not counted"
)
PG_RESTORE_1 = "pg_restore, one job, of the strategy's (decrypted) file"
PG_RESTORE_2 = "pg_restore -j 2 of the strategy's (decrypted) file"
STRATEGY_RESTORE = "the strategy's restore (gpg --decrypt to a file, pg_restore, rm)"
DECRYPT_JOBS_2 = "the strategy's file as stored: gpg --decrypt to a file, createdb, pg_restore -j 2, rm"
STAGE_OVERLAP = (
    "stage: the ideal overlap: pg_restore -j 2 of the portal's dump, decrypted beforehand, while the portal's"
    " decryption of its copy runs beside it (gpg -d into a scratch file, the copy's sha256), neither waiting"
)
STAGE_DECRYPT = (
    "stage: the portal's decryption of its copy alone (gpg -d into a scratch file, the copy's sha256 beside it),"
    " nothing else running: the CPU a restore that decrypts adds to pg_restore's"
)
# The portal takes the copy's sha256 with OpenSSL through hashlib, as this does (sha256sum is
# several times slower here).
SHA256 = "import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n    while b := f.read(1 << 20):\n        h.update(b)"


def drop(cluster, dbname):
    cluster.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def logical_restore(ws, portal, cluster, run_id, dbname, rounds):
    rows = Rows()
    files, gpg_home = ws.root / "files", ws.root / "gnupg"
    own = own_plain(ws, portal, run_id, files / "portal-restore.dump")
    plain = files / "strategy-restore.dump"
    subprocess.run([*pg(cluster, "pg_dump").split(), "-Fc", "-b", "-f", str(plain), dbname], check=True, env=pg_env())
    enc = Path(f"{plain}.gpg")
    subprocess.run(
        ["gpg", "--homedir", str(gpg_home), "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase-file"]
        + [str(ws.passphrase), "--cipher-algo", "AES256", "--compress-algo", "1", *S2K.split()]
        + ["--output", str(enc), "--symmetric", str(plain)],
        check=True,
    )
    for i in range(rounds):

        def portal_restore(i):
            target = f"r_portal_{i}"
            sample, _ = portal_run(portal, "restore", str(run_id), "--into-database", target)
            rows.add(PORTAL_RESTORE, sample)
            drop(cluster, target)

        def worker_restore(i):
            target = f"r_worker_{i}"
            rows.add(PORTAL_RESTORE_WORKER, portal.resident().call(call="restore", run=run_id, into=target))
            drop(cluster, target)

        def pg_restore(method, jobs, i):
            target = f"r_pgr{jobs}_{i}"
            cluster.create_database(target)
            sample = shell(f"{pg(cluster, 'pg_restore')} -j {jobs} -d {target} {plain}", env=pg_env())
            rows.add(method, sample)
            drop(cluster, target)

        def strategy(i, method=STRATEGY_RESTORE, jobs=1):
            target = f"r_strategy{jobs}_{i}"
            dec = files / "backup_decrypted.dump"
            sample = shell(
                f"gpg --homedir {gpg_home} --batch --yes --pinentry-mode loopback --passphrase-file {ws.passphrase}"
                f" --decrypt {enc} > {dec} 2>/dev/null\n"
                f"{pg(cluster, 'createdb')} {target}\n"
                f"{pg(cluster, 'pg_restore')} -j {jobs} -d {target} {dec}\n"
                f"rm {dec}\n",
                env=pg_env(),
            )
            rows.add(method, sample)
            drop(cluster, target)

        def ideal_overlap(i, copy=own[0] if own else None, dump=own[1] if own else None):
            """The best a restore that decrypts its copy can hope for: here the load never waits for
            the decryption, where a real one loads only what its decryption has written. Both read the
            portal's own dump (-Z1): the load its plaintext, decrypted beforehand; gpg its copy."""
            if copy is None:
                raise CommandFailed(f"no copy of run #{run_id} under BACKUP_ROOT to decrypt")
            target, scratch = f"r_overlap_{i}", files / "overlap.dump"
            cluster.create_database(target)
            try:
                sample = shell(
                    decrypt_script(gpg_home, ws.passphrase, copy, scratch)
                    + f"{pg(cluster, 'pg_restore')} -j 2 -d {target} {dump}\n"
                    "wait $decrypting\nwait $hashing\n",
                    env=pg_env(),
                )
                rows.add(STAGE_OVERLAP, sample)
            finally:
                drop(cluster, target)

        def decrypt_alone(i, copy=own[0] if own else None):
            """The decryption's own CPU (the whole machine's, as every row's): what the two cores
            must find beside pg_restore's for a restore that decrypts to keep up with it."""
            if copy is None:
                raise CommandFailed(f"no copy of run #{run_id} under BACKUP_ROOT to decrypt")
            scratch = files / "decrypt-alone.dump"
            try:
                rows.add(
                    STAGE_DECRYPT,
                    shell(decrypt_script(gpg_home, ws.passphrase, copy, scratch) + "wait $decrypting\nwait $hashing\n"),
                )
                rows.set(STAGE_DECRYPT, "machine_cores", os.cpu_count())
            finally:
                scratch.unlink(missing_ok=True)

        in_turn(
            rows,
            i,
            [
                (PORTAL_RESTORE, portal_restore, i),
                (PORTAL_RESTORE_WORKER, worker_restore, i),
                (PG_RESTORE_1, pg_restore, PG_RESTORE_1, 1, i),
                (PG_RESTORE_2, pg_restore, PG_RESTORE_2, 2, i),
                (STRATEGY_RESTORE, strategy, i),
                (DECRYPT_JOBS_2, strategy, i, DECRYPT_JOBS_2, 2),
                (STAGE_OVERLAP, ideal_overlap, i),
                (STAGE_DECRYPT, decrypt_alone, i),
            ],
        )
    rows.set(PORTAL_RESTORE, "profile", profile(portal, "restore", str(run_id), "--into-database", "r_profile"))
    drop(cluster, "r_profile")
    plain.unlink()
    enc.unlink()
    if own:
        own[1].unlink()
    return rows.list()


def decrypt_script(gpg_home, passphrase, copy, scratch):
    """Shell lines that start the portal's decryption of `copy` (gpg -d into `scratch`, the copy's
    sha256 beside it) in the background, as $decrypting and $hashing, removed on exit."""
    return (
        f"{' '.join(StockRecovery.gpg_argv(gpg_home, passphrase))} --yes --decrypt {copy} > {scratch} & decrypting=$!\n"
        f"{sys.executable} -c {shlex.quote(SHA256)} {copy} & hashing=$!\n"
        f"trap 'kill $decrypting $hashing 2>/dev/null || true; rm -f {scratch}' EXIT\n"
    )


def own_plain(ws, portal, run_id, plain):
    """(the portal's copy of run_id, its plaintext decrypted into `plain`), untimed; None when the
    copy is not where the portal writes it (the stage row then says so)."""
    copy = next(Path(portal.env["BACKUP_ROOT"]).glob(f"*/logical/*-{run_id}.dump.gpg"), None)
    if copy is None:
        return None
    gpg = StockRecovery.gpg_argv(ws.root / "gnupg", ws.passphrase)
    subprocess.run([*gpg, "--yes", "--output", str(plain), "--decrypt", str(copy)], check=True)
    return copy, plain


PORTAL_PITR = "**portal** restore --target latest --into-datadir (fetch, verify, extract, replay)"
PORTAL_PITR_WORKER = (
    "**portal**, run by the worker already running (as an approved sandbox request's task: make_plan and run_plan"
    " in a process that is up; bench/resident.py), the queue's hand-over not counted"
)
BR_RESTORE = "pgBackRest restore (type default: end of archive), then start and replay"
STAGE_STOCK_PITR = (
    "stage: the README's stock recovery of the portal's newest base backup, in the shell (gpg, zstd -d and tar;"
    " the manifest; the base's own WAL by the documented restore_command line; pg_verifybackup; then start and"
    " replay through that line): the portal's formats with no Python and no catalog"
)


def wal_names(start_lsn, end_lsn, timeline, segment_mb=16):
    """The WAL segment names from the one holding start_lsn to the one holding end_lsn."""
    size = segment_mb << 20
    # The end is the byte after the last record: on a segment's first byte, the segment before.
    first, last = walnames.segno_of_lsn(start_lsn, size), walnames.segno_of_lsn(walnames.lsn_to_int(end_lsn) - 1, size)
    return [walnames.segment_name(timeline, n, size) for n in range(first, last + 1)]


class StockRecovery:
    """What the README's stock recovery starts from, made once and not timed: a copy of the
    server's WAL folder readable by the postgres user (the README's ARCHIVE), its WAL key
    unwrapped (WALKEY) and an empty gpg home (GPGHOME); the newest base backup's files."""

    def __init__(self, ws, portal, server, segment_bytes):
        self.ws, self.gpg_home = ws, ws.root / "gnupg"
        base = sorted((Path(portal.env["BACKUP_ROOT"]) / server / "base").glob("*.tar.zst.gpg"))[-1]
        self.tar, self.manifest = base, base.with_name(base.name.replace(".tar.zst.gpg", ".backup_manifest.gpg"))
        self.root = ws.root / "stock"
        self.root.mkdir(mode=0o755)
        self.archive, self.home, self.walkey = self.root / "archive", self.root / "gpghome", self.root / "walkey"
        self.wal = Path(portal.env["WAL_ROOT"]) / server / "wal"
        self.refresh()
        self.home.mkdir(mode=0o700)
        # The key of the newest base backup's WAL: the one written last (a passphrase changed
        # since makes a new one).
        key = max((self.archive / "keys").glob("*.key.gpg"), key=lambda k: k.stat().st_mtime)
        self.gpg("--output", str(self.walkey), "--decrypt", str(key))
        for path in (self.home, self.walkey):
            subprocess.run(["chown", "-R", "postgres", str(path)], check=True)
        plain = json.loads(self.gpg("--decrypt", str(self.manifest)))
        ranges = plain["WAL-Ranges"]
        self.base_wal = wal_names(
            ranges[0]["Start-LSN"], ranges[-1]["End-LSN"], ranges[0]["Timeline"], segment_bytes >> 20
        )

    def refresh(self):
        """ARCHIVE up to date with the WAL the portal archived since (new files only), on disk
        before the timed run starts."""

        def copy_new(source, target):
            if not os.path.exists(target):
                shutil.copy2(source, target)
                shutil.chown(target, "postgres")

        shutil.copytree(self.wal, self.archive, dirs_exist_ok=True, copy_function=copy_new)
        folders = [self.archive, *(d for d in self.archive.rglob("*") if d.is_dir())]
        subprocess.run(["chown", "postgres", *map(str, folders)], check=True)
        os.sync()

    @staticmethod
    def gpg_argv(home, passphrase_file):
        return ["gpg", "--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback"] + [
            "--passphrase-file",
            str(passphrase_file),
        ]

    def gpg(self, *args):
        argv = self.gpg_argv(self.gpg_home, self.ws.passphrase) + list(args)
        return subprocess.run(argv, check=True, capture_output=True).stdout

    def restore_command(self):
        """The README's line, word for word but for its placeholders."""
        gpg = " ".join(self.gpg_argv(self.home, self.walkey))
        return f"{gpg} --decrypt {self.archive}/*/%f.gpg | zstd -d -q -o %p"

    def script(self, datadir, port):
        gpg = " ".join(self.gpg_argv(self.gpg_home, self.ws.passphrase))
        waldir = datadir.parent / "basewal"
        fetch = "\n".join(
            "runuser -u postgres -- bash -c "
            + shlex.quote(self.restore_command().replace("%f", name).replace("%p", str(waldir / name)))
            for name in self.base_wal
        )
        conf = f"port = {port}\narchive_mode = 'off'\nrestore_command = '{self.restore_command()}'\n"
        return (
            f"install -d -o postgres -m 700 {datadir}\n"
            f"{gpg} --decrypt {self.tar} | zstd -d -q | tar -x -C {datadir}\n"
            f"{gpg} --yes --decrypt --output {datadir}/backup_manifest {self.manifest}\n"
            f"chown -R postgres {datadir}\n"
            f"install -d -o postgres -m 700 {waldir}\n"
            f"{fetch}\n"
            f"runuser -u postgres -- {pg_bin() / 'pg_verifybackup'} -q --wal-directory={waldir} {datadir}\n"
            f"printf %s {shlex.quote(conf)} >> {datadir}/postgresql.auto.conf\n"
            f"touch {datadir}/recovery.signal\n"
            f"chown postgres {datadir}/postgresql.auto.conf {datadir}/recovery.signal\n"
            f"runuser -u postgres -- {pg_bin() / 'pg_ctl'} start -w -t 600 -D {datadir} -l {datadir.parent}/postgres.log\n"
        )


def restored_dir(ws, name, portal=False):
    """The data directory of a restored copy. The portal's parent stays root's (a PITR refuses a
    place whose parents postgres could change); pgBackRest and the shell write logs beside it."""
    parent = ws.root / "restored" / name
    parent.mkdir(parents=True)
    if not portal:
        chown_to_db_user(parent)
    return parent / "data"


def stop_and_remove(datadir):
    stop_left_running(datadir)
    shutil.rmtree(datadir.parent, ignore_errors=True)


def wait_promoted(port, timeout=600):
    def promoted():
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            ) as c:
                return not c.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        except psycopg.OperationalError:
            return False

    wait_until(promoted, timeout, f"the restored cluster on port {port} to finish recovery")


def pitr(ws, portal, cluster, pgbr, server, rounds):
    rows = Rows()
    # Both archives hold the same WAL: switch, and wait until the archiver has pushed it.
    name = cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    wait_until(
        lambda: (cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") >= name,
        120,
        f"{name} to be archived",
    )
    portal.manage("ingestwal", server)
    segment = int(cluster.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")[0][0])
    try:
        stock = StockRecovery(ws, portal, server, segment)
    except (OSError, IndexError, KeyError, ValueError, subprocess.CalledProcessError) as e:
        stock = None
        rows.fail(STAGE_STOCK_PITR, e)
    for i in range(rounds):

        def portal_pitr(i):
            datadir, port = restored_dir(ws, f"portal{i}", portal=True), free_port()
            portal.manage("ingestwal", server)  # as the worker's schedule would have (see portal_base)
            os.sync()
            try:
                args = ("restore", "--server", server, "--target", "latest", "--into-datadir", str(datadir))
                sample, _ = portal_run(portal, *args, "--port", str(port))
                wait_promoted(port, 10)  # already so when the command returns; not timed
                rows.add(PORTAL_PITR, sample)
            finally:
                stop_and_remove(datadir)

        def worker_pitr(i):
            datadir, port = restored_dir(ws, f"worker{i}", portal=True), free_port()
            portal.manage("ingestwal", server)  # as portal_pitr
            os.sync()
            try:
                sample = portal.resident().call(call="pitr", server=server, into=str(datadir), port=port)
                wait_promoted(port, 10)  # already so when the call returns; not timed
                rows.add(PORTAL_PITR_WORKER, sample)
            finally:
                stop_and_remove(datadir)

        def pgbackrest_restore(i):
            datadir, port = restored_dir(ws, f"pgbr{i}"), free_port()
            try:
                watch = Stopwatch()
                restore = run(pgbr.argv(server, f"--pg1-path={datadir}", "restore"), cwd="/")
                with open(datadir / "postgresql.auto.conf", "a") as f:
                    f.write(f"\nport = {port}\narchive_mode = 'off'\n")
                log = datadir.parent / "postgres.log"
                started = run(
                    as_db_user(
                        [str(pg_bin() / "pg_ctl"), "start", "-w", "-t", "600", "-D", str(datadir), "-l", str(log)]
                    ),
                    cwd="/",
                )
                wait_promoted(port)
                seconds, cpu = watch.read()
                rss = max(restore.tree_rss, started.tree_rss)
                rows.add(BR_RESTORE, Sample(seconds, rss, restore.own_hwm, cpu=cpu))
            finally:
                stop_and_remove(datadir)

        def stock_pitr(i, stock=stock):
            datadir, port = restored_dir(ws, f"stock{i}"), free_port()
            portal.manage("ingestwal", server)  # as before the portal's: the archive is the same
            stock.refresh()
            try:
                watch = Stopwatch()
                sample = shell(stock.script(datadir, port), cwd="/")
                wait_promoted(port)
                seconds, cpu = watch.read()
                rows.add(STAGE_STOCK_PITR, Sample(seconds, sample.tree_rss, sample.own_hwm, cpu=cpu))
            finally:
                stop_and_remove(datadir)

        methods = [
            (PORTAL_PITR, portal_pitr, i),
            (PORTAL_PITR_WORKER, worker_pitr, i),
            (BR_RESTORE, pgbackrest_restore, i),
        ]
        in_turn(rows, i, methods + ([(STAGE_STOCK_PITR, stock_pitr, i)] if stock else []))
    datadir = restored_dir(ws, "profile", portal=True)
    try:
        args = ("restore", "--server", server, "--target", "latest", "--into-datadir", str(datadir))
        rows.set(PORTAL_PITR, "profile", profile(portal, *args, "--port", str(free_port())))
    finally:
        stop_and_remove(datadir)
    return rows.list()


# ---------------------------------------------------------------------------- 4. WAL archiving


PORTAL_WAL = (
    "**portal** archive_command (archive_wal.py: copy with O_DIRECT, fsync, link into the spool; copies ready segments ahead,"
    " which the shell then acknowledges by their markers, no process)"
)
CP_WAL = "cp (the strategy's wal_archive.sh; no fsync: not durable)"
CP_SYNC_WAL = "cp, then sync of the file and its directory (durable, as the portal's: the disk's rate)"
BR_SYNC = "pgBackRest archive-push, synchronous (lz4, aes-256-cbc)"
BR_ASYNC = "pgBackRest archive-push --archive-async, process-max 2 (counted until in the repo)"


def make_backlog(cluster, segments):
    """`segments` full WAL segments waiting to be archived (archive_command is empty: none is)."""
    size = int(cluster.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")[0][0])
    # Half random bytes, half hex text, stored without TOAST compression: WAL that compresses about 1.5x.
    rows = max(1, int(size * 0.9) // 1100)
    with cluster.connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        conn.execute("CREATE TABLE IF NOT EXISTS walgen (b bytea)")
        conn.execute("ALTER TABLE walgen ALTER b SET STORAGE EXTERNAL")
        conn.execute("TRUNCATE walgen")
        conn.execute("SELECT pg_switch_wal()")
        for _ in range(segments):
            conn.execute(
                "INSERT INTO walgen SELECT gen_random_bytes(500) || convert_to(repeat(md5(random()::text), 16), 'UTF8')"
                " FROM generate_series(1, %s)",
                [rows],
            )
            conn.execute("SELECT pg_switch_wal()")
    return size


def ready_count(cluster):
    return sum(1 for p in (cluster.datadir / "pg_wal" / "archive_status").iterdir() if p.name.endswith(".ready"))


def set_archive_command(cluster, command):
    cluster.configure(archive_command=command)
    cluster.reload()


def acknowledged(cluster):
    """Segments PostgreSQL was told are archived: the portal says so only once they are durable."""
    return int(cluster.execute("SELECT archived_count FROM pg_stat_archiver")[0][0])


def archived_files(folder):
    return sum(1 for p in Path(folder).iterdir() if len(p.name) == 24 and p.is_file())


WAL_STAGES = {
    "python": "stage: /usr/bin/python3 -I -S starting (the archive program's fixed cost per segment)",
    "s2k": "stage: gpg --symmetric of one segment, the strategy's s2k (65,011,712 SHA-512 iterations)",
    "s2k-low": "stage: gpg --symmetric of one segment, --s2k-count 65536",
    "pubkey": "stage: gpg --encrypt of one segment to a public key (GPG_RECIPIENTS)",
    "arithmetic": (
        "stage: the ingest's arithmetic alone, CPU seconds per segment of this run's WAL in one thread: zstd"
        " --fast=1 (the ingest's level, backups.walseal), the plaintext's SHA-256, AES-256 in OpenPGP's CFB"
        " mode, the integrity code's SHA-1 and the copy's SHA-256; no reading, writing, catalog or Python"
    ),
}
# backups.walseal.WAL_ZSTD_LEVEL: that module needs Django's set-up, which this process does not do.
INGEST_ZSTD_LEVEL = -1


def wal_stages(ws, segment_size, rounds):
    """Where the per-segment time goes: interpreter start, and gpg's key derivation per file."""
    rows, home = Rows(), ws.root / "gnupg"
    segment = ws.root / "files" / "segment"
    segment.write_bytes(os.urandom(segment_size))
    gpg = f"gpg --homedir {home} --batch --yes --pinentry-mode loopback"
    sym = f"{gpg} --passphrase-file {ws.passphrase} --symmetric --cipher-algo AES256 --compress-algo 1 -z 1"
    low = S2K.replace("65011712", "65536")
    subprocess.run(
        [*gpg.split(), "--passphrase", "", "--quick-gen-key", "bench-wal <wal@bench.invalid>", "default", "default"],
        check=True,
        capture_output=True,
    )
    scripts = {
        "python": "/usr/bin/python3 -I -S -c pass",
        "s2k": f"{sym} {S2K} -o {segment}.gpg {segment}",
        "s2k-low": f"{sym} {low} -o {segment}.gpg {segment}",
        "pubkey": f"{gpg} --trust-model always --encrypt -r wal@bench.invalid -z 1 -o {segment}.gpg {segment}",
    }
    for _ in range(rounds):
        for key, script in scripts.items():
            attempt(rows, WAL_STAGES[key], lambda s=script, k=key: rows.add(WAL_STAGES[k], shell(s)))
    segment.unlink()
    return rows.list()


def ingest_arithmetic(cluster, rounds, count=4):
    """What any ingest of this WAL must compute per segment, timed alone with the primitives the
    portal's ingest uses (OpenSSL through hashlib and cryptography, zstandard): with the machine's
    cores, the most segments a second an ingest could catalogue, whatever else it does. Made from
    a backlog of `count` segments of its own (archive_command left empty, as wal_archiving leaves it)."""
    import zstandard
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    rows, method = Rows(), WAL_STAGES["arithmetic"]
    set_archive_command(cluster, "")
    make_backlog(cluster, count)
    status = cluster.datadir / "pg_wal" / "archive_status"
    names = sorted(p.name.removesuffix(".ready") for p in status.iterdir() if p.name.endswith(".ready"))
    segments = [(cluster.datadir / "pg_wal" / name).read_bytes() for name in names[-count:]]
    key, iv = os.urandom(32), bytes(16)
    for _ in range(rounds):
        started = time.process_time()
        for data in segments:
            compressed = zstandard.ZstdCompressor(level=INGEST_ZSTD_LEVEL).compress(data)
            hashlib.sha256(data).digest()
            encryptor = Cipher(algorithms.AES(key), CFB(iv)).encryptor()
            ciphertext = encryptor.update(compressed) + encryptor.finalize()
            hashlib.sha1(compressed).digest()
            hashlib.sha256(ciphertext).digest()
        rows.add(method, Sample((time.process_time() - started) / len(segments), 0, 0))
    return rows.list()


def wal_archiving(ws, portal, cluster, pgbr, server, stanza, segments, rounds, timeout=900):
    rows = Rows()
    portal_command = portal.manage_json("archivecommand", server)["archive_command"]
    script = ws.root / "wal_archive.sh"
    script.write_text(
        f'#!/bin/bash\nWAL_ARCHIVE_DIR="{ws.root / "walcp"}"\nmkdir -p $WAL_ARCHIVE_DIR\ncp $1 $WAL_ARCHIVE_DIR/\n'
    )
    script.chmod(0o755)
    durable = ws.root / "wal_archive_sync.sh"
    durable.write_text(
        f'#!/bin/bash\nD="{ws.root / "walcpsync"}"\nmkdir -p $D\ncp $1 $D/ && sync $D/$(basename $1) $D\n'
    )
    durable.chmod(0o755)
    methods = [
        # Counted as PostgreSQL's acknowledgements, not files in the spool: a segment the
        # look-ahead copied is in the spool before the directory's fsync makes it durable.
        (PORTAL_WAL, portal_command, lambda: acknowledged(cluster)),
        (CP_WAL, f"{script} %p", lambda: archived_files(ws.root / "walcp")),
        (CP_SYNC_WAL, f"{durable} %p", lambda: archived_files(ws.root / "walcpsync")),
        (BR_SYNC, pgbr.archive_command(stanza), lambda: pgbr.archived_count(stanza)),
        (BR_ASYNC, pgbr.archive_command(stanza, asynchronous=True), lambda: pgbr.archived_count(stanza)),
    ]
    lag = {"worker": [], "command": []}
    for _ in range(rounds):
        for method, command, count in methods:

            def one(method, command, count):
                set_archive_command(cluster, "")
                seg_size = make_backlog(cluster, segments)
                waiting = ready_count(cluster)
                before = count()
                watch = Stopwatch()
                set_archive_command(cluster, command)
                wait_until(lambda: count() - before >= waiting, timeout, f"{waiting} segments archived by {method}")
                seconds, cpu = watch.read()
                set_archive_command(cluster, "")
                sample = Sample(seconds, 0, 0, extra={"segments": waiting, "segment_size": seg_size}, cpu=cpu)
                rows.add(method, sample)
                rows.rows[method].setdefault("rates", []).append(waiting / seconds)
                if method == PORTAL_WAL:
                    # What the worker's ingestwal schedule does next: catalogue, encrypt, copy. Every
                    # round's backlog, so that the verdict is a median as the archive rate's is.
                    lag["worker"].append(ingest_sample(portal.resident().call(call="ingest", server=server), waiting))
                    # The same from `manage.py ingestwal`, on a backlog of its own archived the same way.
                    set_archive_command(cluster, "")
                    make_backlog(cluster, segments)
                    again, before = ready_count(cluster), count()
                    set_archive_command(cluster, command)
                    wait_until(lambda: count() - before >= again, timeout, f"{again} segments archived again")
                    set_archive_command(cluster, "")
                    lag["command"].append(ingest_sample(run(portal.argv("ingestwal", server), env=portal.env), again))
                for folder in ("walcp", "walcpsync"):
                    for f in (ws.root / folder).iterdir():
                        f.unlink()

            attempt(rows, method, one, method, command, count)
    return rows.list(), lag


def ingest_sample(sample, segments):
    """One ingest pass of `segments` waiting ones, as the report reads it."""
    return {
        "segments": segments,
        "seconds": sample.seconds,
        "own_rss": sample.own_hwm,
        "cores": sample.cpu / sample.seconds,
        "machine_cores": os.cpu_count(),
    }
