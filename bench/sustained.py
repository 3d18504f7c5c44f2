"""Sustained load: pgbench at full speed while the portal archives, first by push, then by pull.

Each mode runs as production runs it, and measures whatever the code does:
- push: the portal's archive_command (archivecommand's lines) on the cluster, and the worker
  (`manage.py qcluster`) running the server's `ingestwal` schedule (every minute);
- pull: `manage.py receivewal NAME` (pg_receivewal, ingesting as segments complete) beside the
  worker, which runs the same ingestwal schedule.
While `pgbench -c 4 -j 2 -T DURATION` writes, a sampler reads every INTERVAL seconds: pg_wal's
size, the spool's size, segments archived (handed to the spool and not yet ingested, plus those
ingested) and catalogued, and the RPO: how far the newest catalogued segment's end is behind the
server's insert position, in bytes and in seconds (when the server wrote that position).

Kept up: neither the spool nor the RPO in bytes grows over the last third of the load: its peak
there is at most the middle third's peak plus a slack, the larger of two segments (the one being
written, the one being ingested) and SCHEDULE_JITTER seconds of the run's WAL (the worker fires a
minute's schedule up to 30 s late, so consecutive push peaks differ by that much without any growth).
"""

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import psycopg

from backupportal.lib.pgdatadir import pg_bin

from .measure import dir_size
from .setup import PGBENCH_DB, wait_until

PUSH, PULL = "push", "pull"
MODES = (PUSH, PULL)
SERVER = {PUSH: "load-push", PULL: "load-pull"}
# How much higher the last third's peak may be than the middle third's and still count as bounded.
SLACK_SEGMENTS = 2
SCHEDULE_JITTER = 30
# The worker fires schedules every ~30 s and ingestwal's cron is every minute: a window shorter
# than this cannot see a full ingest cycle, so its verdict is only indicative.
INGEST_PERIOD = 60
PGBENCH = ["-c", "4", "-j", "2", "-n"]


def pg_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def run_modes(ws, portal, cluster, duration, interval, modes=MODES, log=print):
    """{mode: result} for each mode, one after the other on `cluster` (a pgbench -i database)."""
    results = {}
    for mode in modes:
        log(f"   sustained load, {mode}: pgbench {' '.join(PGBENCH)} -T {duration}")
        setup = push_mode if mode == PUSH else pull_mode
        try:
            results[mode] = setup(ws, portal, cluster, duration, interval)
        except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error, sqlite3.Error) as e:
            # A failure is a note on the mode's row, never a number (and the other mode still runs).
            results[mode] = {"note": f"failed: {e}"[:300]}
    return results


def only_these_schedules(portal, keep):
    """The worker runs only the ingest schedules under test (no other server's backup or ingest
    lands in the measured minutes); the portal-wide jobs (the monitor...) stay as in production."""
    portal.manage(
        "shell",
        "-c",
        "from backups.models import BackupSchedule\n"
        "from backups.schedules import sync_schedule\n"
        "for s in BackupSchedule.objects.select_related('server'):\n"
        f"    s.enabled = s.q_name in {list(keep)!r}\n"
        "    s.save(update_fields=['enabled'])\n"
        "    sync_schedule(s)\n",
    )


def push_mode(ws, portal, cluster, duration, interval):
    name = SERVER[PUSH]
    portal.manage("addserver", name, "--dsn", cluster.dsn(PGBENCH_DB))
    portal.enable_push(name, cluster)
    spool = Path(portal.env["WAL_SPOOL"]) / name
    try:
        only_these_schedules(portal, [f"ingestwal:{name}"])
        # Start from a caught-up archive: the segment in progress switched, archived and ingested.
        switched = switch_wal(cluster)
        wait_until(lambda: (last_archived(cluster) or "") >= switched, 120, f"{switched} to be archived")
        portal.manage("ingestwal", name)
        with Worker(portal, "qcluster") as worker:
            return measure(ws, portal, cluster, name, spool, duration, interval, [worker])
    finally:
        cluster.configure(archive_mode="off", archive_command="")
        cluster.restart()


