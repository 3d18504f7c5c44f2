"""Memory of the worker at two database sizes, for every kind of backup and restore.

The large side is the judged dataset (b) and its cluster, measured by the comparisons already
(their rounds' peaks); the small side is 1/8 of it: the database `small` (logical backup and
restore) and a cluster of its own, SMALL_CLUSTER (base backup, PITR). Restore tests are run
here on both sides. The worker is the portal's command process (`own`, VmHWM, exact); its
process tree (gpg, zstd, pg_restore...) is reported beside it.
"""

import json

from backupportal.lib.osuser import free_port

from . import compare
from .measure import CommandFailed, median, run
from .setup import wait_until

SMALL_CLUSTER = "small-cluster"
LIMIT = 1.25


def peak(rows, method):
    """{seconds (median), own, tree (peaks: the largest of its rounds)} of a comparison's portal row, or None."""
    row = next((r for r in rows or [] if r["method"] == method and r["times"]), None)
    if row is None:
        return None
    return {"seconds": median(row["times"]), "own": max(row["own_rss"]), "tree": max(row["tree_rss"])}


def measured(sample):
    return {"seconds": sample.seconds, "own": sample.own_hwm, "tree": sample.tree_rss}


def collect(ws, portal, parts, sizes, rounds=1):
    """[{kind, big, small, big_bytes, small_bytes, note}] for each kind whose large side was measured."""
    found = []

    def add(kind, big, small_fn, big_bytes, small_bytes):
        """big: the large side's peak, or a function measuring it; a failure is a note, never a number."""
        row = {"kind": kind, "big": None, "small": None, "big_bytes": big_bytes, "small_bytes": small_bytes}
        try:
            row["big"] = big() if callable(big) else big
            if row["big"] is None:
                return
            row["small"] = max((small_fn() for _ in range(rounds)), key=lambda m: m["own"])
        except (CommandFailed, RuntimeError, OSError) as e:
            row["note"] = f"failed: {e}"[:300]
        found.append(row)

    def logical_small():
        measured_small = peak(parts.get("memory_small"), compare.PORTAL_LOGICAL)
        if measured_small is None:
            raise RuntimeError("the logical backup of the small database failed (see section 6's first row)")
        return measured_small

    add(
        "logical backup",
        peak(parts.get("logical"), compare.PORTAL_LOGICAL),
        logical_small,
        sizes["db"],
        sizes["small_db"],
    )
    add(
        "base backup",
        peak(parts.get("physical"), compare.PORTAL_BASE),
        lambda: base_backup(portal),
        sizes["cluster"],
        sizes["small_cluster"],
    )
    small_run = next((r.get("run_id") for r in parts.get("memory_small", []) if r.get("run_id")), None)
    add(
        "logical restore",
        peak(parts.get("restore"), compare.PORTAL_RESTORE),
        lambda: logical_restore(ws, portal, small_run),
        sizes["db"],
        sizes["small_db"],
    )
    add(
        "PITR",
        peak(parts.get("pitr"), compare.PORTAL_PITR),
        lambda: pitr(ws, portal),
        sizes["cluster"],
        sizes["small_cluster"],
    )
    if "logical" in parts:
        add(
            "restore test, logical",
            lambda: restore_test(portal, "maldives", "logical"),
            lambda: restore_test(portal, "small", "logical"),
            sizes["db"],
            sizes["small_db"],
        )
    if "physical" in parts:
        add(
            "restore test, base",
            lambda: restore_test(portal, "maldives", "base"),
            lambda: restore_test(portal, SMALL_CLUSTER, "base"),
            sizes["cluster"],
            sizes["small_cluster"],
        )
    return found


def base_backup(portal):
    portal.manage("ingestwal", SMALL_CLUSTER)  # as the worker's schedule keeps it (see compare.physical)
    sample, _ = compare.portal_run(portal, "backup", SMALL_CLUSTER, "--kind", "base")
    return measured(sample)


def logical_restore(ws, portal, run_id):
    if run_id is None:
        raise RuntimeError("no logical backup of the small database to restore")
    sample, _ = compare.portal_run(portal, "restore", str(run_id), "--into-database", "r_memory_small")
    compare.drop(ws.db, "r_memory_small")
    return measured(sample)


def pitr(ws, portal):
    """PITR of the small cluster to the end of its archive (its base backup above, its WAL ingested)."""
    cluster = ws.smallc
    name = cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    wait_until(
        lambda: (cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") >= name,
        120,
        f"{name} to be archived",
    )
    portal.manage("ingestwal", SMALL_CLUSTER)
    datadir, port = compare.restored_dir(ws, "memory-small", portal=True), free_port()
    try:
        args = ("restore", "--server", SMALL_CLUSTER, "--target", "latest", "--into-datadir", str(datadir))
        sample, _ = compare.portal_run(portal, *args, "--port", str(port))
        return measured(sample)
    finally:
        compare.stop_and_remove(datadir)


def restore_test(portal, server, kind):
    """One `restoretest` (its result says passed, not succeeded); None when it did not pass."""
    sample = run(portal.argv("restoretest", server, "--kind", kind, "--json"), env=portal.env, check=False)
    lines = sample.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if result.get("status") != "passed":
        failed = [c["detail"] for c in result.get("checks", []) if not c.get("ok")]
        why = failed[:1] or (sample.stderr or sample.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CommandFailed(f"restoretest {server} --kind {kind}: {result.get('status', 'no result')}: {why[0]}")
    return measured(sample)


def ratio(row, key="own"):
    if not row.get("big") or not row.get("small") or not row["small"][key]:
        return None
    return row["big"][key] / row["small"][key]


def flat(row):
    r = ratio(row)
    return r is not None and r <= LIMIT
