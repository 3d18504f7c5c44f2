"""What counting every table costs a logical backup: exact counts in the dump's snapshot, then pg_dump.

    python bench/rowcounts.py [--scale 5] [--tables 2000] [--runs 3] [--output bench/ROWCOUNTS.md]

A logical backup exports a snapshot, counts the rows of every user table in it
(backups.tables.count_all, the very function the portal runs) and then runs
`pg_dump -Fc -Z1 --snapshot`. Measured here, on the strategy-shaped dataset (scale 5 is the
~1 GB of bench/RESULTS.md) and on a database of many small tables (the per-table cost):

- pg_dump alone, to /dev/null (no gpg: the dump is the part counting competes with);
- the counts alone, in a REPEATABLE READ snapshot (and one query per table, for comparison);
- the counts, then pg_dump from the same snapshot: what a backup now does.

Methods are interleaved within a round and medians reported: the machine is shared.
Writes a Markdown report (stdout, or --output).
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupportal.lib import sampledata  # noqa: E402
from backupportal.lib.pgcluster import Cluster  # noqa: E402
from backupportal.lib.pgdatadir import pg_bin  # noqa: E402
from backups import tables  # noqa: E402


def dump(cluster, dbname, snapshot=None):
    argv = [str(pg_bin() / "pg_dump"), "-Fc", "-Z1", "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
    argv += [f"--snapshot={snapshot}"] if snapshot else []
    subprocess.run([*argv, dbname], stdout=subprocess.DEVNULL, check=True)


def timed(fn):
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def counts_only(cluster, dbname):
    with cluster.connect(dbname, autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return len(tables.count_all(conn))


def counts_one_query_per_table(cluster, dbname):
    """The first version: a round trip per table, kept here to show what batching saves."""
    with cluster.connect(dbname, autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for row in tables.user_tables(conn):  # (name, b"FROM ONLY schema.table", ...)
            conn.execute(b"SELECT pg_catalog.count(*) " + row[1]).fetchone()


def counts_then_dump(cluster, dbname):
    with cluster.connect(dbname, autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        tables.count_all(conn)
        dump(cluster, dbname, snapshot)


def measure(cluster, dbname, runs):
    methods = {
        "pg_dump -Fc -Z1 alone": lambda: dump(cluster, dbname),
        "exact counts of every table alone": lambda: counts_only(cluster, dbname),
        "the same, one query per table": lambda: counts_one_query_per_table(cluster, dbname),
        "counts, then pg_dump from their snapshot (a backup now)": lambda: counts_then_dump(cluster, dbname),
    }
    times = {label: [] for label in methods}
    for _ in range(runs):
        for label, fn in methods.items():
            times[label].append(timed(fn))
    return {label: statistics.median(ts) for label, ts in times.items()}


def load_many_tables(cluster, dbname, n, rows=1000):
    cluster.create_database(dbname)
    with cluster.connect(dbname) as conn:
        for i in range(n):
            conn.execute(f"CREATE TABLE t{i} (id int, note text)")
            conn.execute(f"INSERT INTO t{i} SELECT g, 'row ' || g FROM generate_series(1, {rows}) g")
        conn.execute("ANALYZE")
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def report(rows, runs):
    lines = [
        f"Medians of {runs} interleaved runs, in seconds. Counts are batched ({tables.BATCH} tables a query)"
        ' unless said otherwise; "counts ÷ dump" is what counting adds to the dump\'s own time.',
        "",
        "| dataset | size MiB | tables | pg_dump alone | counts | counts, one query per table"
        " | counts then pg_dump | counts ÷ dump |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, size, n, t in rows:
        alone, counts, one_by_one, both = t.values()
        lines.append(
            f"| {name} | {size / 2**20:.0f} | {n} | {alone:.2f} | {counts:.2f} | {one_by_one:.2f} | {both:.2f} | "
            f"{counts / alone * 100:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=5.0, help="strategy-shaped dataset (1 = about 200 MiB)")
    p.add_argument("--tables", type=int, default=2000, help="tables of 1,000 rows in the many-tables database")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output", help="write the Markdown table here instead of stdout")
    args = p.parse_args()
    rows = []
    with Cluster.create() as cluster:
        cluster.start()
        cluster.create_database("strategy")
        with cluster.connect("strategy") as conn:
            size = sampledata.create_scaled(conn, args.scale)
        rows.append((f"strategy-shaped, scale {args.scale:g}", size, 4, measure(cluster, "strategy", args.runs)))
        size = load_many_tables(cluster, "many", args.tables)
        rows.append((f"{args.tables} tables of 1,000 rows", size, args.tables, measure(cluster, "many", args.runs)))
    text = report(rows, args.runs)
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