def pull_mode(ws, portal, cluster, duration, interval):
    name = SERVER[PULL]
    portal.manage("addserver", name, "--dsn", cluster.dsn(PGBENCH_DB), "--archiving", "pull")
    only_these_schedules(portal, [f"ingestwal:{name}"])
    spool = Path(portal.env["WAL_SPOOL"]) / name
    catalog = Catalog(portal, name)
    try:
        with Worker(portal, "receivewal", name) as receiver, Worker(portal, "qcluster") as worker:
            # Start from a caught-up archive, as in push mode: once pg_receivewal streams, the segment in
            # progress switched and catalogued (switched again while the receiver has not caught it).
            wait_until(lambda: streaming(cluster), 120, "pg_receivewal to stream")
            deadline, switched = time.monotonic() + 120, None
            while switched is None or (catalog.read()[1] or -1) < switched:
                if time.monotonic() > deadline:
                    names = sorted(n for n in os.listdir(spool) if not n.startswith("."))
                    raise RuntimeError(
                        f"timed out after 120 s waiting for segment {switched:X} to be catalogued; spool: "
                        f"{' '.join(names)}; newest catalogued: {catalog.read()[1]}; receivewal said:"
                        f" {receiver.last_line()}; qcluster said: {worker.last_line()}"
                    )
                # pg_switch_wal() returns the end (+1) of the segment it completed.
                switched = (switch_wal_lsn(cluster) - 1) // segment_size(cluster)
                for _ in range(50):
                    if (catalog.read()[1] or -1) >= switched:
                        break
                    time.sleep(0.1)
            return measure(ws, portal, cluster, name, spool, duration, interval, [receiver, worker])
    finally:
        cluster.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active AND slot_name LIKE %s",
            ["backupportal_%"],
        )


def streaming(cluster):
    """pg_receivewal streams from the portal's slot (the slot is active already while --create-slot runs)."""
    return bool(
        cluster.execute(
            "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid"
            " WHERE r.state = 'streaming' AND s.slot_name LIKE 'backupportal_%'"
        )
    )


# A record first: pg_switch_wal() at the very start of a segment switches nothing and names the one before.
SWITCH = "SELECT pg_logical_emit_message(false, 'bench', 'switch'), pg_switch_wal()"


def switch_wal(cluster):
    lsn = cluster.execute(SWITCH)[0][1]
    return cluster.execute("SELECT pg_walfile_name(%s)", [lsn])[0][0]


def switch_wal_lsn(cluster):
    return int(cluster.execute(f"SELECT s - '0/0'::pg_lsn FROM ({SWITCH}) AS x(m, s)")[0][0])


def last_archived(cluster):
    return cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]


def segment_size(cluster):
    return int(cluster.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")[0][0])


class Worker:
    """A long-running portal command (qcluster, receivewal) in the background, stopped by SIGTERM."""

    def __init__(self, portal, *args):
        self.portal, self.args = portal, args
        self.log = Path(portal.ws.root) / f"{'-'.join(args)}.log"

    def __enter__(self):
        self.out = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            self.portal.argv(*self.args), env=self.portal.env, cwd=self.portal.env["PYTHONPATH"], stdout=self.out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self

    def alive(self):
        return self.proc.poll() is None

    def last_line(self):
        return (self.log.read_text().strip().splitlines()[-1:] or ["(no output)"])[0][:200]

    def problem(self):
        """None while it runs; else one line naming the command and the end of its log."""
        if self.alive():
            return None
        return f"manage.py {' '.join(self.args)} exited {self.proc.returncode}: {self.last_line()}"

    def __exit__(self, *exc):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


class Catalog:
    """The portal's own catalog (its SQLite file), read-only: the newest catalogued segment."""

    def __init__(self, portal, server):
        self.path = Path(portal.env["DATABASE_URL"].removeprefix("sqlite:///"))
        self.server = server

    def read(self):
        """(segments catalogued, newest segment number or None)."""
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30) as db:
            return db.execute(
                "SELECT count(*), max(w.segno) FROM backups_walsegment w JOIN backups_server s ON s.id = w.server_id"
                " WHERE s.name = ? AND w.segno IS NOT NULL AND w.timeline = 1",
                [self.server],
            ).fetchone()


def spool_state(spool):
    """(bytes in the spool, complete segments waiting there)."""
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return 0, 0
    waiting = sum(1 for n in names if len(n) == 24 and all(c in "0123456789ABCDEF" for c in n))
    return dir_size(spool), waiting


