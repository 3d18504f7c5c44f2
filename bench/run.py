"""The benchmark: the portal against the strategy's pipeline, the stock tools and pgBackRest.

    python bench/run.py --quick          # < 15 min, needs QUICK_DISK_GIB free (make bench-quick)
    python bench/run.py                  # full size: a ~1 GB dataset, pgbench scale 50 (make bench)
    python bench/run.py --scale 0.02 --runs 1 ... --output /tmp/r.md   # tiny, as the smoke test does
    python bench/run.py --skip logical,physical,restore,pitr,wal,memory,scale,incremental --sustained-seconds 600
                                         # only the sustained load, 10 minutes per archiving mode

Builds everything itself in a work directory under /var/tmp (throwaway clusters, the datasets,
a portal with its own SQLite catalog, a pgBackRest repository with encryption; a second
throwaway cluster for the portal's PostgreSQL catalog at scale), runs every comparison in
interleaved rounds on the same loaded database, measures the worker's memory at two sizes for
every kind of backup and restore (bench/memory.py) and WAL under pgbench at full speed with push,
then pull archiving (bench/sustained.py, --sustained-seconds per mode), writes RESULTS.md and
sustained.svg beside it, and removes the work directory. Must run as root (PostgreSQL runs as the postgres OS user, as in the tests).
"""

import argparse
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backupportal.lib.pgcluster import Cluster  # noqa: E402
from backupportal.lib.pgdatadir import pg_bin  # noqa: E402
from bench import chart, compare, incremental, memory, report, sustained  # noqa: E402
from bench.measure import free_bytes, machine, run  # noqa: E402
from bench.setup import (  # noqa: E402  # noqa: E402
    DB,
    PGBENCH_DB,
    SMALL_DB,
    TUNED,
    PgBackRest,
    Portal,
    Workspace,
    cluster_size,
    compressibility,
    load_pgbench,
    load_strategy,
    output_file,
    positive,
)

PRESETS = {
    # strategy-shaped scale (1 = ~200 MiB), pgbench scale, WAL segment size (MB)
    # seconds of pgbench per archiving mode under sustained load
    # strategy-shaped scale of the PostgreSQL 18 cluster of the incrementals
    "quick": {"scale": 0.5, "pgbench_scale": 5, "wal_segsize": 1, "sustained_seconds": 45, "incremental_scale": 0.1},
    "full": {"scale": 5.0, "pgbench_scale": 50, "wal_segsize": 16, "sustained_seconds": 300},
}


PARTS = ("logical", "physical", "restore", "pitr", "wal", "sustained", "memory", "scale", "incremental")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick preset (under 15 minutes)")
    p.add_argument("--scale", type=positive(float), help="strategy-shaped dataset scale (1 = about 200 MiB on disk)")
    p.add_argument("--pgbench-scale", type=positive(int), help="pgbench -i scale (1 = about 15 MiB)")
    p.add_argument("--runs", type=positive(int), default=3, help="rounds of each comparison (medians are quoted)")
    p.add_argument("--wal-segments", type=positive(int), default=200)
    p.add_argument("--wal-segsize", type=positive(int), help="WAL segment size in MB of the archiving cluster")
    p.add_argument("--catalog-segments", type=positive(int), default=1_000_000)
    p.add_argument("--catalog-runs", type=positive(int), default=20_000)
    p.add_argument("--catalog-journal", type=positive(int), default=1_000_000)
    p.add_argument("--page-requests", type=positive(int), default=50)
    p.add_argument(
        "--sustained-seconds",
        type=positive(int),
        help="seconds of pgbench at full speed per archiving mode (push, pull)",
    )
    p.add_argument(
        "--incremental-scale",
        type=positive(float),
        help="strategy-shaped scale of the PostgreSQL 18 cluster (incrementals)",
    )
    p.add_argument(
        "--sample-interval", type=positive(float), default=2.0, help="seconds between samples under sustained load"
    )
    p.add_argument(
        "--skip",
        default="",
        help=f"comma-separated parts to skip: {','.join(PARTS)}",
    )
    p.add_argument("--output", type=output_file, default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--workdir", default="/var/tmp", help="where the work directory is made")
    p.add_argument("--shared", action="store_true", help="say in RESULTS.md that the machine was shared")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="measure nothing: write RESULTS.md again from the figures a run saved (bench/results.json)",
    )
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.incremental_scale is None:
        args.incremental_scale = args.scale  # full size as the other physical benches; quick keeps it small
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := sorted(args.skip - set(PARTS)):
        p.error(f"--skip {','.join(unknown)}: no such part; the parts are {','.join(PARTS)}")
    args.mode = "quick" if args.quick else "custom" if any(a.startswith("--scale") for a in sys.argv) else "full"
    return args


