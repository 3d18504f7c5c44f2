"""Logical restore pipelines, in stock tools, on the strategy-shaped dataset: how decryption and
pg_restore's sections can overlap, and what the restore's session settings give.

    python bench/restore_jobs.py [--rows-scale 1.25] [--runs 5] [--only stock,overlap-pre]

Each run restores the portal's kind of dump (pg_dump -Fc -Z1 piped into gpg: no data offsets
in its table of contents) into a new database; the variants are interleaved (this machine is
shared and noisy) and the medians printed as a Markdown table. Used to choose RESTORE_JOBS,
how the portal's parallel restore overlaps (restores.pgrestore.restore_parallel) and
restore_session().

Measured 2026-12-03, --rows-scale 1.25 (249 MiB), 9 interleaved runs on the shared 2-core
machine (load 6), medians as a fraction of stock: overlap-pre 0.92, plain-j2 0.81,
plain-j2-session 0.77 (plain-j2 0.95 of itself). Earlier 5-run passes, noisier still:
overlap-data-session 1.04 (one job loading the data costs more than hiding gpg saves),
overlap-pre-session-j3 1.04 vs -j 2 0.91 (three jobs on two cores), offsets-j2 0.90 vs
plain-j2 0.75 (no sign that a TOC without data offsets makes -j scan at a cost).

Measured 2026-12-05, --rows-scale 0.75 (152 MiB), 5 interleaved runs beside a test suite (noisy):
owner-split-session 2.71 s against overlap-pre-session 2.38 s (best runs 2.24 against 2.12):
loading the rows as their owners, apart from post-data, costs the overlap of one table's index
builds with another's rows, 5 to 14% here. Not adopted: the owner's code can RESET SESSION
AUTHORIZATION to the superuser who logged in, so it protects nothing (README, production notes).

Measured 2026-12-05 17:30, --rows-scale 2.5 (490 MiB), 5 interleaved runs beside review helpers'
tests (noisy): stream-first-session 7.20 s against overlap-pre-session 7.37 s (runs 5.84-7.95 against
6.44-7.39; a first 3-run pass, 6.28 against 6.10): loading the first table's rows while gpg still
writes the file shows no gain above the noise. On two cores pg_restore -j 2 keeps both busy, so
decryption overlapped with the load still costs its CPU (bench/RESULTS.md, the ideal-overlap row).
Not adopted.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupportal.lib.pgcluster import Cluster  # noqa: E402
from backupportal.lib.pgdatadir import pg_bin  # noqa: E402
from bench.setup import S2K, Workspace, load_strategy  # noqa: E402

# restores.pgrestore.restore_session() with its default RESTORE_MAINTENANCE_WORK_MEM.
SESSION = "-c maintenance_work_mem=256MB -c synchronous_commit=off"
VARIANTS = {
    "stock": "gpg -d to a file, then pg_restore -j 2 (the strategy's file as stored)",
    "plain-j2": "pg_restore -j 2 of the already decrypted file (no decryption counted)",
    "plain-j2-session": "plain-j2 with the session settings",
    "pipe": "gpg -d piped into one pg_restore",
    "file-session": "gpg -d to a file, then pg_restore -j 2, session settings",
    "overlap-pre": "pre-data from the TOC alone while gpg writes the file, then data and post-data -j 2",
    "overlap-pre-session": "the same, session settings (the portal's RESTORE_JOBS=2 path)",
    "overlap-data-session": "pre-data and data (one job) from the stream, then post-data -j 2, session settings",
    "overlap-pre-session-j3": "overlap-pre-session with -j 3",
    "owner-split-session": "overlap-pre-session, but data -j 2 loaded as each table's owner"
    " (--use-set-session-authorization), then post-data -j 2 (tried, not adopted)",
    "offsets-j2": "pg_restore -j 2 of a dump written to a file (data offsets in its TOC)",
    "stream-first-session": "overlap-pre-session, and the first table's rows loaded from the scratch file as gpg"
    " writes it (a follower pipes the growing file into a one-item pg_restore), the rest -j 2 once decrypted",
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows-scale", type=float, default=1.25, help="1 = about 200 MiB on disk")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    chosen = args.only.split(",")
    ws = Workspace()
    try:
        template = Cluster.template(base_dir=ws.root / "pg", wal_segsize_mb=16)
        cluster = ws.cluster(template, shared_buffers="256MB", max_wal_size="2GB", checkpoint_timeout="15min")
        size = load_strategy(cluster, "source", args.rows_scale)
        bench = Bench(ws, cluster)
        times = {v: [] for v in chosen}
        for i in range(args.runs):  # interleaved: this machine is noisy
            for v in chosen:
                times[v].append(bench.restore(v, i))
                print(f"bench: {v} run {i}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        ws.destroy()
    base = statistics.median(times["stock"]) if "stock" in times else None
    print(f"Database size: {size / 2**20:.0f} MiB; medians of {args.runs} runs\n")
    print("| variant | method | median s | runs (s) | x stock |")
    print("|---|---|---|---|---|")
    for v, ts in times.items():
        t = statistics.median(ts)
        ratio = f"{t / base:.2f}" if base else "–"
        print(f"| {v} | {VARIANTS[v]} | {t:.2f} | {' '.join(f'{x:.2f}' for x in ts)} | {ratio} |")


class Bench:
    def __init__(self, ws, cluster):
        self.ws, self.cluster = ws, cluster
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.conn = ["-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
        self.gpg = ["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase-file", str(ws.passphrase)]
        files = ws.root / "files"
        self.enc, self.plain, self.offsets, self.scratch = (files / n for n in ("dump.gpg", "plain", "offsets", "s"))
        dump = subprocess.Popen(self.tool("pg_dump", "-Fc", "-Z1", "source"), stdout=subprocess.PIPE, env=self.env)
        encrypt = "--symmetric --cipher-algo AES256 --compress-algo none".split() + S2K.split()
        subprocess.run(self.gpg + encrypt + ["-o", str(self.enc)], stdin=dump.stdout, check=True)
        assert dump.wait() == 0
        self.decrypt_to(self.plain)
        with open(self.plain, "rb") as f:
            self.head = f.read(1 << 20)  # the decrypted start: the TOC (read_properties' head)
        subprocess.run(self.tool("pg_dump", "-Fc", "-Z1", "-f", str(self.offsets), "source"), env=self.env, check=True)

    def tool(self, name, *args):
        return [str(pg_bin() / name), *self.conn, *args]

    def decrypt_to(self, path):
        subprocess.run(self.gpg + ["-d", "-o", str(path), str(self.enc)], check=True, stderr=subprocess.DEVNULL)

    def pg_restore(self, db, *args, stdin=None, session=False):
        env = dict(self.env, PGOPTIONS=SESSION) if session else self.env
        argv = self.tool("pg_restore", "--exit-on-error", "-d", db, *args)
        return subprocess.Popen(argv, stdin=stdin, env=env)

    def run(self, db, *args, session=False):
        assert self.pg_restore(db, *args, session=session).wait() == 0

    def streamed(self, db, sections, session):
        """gpg | tee the scratch file | pg_restore of `sections`."""
        gpg = subprocess.Popen(self.gpg + ["-d", str(self.enc)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        tee = subprocess.Popen(["tee", "-p", str(self.scratch)], stdin=gpg.stdout, stdout=subprocess.PIPE)
        gpg.stdout.close()
        restore = self.pg_restore(db, *(f"--section={s}" for s in sections), stdin=tee.stdout, session=session)
        tee.stdout.close()
        assert restore.wait() == 0 and tee.wait() == 0 and gpg.wait() == 0

    def pre_data_beside_decryption(self, db, session):
        """pre-data from the TOC alone while gpg writes the scratch file."""
        decrypt = self.start_pre_data(db, session)
        assert decrypt.wait() == 0

    def start_pre_data(self, db, session):
        """gpg started on the scratch file, and pre-data restored from the TOC meanwhile; returns gpg."""
        pre_data = self.pg_restore(db, "--section=pre-data", stdin=subprocess.PIPE, session=session)
        decrypt = subprocess.Popen(self.gpg + ["-d", "-o", str(self.scratch), str(self.enc)], stderr=subprocess.DEVNULL)
        try:
            pre_data.stdin.write(self.head)
            pre_data.stdin.close()
        except BrokenPipeError:
            pass
        assert pre_data.wait() == 0
        return decrypt

    def stream_first(self, db, jobs):
        """pre-data from the TOC while gpg writes the scratch file; then the first table's rows from
        the growing file; the rest -j 2 once the file is whole."""
        listing = subprocess.run(self.tool("pg_restore", "-l"), input=self.head, capture_output=True).stdout
        lines = listing.decode().splitlines()
        first = next(i for i, line in enumerate(lines) if " TABLE DATA " in line)
        only, rest = self.ws.root / "files" / "only.list", self.ws.root / "files" / "rest.list"
        only.write_text(lines[first] + "\n")
        rest.write_text("\n".join(lines[:first] + lines[first + 1 :]) + "\n")
        decrypt = self.start_pre_data(db, session=True)
        loader = self.pg_restore(db, "-L", str(only), stdin=subprocess.PIPE, session=True)
        feeder = threading.Thread(target=follow, args=(self.scratch, loader.stdin.fileno(), decrypt))
        feeder.start()
        assert decrypt.wait() == 0
        self.run(
            db, "--section=data", "--section=post-data", "-L", str(rest), "-j", jobs, str(self.scratch), session=True
        )
        feeder.join()
        loader.stdin.close()
        assert loader.wait() == 0

    def restore(self, variant, i):
        db = f"r_{variant.replace('-', '_')}_{i}"
        self.cluster.create_database(db)
        self.cluster.execute("CHECKPOINT")  # each variant starts without the last one's dirty buffers
        session = "session" in variant
        jobs = "3" if variant.endswith("-j3") else "2"
        start = time.monotonic()
        if variant in ("stock", "file-session"):
            self.decrypt_to(self.scratch)
            self.run(db, "-j", "2", str(self.scratch), session=session)
        elif variant.startswith("plain-j2"):
            self.run(db, "-j", "2", str(self.plain), session=session)
        elif variant == "offsets-j2":
            self.run(db, "-j", "2", str(self.offsets))
        elif variant == "pipe":
            gpg = subprocess.Popen(self.gpg + ["-d", str(self.enc)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            restore = self.pg_restore(db, stdin=gpg.stdout)
            gpg.stdout.close()
            assert restore.wait() == 0 and gpg.wait() == 0
        elif variant.startswith("overlap-pre"):
            self.pre_data_beside_decryption(db, session)
            self.run(db, "--section=data", "--section=post-data", "-j", jobs, str(self.scratch), session=session)
        elif variant == "owner-split-session":
            self.pre_data_beside_decryption(db, session)
            owner = "--use-set-session-authorization"
            self.run(db, "--section=data", owner, "-j", jobs, str(self.scratch), session=session)
            self.run(db, "--section=post-data", "-j", jobs, str(self.scratch), session=session)
        elif variant == "stream-first-session":
            self.stream_first(db, jobs)
        elif variant.startswith("overlap-data"):
            self.streamed(db, ["pre-data", "data"], session)
            self.run(db, "--section=post-data", "-j", jobs, str(self.scratch), session=session)
        elapsed = time.monotonic() - start
        self.scratch.unlink(missing_ok=True)
        self.cluster.execute(f"DROP DATABASE {db}")
        return elapsed


def follow(path, out, writer):
    """Pipe the file at `path` into `out` as `writer` (a process) appends to it, until the writer has
    exited and everything is sent; stops quietly when the reader has read all it wants."""
    while not path.exists():
        time.sleep(0.002)
    fd, sent = os.open(path, os.O_RDONLY), 0
    try:
        while True:
            done = writer.poll() is not None  # before the size: nothing is appended after it
            size = os.fstat(fd).st_size
            while sent < size:
                sent += os.sendfile(out, fd, sent, size - sent)
            if done:
                return
            time.sleep(0.005)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