def measure(ws, portal, cluster, server, spool, duration, interval, workers):
    """Run pgbench for `duration` seconds and sample until it ends; the samples and their summary."""
    catalog, seg = Catalog(portal, server), segment_size(cluster)
    samples, stop = [], threading.Event()
    count0 = catalog.read()[0]
    with cluster.connect(autocommit=True) as conn:

        def sample(t):
            lsn = int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])
            count, newest = catalog.read()
            spool_bytes, waiting = spool_state(spool)
            samples.append(
                {
                    "t": t,
                    "insert_lsn": lsn,
                    "catalogued_end": (newest + 1) * seg if newest is not None else 0,
                    "pg_wal": dir_size(cluster.datadir / "pg_wal"),
                    "spool": spool_bytes,
                    "ingested": count - count0,
                    "archived": count - count0 + waiting,
                }
            )

        start = time.monotonic()
        bench = subprocess.Popen(
            [str(pg_bin() / "pgbench"), *PGBENCH, "-T", str(duration), "-h", cluster.host, "-p", str(cluster.port)]
            + ["-U", "postgres", PGBENCH_DB],
            env=pg_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        sample(0.0)
        try:
            while bench.poll() is None:
                stop.wait(interval)
                sample(time.monotonic() - start)
                for w in workers:
                    if w.problem():
                        raise RuntimeError(w.problem())
        finally:
            if bench.poll() is None:
                bench.kill()
            out = bench.communicate()[0]
        if bench.returncode != 0:
            raise RuntimeError(f"pgbench exited {bench.returncode}: {out.strip().splitlines()[-1:]}")
        tps = next((line.split("=")[1].split()[0] for line in out.splitlines() if line.startswith("tps")), "nan")
    return summarize(samples, duration, seg) | {"tps": float(tps)}


def rpo_seconds(samples, i):
    """How long ago the server wrote the first byte not yet catalogued at sample i: the latest moment
    its insert position was at or below the catalogued end (linear between samples); the whole
    run when it never was (a lower bound)."""
    end, now = samples[i]["catalogued_end"], samples[i]["t"]
    for j in range(i, -1, -1):
        if samples[j]["insert_lsn"] <= end:
            if j == i:
                return 0.0
            a, b = samples[j], samples[j + 1]
            span = b["insert_lsn"] - a["insert_lsn"]
            at = a["t"] + (end - a["insert_lsn"]) / span * (b["t"] - a["t"]) if span else a["t"]
            return now - at
    return now - samples[0]["t"]


def summarize(samples, duration, seg):
    for i, s in enumerate(samples):
        s["rpo_bytes"] = max(0, s["insert_lsn"] - s["catalogued_end"])
        s["rpo_s"] = rpo_seconds(samples, i)
    rpo_s = sorted(s["rpo_s"] for s in samples)
    middle = [s for s in samples if duration / 3 <= s["t"] < 2 * duration / 3]
    last = [s for s in samples if s["t"] >= 2 * duration / 3]
    wal_bytes = samples[-1]["insert_lsn"] - samples[0]["insert_lsn"]
    slack = max(SLACK_SEGMENTS * seg, SCHEDULE_JITTER * wal_bytes / max(samples[-1]["t"], 1))
    growing = [key for key in ("spool", "rpo_bytes") if grows(middle, last, key, slack)]
    return {
        "seconds": samples[-1]["t"],
        "duration": duration,
        "segment_size": seg,
        "wal_bytes": wal_bytes,
        "slack": slack,
        "archived": samples[-1]["archived"],
        "ingested": samples[-1]["ingested"],
        "pg_wal_max": max(s["pg_wal"] for s in samples),
        "pg_wal_last": samples[-1]["pg_wal"],
        "spool_max": max(s["spool"] for s in samples),
        "spool_last": samples[-1]["spool"],
        "rpo_bytes_max": max(s["rpo_bytes"] for s in samples),
        "rpo_s_max": rpo_s[-1],
        "rpo_s_p95": rpo_s[max(0, round(0.95 * len(rpo_s)) - 1)],
        "growing": growing,
        "kept_up": bool(middle and last) and not growing,
        "indicative": duration / 3 < INGEST_PERIOD,
        "samples": samples,
    }


def grows(middle, last, key, slack):
    """The last window's peak above the middle window's by more than the slack (bytes)."""
    if not middle or not last:
        return True  # too few samples to tell: not shown to keep up
    return max(s[key] for s in last) > max(s[key] for s in middle) + slack