def disk_budget(args):
    """Bytes the run may write at most, with room to spare (stated in RESULTS.md)."""
    mib = 2**20
    db = (200 * args.scale + 15 * args.pgbench_scale) * mib * 1.15  # both datasets and the small one
    artifacts = db * (1 + args.runs * 1.0 + 3)  # backups kept, two pgBackRest fulls, restores in flight
    wal = args.wal_segments * args.wal_segsize * mib * (2 + args.runs * 2)  # backlog, spool, repo, encrypted
    catalog = (args.catalog_segments + args.catalog_journal) * 1500 + args.catalog_runs * 4000
    # Sustained load: pgbench's WAL at up to 10 MiB/s per mode (the spool and the compressed archive;
    # pgbench made 1-2 MiB/s on the shared machine), and pg_wal up to max_wal_size.
    load = args.sustained_seconds * 10 * mib * 2 + 2048 * mib
    # Incrementals: the 18 cluster, one restore and its unpacked parts at a time, and per round its
    # compressed fulls and incrementals (kept) and the WAL of the changes.
    incr = 0 if "incremental" in args.skip else 200 * args.incremental_scale * mib * 1.15 * (3 + args.runs)
    return int(artifacts + wal + catalog + load + incr + 1024 * mib)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return write(json.loads(Path(args.render).read_text()), Path(args.output))
    budget = disk_budget(args)
    free = free_bytes(args.workdir)
    if free < budget:
        print(
            f"bench: {args.workdir} has {free / 2**30:.1f} GiB free but this run needs up to "
            f"{budget / 2**30:.1f} GiB: free some space, pick another --workdir, or use a smaller --scale",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    info = {
        "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(pg_bin()),
        "budget": budget,
        "free": free,
        "args": vars(args) | {"skip": sorted(args.skip)},
    }
    ws = Workspace(args.workdir)
    results = {"info": info}
    failed = None
    try:
        build(ws, args, results)
        measure_all(ws, args, results)
    except Exception as e:  # noqa: BLE001 - the parts measured so far are still written, the failure said
        failed = f"{type(e).__name__}: {e}"
        info["failed"] = failed
        print(f"bench: failed: {failed}", file=sys.stderr)
    finally:
        ws.destroy()

    info["seconds"] = time.monotonic() - started
    info["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if "datasets" not in results:
        return 1  # failed while building: nothing measured to write
    output = Path(args.output)
    # The figures as measured, beside RESULTS.md: --render writes the report again from them
    # (its explanations corrected, say) without another hour of measuring.
    output.with_name(RESULTS_JSON).write_text(json.dumps(results, indent=1, default=str) + "\n")
    write(json.loads(output.with_name(RESULTS_JSON).read_text()), output)
    return 1 if failed else 0


RESULTS_JSON = "results.json"


def write(results, output):
    """RESULTS.md (and the sustained-load chart beside it, which it links) from a run's figures.
    Always from the figures as saved, so that a run and a --render of it write the same."""
    if results.get("parts", {}).get("sustained"):
        output.with_name(report.SUSTAINED_CHART).write_text(chart.render(results["parts"]["sustained"]))
    output.write_text(report.render(results))
    print(f"bench: wrote {output} from a run of {results['info']['seconds']:.0f} s")
    return 1 if results["info"].get("failed") else 0


STARTED = time.monotonic()


def say(message):
    print(f"bench: [{(time.monotonic() - STARTED) / 60:4.1f} min] {message}", flush=True)


def build(ws, args, results):
    say(f"building in {ws.root}")
    t16 = Cluster.template(base_dir=ws.root / "pg", wal_segsize_mb=16)
    twal = t16 if args.wal_segsize == 16 else Cluster.template(base_dir=ws.root / "pg", wal_segsize_mb=args.wal_segsize)
    ws.db = ws.cluster(t16, **TUNED)
    ws.pgb = ws.cluster(t16, **TUNED)
    ws.walc = ws.cluster(twal, **TUNED)
    datasets = []
    t0 = time.monotonic()
    size = load_strategy(ws.db, DB, args.scale)
    datasets.append(dataset("strategy-shaped (b)", ws.db, DB, size, time.monotonic() - t0, judged=True))
    t0 = time.monotonic()
    small = load_strategy(ws.db, SMALL_DB, args.scale / 8)
    datasets.append(dataset("strategy-shaped, 1/8 (memory check)", ws.db, SMALL_DB, small, time.monotonic() - t0))
    t0 = time.monotonic()
    size = load_pgbench(ws.pgb, args.pgbench_scale)
    datasets.append(dataset(f"pgbench -i -s {args.pgbench_scale} (a)", ws.pgb, PGBENCH_DB, size, time.monotonic() - t0))
    if "memory" not in args.skip:
        # Base backups and PITR copy a whole cluster: the memory check's small side needs its own.
        ws.smallc = ws.cluster(t16, **TUNED)
        t0 = time.monotonic()
        size = load_strategy(ws.smallc, DB, args.scale / 8)
        name = "strategy-shaped, 1/8, a cluster of its own (memory check of base backups and PITR)"
        datasets.append(dataset(name, ws.smallc, DB, size, time.monotonic() - t0))
        results["small_cluster_bytes"] = cluster_size(ws.smallc)
    results["datasets"] = datasets
    results["cluster_bytes"] = cluster_size(ws.db)
    say("datasets loaded: " + ", ".join(f"{d['name']} {d['bytes'] / 2**20:.0f} MiB" for d in datasets))

    ws.portal = Portal(ws)
    ws.portal.register("maldives", ws.db, DB)
    ws.portal.register("small", ws.db, SMALL_DB)
    ws.portal.register("pgbench", ws.pgb, PGBENCH_DB)
    ws.portal.register("walc", ws.walc, "postgres")
    if "memory" not in args.skip:
        ws.portal.register(memory.SMALL_CLUSTER, ws.smallc, DB)
        ws.portal.enable_push(memory.SMALL_CLUSTER, ws.smallc)
    ws.pgbr = PgBackRest(ws, {"maldives": ws.db, "walc": ws.walc})
    ws.portal.enable_push("maldives", ws.db, extra_command=ws.pgbr.archive_command("maldives"))
    compare.ARCHIVING.append(ws.db)
    ws.portal.manage("archivecommand", "walc")
    ws.walc.configure(archive_mode="on", archive_command="", wal_level="replica")
    ws.walc.restart()
    ws.pgbr.run("maldives", "stanza-create")
    ws.pgbr.run("walc", "stanza-create")


def dataset(name, cluster, dbname, size, seconds, judged=False):
    tables = cluster.execute(
        "SELECT relname, n_live_tup FROM pg_stat_user_tables ORDER BY n_live_tup DESC LIMIT 4", dbname=dbname
    )
    return {
        "name": name,
        "db": dbname,
        "bytes": size,
        "load_seconds": seconds,
        "rows": {t: n for t, n in tables},
        "compressibility": compressibility(cluster, dbname),
        "judged": judged,
    }


def measure_all(ws, args, results):
    p, rounds = ws.portal, args.runs
    parts = results.setdefault("parts", {})
    if "logical" not in args.skip:
        say("1. logical backups")
        parts["logical"] = compare.logical(ws, p, ws.db, "maldives", DB, rounds)
        parts["logical_pgbench"] = compare.logical(ws, p, ws.pgb, "pgbench", PGBENCH_DB, rounds, stages=False)
        parts["boot"] = compare.django_boot(p, rounds)
        say("6. memory at two sizes")
        parts["memory_small"] = compare.logical(ws, p, ws.db, "small", SMALL_DB, rounds, stages=False)
    if "physical" not in args.skip:
        say("2. base backups")
        parts["physical"] = compare.physical(ws, p, ws.db, ws.pgbr, "maldives", rounds)
    if "pitr" not in args.skip and "physical" not in args.skip:
        # Right after the base backups: little WAL to replay, so the restores themselves are compared.
        say("3. PITR restores")
        parts["pitr"] = compare.pitr(ws, p, ws.db, ws.pgbr, "maldives", rounds)
    if "restore" not in args.skip and "logical" not in args.skip:
        say("3. logical restores")
        run_id = next(r for r in parts["logical"] if r["method"] == compare.PORTAL_LOGICAL)["run_id"]
        parts["restore"] = compare.logical_restore(ws, p, ws.db, run_id, DB, rounds)
        # (a) too, reported beside (b); the targets are judged on (b) alone.
        run_id = next(r for r in parts["logical_pgbench"] if r["method"] == compare.PORTAL_LOGICAL)["run_id"]
        parts["restore_pgbench"] = compare.logical_restore(ws, p, ws.pgb, run_id, PGBENCH_DB, rounds)
    if "memory" not in args.skip:
        say("6. memory at two sizes: every kind of backup and restore")
        sizes = {
            "db": next(d["bytes"] for d in results["datasets"] if d["judged"]),
            "small_db": next(d["bytes"] for d in results["datasets"] if d["db"] == SMALL_DB),
            "cluster": results["cluster_bytes"],
            "small_cluster": results["small_cluster_bytes"],
        }
        parts["memory"] = memory.collect(ws, p, parts, sizes)
    if "wal" not in args.skip:
        say(f"4. WAL archiving, {args.wal_segments} segments of {args.wal_segsize} MB")
        parts["wal"], lag = compare.wal_archiving(ws, p, ws.walc, ws.pgbr, "walc", "walc", args.wal_segments, rounds)
        # The worker's pass is judged (it is what ingests WAL in production); the command's is shown.
        parts["ingest_worker"], parts["ingest"] = lag["worker"], lag["command"]
        parts["wal_stages"] = compare.wal_stages(ws, args.wal_segsize * 2**20, rounds)
        parts["wal_stages"] += compare.ingest_arithmetic(ws.walc, rounds)
    if "sustained" not in args.skip:
        say(f"7. sustained load: pgbench for {args.sustained_seconds} s with push, then with pull")
        parts["sustained"] = sustained.run_modes(ws, p, ws.pgb, args.sustained_seconds, args.sample_interval, log=say)
    if "incremental" not in args.skip:
        say("8. block-level incrementals on PostgreSQL 18: 1% and 10% of rows changed")
        parts["incremental"] = incremental.measure(ws, p, rounds, args.incremental_scale, args.wal_segsize, log=say)
    if "scale" not in args.skip:
        say(f"5. the portal at scale: {args.catalog_segments} segments, {args.catalog_journal} journal entries")
        out = ws.root / "scale.json"
        sample = run(
            [sys.executable, str(ROOT / "bench" / "scale.py"), "--out", str(out)]
            + ["--segments", str(args.catalog_segments), "--runs", str(args.catalog_runs)]
            + ["--journal", str(args.catalog_journal), "--requests", str(args.page_requests)],
            cwd=ROOT,
        )
        parts["scale"] = json.loads(out.read_text()) | {"seconds": sample.seconds}


if __name__ == "__main__":
    sys.exit(main())
